"""The bridge's config file (``edge-agent bridge -c bridge.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from edge_agent.bridge.rabbitmq_config import RabbitMqConfig
from edge_agent.common.config import (
    HttpConfig,
    LogConfig,
    MqttConfig,
    Strict,
    TlsConfig,
    parse_bytes,
    parse_config,
    read_yaml,
)
from edge_agent.common.envelope import MAX_MESSAGE_BYTES
from edge_agent.common.wire import STREAMS


MAX_WORKERS = 64


class BridgeMqttConfig(MqttConfig):
    share_group: str = Field("bridge", pattern=r"^[^#+/]+$")
    client_id: str = "bridge-1"  # worker 1's; worker i's is "<client_id>-w<i>" (worker_client_id)


class SaslConfig(Strict):
    mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-512"
    username: str
    password_env: str


class KafkaConfig(Strict):
    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl: SaslConfig | None = None
    ssl: TlsConfig | None = None
    producer: dict[str, Any] = {}  # extra librdkafka settings

    @model_validator(mode="after")
    def _sasl_when_needed(self) -> "KafkaConfig":
        if self.security_protocol.startswith("SASL") and self.sasl is None:
            raise ValueError(f"security_protocol {self.security_protocol} needs a sasl section")
        return self


class RetryConfig(Strict):
    max_attempts: int = Field(5, ge=1)
    delay_s: float = Field(2.0, ge=0)
    backoff: Literal["exponential", "linear", "fixed"] = "exponential"
    max_delay_s: float = Field(60.0, ge=0)


class DlqConfig(Strict):
    topic: str = "dlq"


class TokenConfig(Strict):
    token_env: str
    role: Literal["admin", "system", "auditor"]


class BridgeHttpConfig(HttpConfig):
    listen: str = "127.0.0.1:8080"  # checked by HttpConfig's validator
    tokens: list[TokenConfig] = []
    device_id: str | None = None  # envelope device_id of API publishes; default: mqtt.client_id
    docs: bool = False  # serve /docs, /redoc and /openapi.json (off: they map the API for anyone)


class BridgeConfig(Strict):
    mqtt: BridgeMqttConfig = BridgeMqttConfig()
    # The central broker: kafka (the default) or rabbitmq, never both (DESIGN "Configuration file").
    kafka: KafkaConfig = KafkaConfig()
    rabbitmq: RabbitMqConfig | None = None
    retry: RetryConfig = RetryConfig()
    dlq: DlqConfig = DlqConfig()
    http: BridgeHttpConfig = BridgeHttpConfig()
    # uplink stream -> Kafka topic
    topics: dict[str, str] = {s: s for s in STREAMS}
    max_message_bytes: int = MAX_MESSAGE_BYTES  # the agent bounds its envelopes by the same figure
    max_inflight: int = Field(5000, ge=1)  # MQTT messages received and not yet settled
    dedupe_window: int = Field(100_000, ge=0)  # envelope ids remembered
    ack_interval_ms: float = Field(50.0, gt=0)
    ack_batch: int = Field(500, ge=1)
    stall_timeout_s: float = Field(10.0, gt=0)  # no delivery report while records queued: new producer
    workers: int = Field(1, ge=1, le=MAX_WORKERS)  # worker processes, one MQTT session each, one share group
    log: LogConfig = LogConfig()

    _parse_size = field_validator("max_message_bytes", mode="before")(lambda cls, v: parse_bytes(v))

    @model_validator(mode="before")
    @classmethod
    def _one_central_broker(cls, data: Any) -> Any:
        # A dumped config carries both keys (kafka at its defaults, or rabbitmq: null): only a
        # rabbitmq section beside a kafka section that says something is two brokers.
        if isinstance(data, dict) and data.get("rabbitmq") is not None and data.get("kafka") not in (None, {}):
            if not isinstance(data["kafka"], dict) or KafkaConfig.model_validate(data["kafka"]) != KafkaConfig():
                raise ValueError("name one central broker: a kafka section or a rabbitmq section, not both")
        return data

    @property
    def broker(self) -> Literal["kafka", "rabbitmq"]:
        return "rabbitmq" if self.rabbitmq is not None else "kafka"

    def file_problems(self) -> list[str]:
        """TLS files this config names that the bridge could not read (check-config)."""
        problems = self.mqtt.tls.file_problems("mqtt.tls") if self.mqtt.tls else []
        if self.rabbitmq is not None:
            return problems + self.rabbitmq.file_problems()
        return problems + (self.kafka.ssl.file_problems("kafka.ssl") if self.kafka.ssl else [])


def worker_client_id(client_id: str, workers: int, index: int) -> str:
    """The MQTT client id of worker ``index`` (0-based): the first keeps ``client_id``, so a
    bridge going from one worker to several keeps its session."""
    if not 0 <= index < workers:
        raise ValueError(f"worker index {index} out of range for {workers} workers")
    return client_id if index == 0 else f"{client_id}-w{index + 1}"


def parse_bridge(data: dict[str, Any]) -> BridgeConfig:
    return parse_config(BridgeConfig, data)


def load_bridge(path: Path) -> BridgeConfig:
    return parse_bridge(read_yaml(path))
