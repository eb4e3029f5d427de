"""librdkafka settings for the bridge and for anyone else who talks to the central Kafka,
and the headers of a dead letter. (What to do with a record Kafka did not take: ``retry``.)

``kafka_client_config`` is public: the HTTP API builds its AdminClient and Consumer
from it, so that security settings live in exactly one place.
"""

from __future__ import annotations

import os
from typing import Any

from edge_agent.bridge.config import KafkaConfig
from edge_agent.common.config import ConfigError
from edge_agent.common.logs import clip
from edge_agent.common.wire import (
    DLQ_ATTEMPTS,
    DLQ_ERROR,
    DLQ_FIRST_FAILED_AT,
    DLQ_REASON,
    DLQ_SOURCE_TOPIC,
)

DLQ_TEXT_CHARS = 1000  # dlq-error and dlq-source-topic are cut to this (a topic may be 64 KB)

# What the bridge wants from its producer unless kafka.producer overrides it.
PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 2,  # the latency target (README) beats bigger batches
    "batch.num.messages": 10000,
    # A record that cannot be delivered this long comes back to the bridge, which
    # sends it again (see retry.NOT_THE_RECORDS_FAULT); short enough to notice, long
    # enough not to churn during a broker restart.
    "message.timeout.ms": 30000,
    "statistics.interval.ms": 1000,  # feeds health(): is any broker UP?
    "reconnect.backoff.ms": 100,
    "reconnect.backoff.max.ms": 2000,
}


def kafka_client_config(cfg: KafkaConfig) -> dict[str, Any]:
    """Connection and security settings (librdkafka names) shared by producer, consumer and admin.

    Raises ConfigError when the SASL password variable is not set, naming it.
    """
    conf: dict[str, Any] = {
        "bootstrap.servers": cfg.bootstrap_servers,
        "security.protocol": cfg.security_protocol,
    }
    if cfg.security_protocol.startswith("SASL") and cfg.sasl is not None:
        password = os.environ.get(cfg.sasl.password_env)
        if password is None:
            raise ConfigError([f"kafka.sasl.password_env: environment variable {cfg.sasl.password_env} is not set"])
        conf.update({"sasl.mechanism": cfg.sasl.mechanism, "sasl.username": cfg.sasl.username,
                     "sasl.password": password})
    if cfg.security_protocol.endswith("SSL") and cfg.ssl is not None:
        conf.update(_ssl_settings(cfg))
    return conf


def _ssl_settings(cfg: KafkaConfig) -> dict[str, Any]:
    ssl = cfg.ssl
    assert ssl is not None
    out: dict[str, Any] = {}
    if ssl.ca:
        out["ssl.ca.location"] = str(ssl.ca)
    if ssl.cert and ssl.key:
        out["ssl.certificate.location"] = str(ssl.cert)
        out["ssl.key.location"] = str(ssl.key)
    if ssl.insecure:
        # Same meaning as on the MQTT side: the chain is checked, the host name is not.
        out["ssl.endpoint.identification.algorithm"] = "none"
    return out


def producer_config(cfg: KafkaConfig) -> dict[str, Any]:
    """Client settings + the bridge's producer defaults + the operator's ``kafka.producer`` extras."""
    return {**kafka_client_config(cfg), **PRODUCER_DEFAULTS, **cfg.producer}


def dlq_headers(reason: str, error: str, source_topic: str, attempts: int, first_failed_at: str) -> list[tuple[str, bytes]]:
    """The DESIGN headers of a dead letter; the error and topic are the sender's, so they are clipped."""
    return [
        (DLQ_REASON, reason.encode()),
        (DLQ_ERROR, clip(error, DLQ_TEXT_CHARS).encode("utf-8", "replace")),
        (DLQ_SOURCE_TOPIC, clip(source_topic, DLQ_TEXT_CHARS).encode("utf-8", "replace")),
        (DLQ_ATTEMPTS, str(attempts).encode()),
        (DLQ_FIRST_FAILED_AT, first_failed_at.encode()),
    ]
