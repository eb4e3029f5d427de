"""The consumer's config file (``edge-agent consume -c consumer.yaml``), DESIGN "Downstream".

The Kafka connection, retry and dlq sections are the bridge's models (one definition of each):
a consumer host talks to the same central Kafka with the same security settings.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from edge_agent.bridge.config import DlqConfig, KafkaConfig, RetryConfig
from edge_agent.common.config import HttpConfig, LogConfig, Strict, parse_config, read_yaml
from edge_agent.common.wire import STREAMS

DLQ_RETENTION_MS = 7 * 24 * 3600 * 1000  # DESIGN: the dlq keeps 7 days
DAY_MS = 24 * 3600 * 1000
_IDENT = r"^[a-z_][a-z0-9_]{0,62}$"  # a PostgreSQL identifier we can write without quoting
_HANDLER = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class PostgresSinkConfig(Strict):
    dsn_env: str = "EDGE_PG_DSN"  # a libpq DSN or URL, password included: a secret
    schema_: str = Field("edge", alias="schema", pattern=_IDENT)
    connect_timeout_s: float = Field(5.0, gt=0)


class SinkConfig(Strict):
    postgres: PostgresSinkConfig | None = None
    handler: str | None = None  # "package.module:function", called with each envelope

    @field_validator("handler")
    @classmethod
    def _importable_name(cls, value: str | None) -> str | None:
        if value is not None and not _HANDLER.fullmatch(value):
            raise ValueError(f"expected package.module:function, not {value!r}")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> "SinkConfig":
        if (self.postgres is None) == (self.handler is None):
            raise ValueError("name exactly one sink: postgres or handler")
        return self


class ConsumerRetryConfig(RetryConfig):
    max_delay_s: float = Field(30.0, ge=0)  # below max.poll.interval.ms by far: we poll while waiting anyway


class AuditConfig(Strict):
    reorder_timeout_s: float = Field(60.0, gt=0)  # a hole younger than this may still fill (other partitions)
    check_interval_s: float = Field(5.0, gt=0)
    max_devices: int = Field(100_000, ge=1)  # devices tracked at once; the least recently seen is forgotten


class TopicSettings(Strict):
    partitions: int | None = Field(None, ge=1)
    replication_factor: int | None = Field(None, ge=1)
    retention_ms: int | None = Field(None, ge=-1)  # -1: keep forever
    segment_ms: int | None = Field(None, ge=1)


class TopicsConfig(Strict):
    """What ``edge-agent topics ensure`` makes of the central topics."""

    partitions: int = Field(4, ge=1)
    replication_factor: int = Field(1, ge=1)
    retention_ms: int = Field(DLQ_RETENTION_MS, ge=-1)
    overrides: dict[str, TopicSettings] = {}

    def settings(self, topic: str, *, dlq: bool = False) -> dict[str, int]:
        """The effective partitions, replication and topic configs of ``topic`` (``dlq``: it is the dlq)."""
        base: dict[str, int] = {"partitions": self.partitions, "replication_factor": self.replication_factor,
                                "retention.ms": self.retention_ms}
        if dlq:
            # segment.ms one day: a segment is deleted whole, so 7 days of retention do not become 14.
            base.update({"retention.ms": DLQ_RETENTION_MS, "segment.ms": DAY_MS})
        override = self.overrides.get(topic)
        if override is not None:
            for name, value in override.model_dump(exclude_none=True).items():
                base[name.replace("_ms", ".ms") if name.endswith("_ms") else name] = value
        return base


class ConsumerHttpConfig(HttpConfig):
    listen: str = "127.0.0.1:9110"


class ConsumerConfig(Strict):
    kafka: KafkaConfig = KafkaConfig()
    group: str = Field("analytics-consumer-group", min_length=1, max_length=255)
    topics: list[str] = Field(["ai.inference.results", "camera.events"], min_length=1)
    sink: SinkConfig
    retry: ConsumerRetryConfig = ConsumerRetryConfig()
    dlq: DlqConfig = DlqConfig()
    audit: AuditConfig | None = None
    http: ConsumerHttpConfig = ConsumerHttpConfig()
    consumer: dict[str, Any] = {}  # extra librdkafka consumer settings
    batch_max: int = Field(500, ge=1, le=100_000)  # records per poll, written in one transaction
    central_topics: TopicsConfig = TopicsConfig()  # for `topics ensure`
    log: LogConfig = LogConfig()

    @field_validator("topics")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("a topic is named twice")
        return value

    @model_validator(mode="after")
    def _dlq_not_consumed(self) -> "ConsumerConfig":
        if self.dlq.topic in self.topics:
            raise ValueError(f"the dlq topic {self.dlq.topic!r} cannot be consumed (a failure would loop)")
        if self.audit is not None and not set(STREAMS) <= set(self.topics):
            # seq grows across all four streams: a group that reads fewer sees holes that are no loss
            missing = sorted(set(STREAMS) - set(self.topics))
            raise ValueError(f"audit needs every uplink stream in topics (seq spans them); missing {missing}")
        return self

    def file_problems(self) -> list[str]:
        """TLS files this config names that the consumer could not read (check-config)."""
        return self.kafka.ssl.file_problems("kafka.ssl") if self.kafka.ssl else []


def parse_consumer(data: dict[str, Any]) -> ConsumerConfig:
    return parse_config(ConsumerConfig, data)


def load_consumer(path: Path) -> ConsumerConfig:
    return parse_consumer(read_yaml(path))
