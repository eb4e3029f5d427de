"""librdkafka settings of the consumer and of its dead-letter producer, and a consumer dead
letter's headers: the bridge's ``dlq-*`` (one definition, ``edge_agent.bridge.kafka``) plus
the group, partition and offset the record came from."""

from __future__ import annotations

from typing import Any

from edge_agent.bridge.kafka import dlq_headers, kafka_client_config, producer_config
from edge_agent.consumer.config import ConsumerConfig

DLQ_CONSUMER_GROUP = "dlq-consumer-group"
DLQ_SOURCE_PARTITION = "dlq-source-partition"
DLQ_SOURCE_OFFSET = "dlq-source-offset"

# What the consumer needs from librdkafka unless ``consumer:`` overrides it.
CONSUMER_DEFAULTS: dict[str, Any] = {
    # Offsets are stored by the loop only once a record's effect is committed or it is in the dlq;
    # librdkafka commits what was stored (every second, on revoke and on close).
    "enable.auto.offset.store": False,
    "enable.auto.commit": True,
    "auto.commit.interval.ms": 1000,
    "auto.offset.reset": "earliest",  # a new group reads what the topics hold: nothing is skipped
    "max.poll.interval.ms": 300000,
    "session.timeout.ms": 10000,
    "heartbeat.interval.ms": 2000,
    "fetch.wait.max.ms": 50,  # the latency target beats fewer fetches
    "partition.assignment.strategy": "cooperative-sticky",  # a rebalance moves few partitions
    "statistics.interval.ms": 0,
}


def consumer_config(cfg: ConsumerConfig, group: str | None = None) -> dict[str, Any]:
    """Client settings + the consumer defaults + the operator's ``consumer:`` extras."""
    return {**kafka_client_config(cfg.kafka), **CONSUMER_DEFAULTS, "group.id": group or cfg.group,
            **cfg.consumer}


def dlq_producer_config(cfg: ConsumerConfig) -> dict[str, Any]:
    # Idempotent, acks=all (the bridge's defaults): a dead letter is the record's only copy we vouch for.
    return {**producer_config(cfg.kafka), "linger.ms": 0}


def consumer_dlq_headers(*, reason: str, error: str, topic: str, partition: int, offset: int, attempts: int,
                         first_failed_at: str, group: str) -> list[tuple[str, bytes]]:
    return [*dlq_headers(reason, error, topic, attempts, first_failed_at),
            (DLQ_CONSUMER_GROUP, group.encode()),
            (DLQ_SOURCE_PARTITION, str(partition).encode()),
            (DLQ_SOURCE_OFFSET, str(offset).encode())]
