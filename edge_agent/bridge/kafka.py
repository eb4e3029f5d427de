"""librdkafka settings for the bridge and for anyone else who talks to the central Kafka,
and the bridge's policy for records Kafka did not take (retry, back off, dead-letter).

``kafka_client_config`` is public: the HTTP API builds its AdminClient and Consumer
from it, so that security settings live in exactly one place.
"""

from __future__ import annotations

import os
import random
from typing import Any, Literal, NamedTuple

from confluent_kafka import KafkaError

from edge_agent.bridge.config import KafkaConfig, RetryConfig
from edge_agent.common.config import ConfigError
from edge_agent.common.logs import clip

DLQ_TEXT_CHARS = 1000  # dlq-error and dlq-source-topic are cut to this (a topic may be 64 KB)

# Delivery errors that say nothing about the record itself: the broker was
# unreachable, stuck, or we purged the record to hand it to a fresh producer.
# They never count as an attempt (a DOWN broker must not fill the DLQ).
NOT_THE_RECORDS_FAULT: frozenset[int] = frozenset({
    KafkaError._MSG_TIMED_OUT,
    KafkaError._TIMED_OUT,
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._PURGE_QUEUE,
    KafkaError._PURGE_INFLIGHT,
    KafkaError._DESTROY,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError.NETWORK_EXCEPTION,
    KafkaError.UNKNOWN_PRODUCER_ID,
    KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
    KafkaError._FATAL,  # an idempotence failure of the producer: the watchdog replaces it
})

_PURGED = frozenset({KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT})

# What the bridge wants from its producer unless kafka.producer overrides it.
PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 2,  # the latency target (p95 <= 25 ms) beats bigger batches
    "batch.num.messages": 10000,
    # A record that cannot be delivered this long comes back to the bridge, which
    # sends it again (see NOT_THE_RECORDS_FAULT); short enough to notice, long
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


def is_records_fault(err: KafkaError) -> bool:
    """True when a delivery error is about the record (counts as an attempt), False for outages."""
    return err.code() not in NOT_THE_RECORDS_FAULT


def dlq_headers(reason: str, error: str, source_topic: str, attempts: int, first_failed_at: str) -> list[tuple[str, bytes]]:
    """The DESIGN headers of a dead letter; the error and topic are the sender's, so they are clipped."""
    return [
        ("dlq-reason", reason.encode()),
        ("dlq-error", clip(error, DLQ_TEXT_CHARS).encode("utf-8", "replace")),
        ("dlq-source-topic", clip(source_topic, DLQ_TEXT_CHARS).encode("utf-8", "replace")),
        ("dlq-attempts", str(attempts).encode()),
        ("dlq-first-failed-at", first_failed_at.encode()),
    ]


# --- the bridge's retry policy ------------------------------------------------------------------

def retry_delay(attempt: int, cfg: RetryConfig, rng: random.Random | None = None) -> float:
    """Seconds before attempt ``attempt + 1``: exponential (or fixed), capped, with equal jitter."""
    base = cfg.delay_s * (2 ** (attempt - 1) if cfg.backoff == "exponential" else 1)
    base = min(base, cfg.max_delay_s)
    # Half fixed, half random: spread the retries of many records without ever retrying at once.
    return base / 2 + (rng or random).uniform(0, base / 2)


class Plan(NamedTuple):
    action: Literal["send_again", "dead_letter"]
    delay: float = 0.0
    reason: str = ""
    counts: bool = False  # whether this failure uses up one of retry.max_attempts


def plan_after_failure(err: KafkaError, attempts: int, is_dead_letter: bool, cfg: RetryConfig) -> Plan:
    """What to do with a record whose delivery failed with ``err`` after ``attempts`` counted failures.

    Outages (timeouts, purges, a stuck producer) never count: the record waits for Kafka.
    A record refused by the broker for good is dead-lettered at once; retriable refusals
    back off until max_attempts. A dead letter itself is never given up on.
    """
    if not is_records_fault(err):
        return Plan("send_again", 0.0 if err.code() in _PURGED else 0.5)
    attempts += 1
    if is_dead_letter or (err.retriable() and attempts < cfg.max_attempts):
        return Plan("send_again", retry_delay(attempts, cfg), counts=True)
    return Plan("dead_letter", reason="retries_exhausted" if err.retriable() else "rejected", counts=True)
