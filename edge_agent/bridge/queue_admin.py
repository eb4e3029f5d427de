"""Kafka-side answers for the bridge API: per-topic lag, consumers, dead letters, and DLQ retry.

Everything here blocks on the network (librdkafka admin calls, a consumer scan), so the
HTTP layer calls it from a worker thread, never from the event loop.

A note on the test broker (Tansu): it answers ListOffsets with a wrong high watermark
(the base offset of the last record batch + 1), so with batches of several records the
lag it lets us compute is too small; it also leaves ``members`` empty in DescribeGroups,
so ``consumerCount`` is 0 there. The fetch path reports the right high watermark, so the
dead-letter scans (which read to end of partition) are exact. The code is the standard
Kafka way; the tests check lag with one-record batches, which that broker gets right.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec
from pydantic import BaseModel, ValidationError

from edge_agent.bridge.validate import NotStrictJson, strict_envelope
from edge_agent.common.envelope import utc_now_iso
from edge_agent.common.logs import clip
from edge_agent.common.wire import DLQ_REASON, DLQ_RETRIED_AT, DLQ_SOURCE_TOPIC

log = logging.getLogger(__name__)

# Poison (bad JSON, not an envelope, spoofed device, too large) would only poison the
# source topic again: retry re-sends letters that failed for a passing reason.
RETRIABLE_REASONS = frozenset({"retries_exhausted"})
RETRY_GROUP_PREFIX = "edge-dlq-retrier"


class GroupLag(BaseModel):
    group: str
    lag: int
    members: int


class TopicStatus(BaseModel):
    topic: str
    lag: int
    consumerCount: int  # noqa: N815 - the wire name DESIGN fixes
    dlqSize: int  # noqa: N815
    groups: list[GroupLag] = []


class RetryResult(BaseModel):
    retried: int
    errors: int  # re-publishes that failed, and letters refused (no dlq-reason, or no valid envelope)
    skipped: int = 0  # letters of this topic not retried because their reason is poison


class QueueAdminError(RuntimeError):
    """Kafka did not answer (unreachable, timed out): the API says 503."""


@dataclass
class _GroupView:
    group_id: str
    committed: dict[tuple[str, int], int] = field(default_factory=dict)
    # (member id, topics it is assigned; empty when the broker does not say)
    members: list[set[str]] = field(default_factory=list)


def _header(msg: Message, name: str) -> str | None:
    for key, value in msg.headers() or []:
        if key == name and value is not None:
            return value.decode("utf-8", "replace")
    return None


def _refusal(msg: Message, reason: str | None) -> str | None:
    """Why a letter must not go back to its topic, or None.

    Only the bridge's own letters carry a reason; what it wrote for a passing failure is
    a valid envelope, so anything else was put in the DLQ by someone else.
    """
    if reason is None:
        return f"no {DLQ_REASON} header"
    try:
        strict_envelope(msg.value() or b"")
    except (NotStrictJson, ValidationError) as e:
        return f"not a valid envelope: {clip(str(e).replace(chr(10), ' '))}"
    return None


class KafkaQueueAdmin:
    """Reads lag and dead letters and re-publishes dead letters; one instance per process."""

    def __init__(self, client_config: dict[str, Any], dlq_topic: str, *, timeout_s: float = 10.0,
                 scan_limit: int = 200_000, source_topic: Callable[[str], str | None] = lambda s: s):
        self._base = dict(client_config)
        self.dlq_topic = dlq_topic
        # dlq-source-topic -> the Kafka topic it was meant for (the bridge writes the MQTT topic)
        self.source_topic = source_topic
        self.timeout_s = timeout_s
        self.scan_limit = scan_limit  # most dead letters one scan reads (bounds the request time)
        self._admin = AdminClient(self._base)
        self._producer: Producer | None = None
        self._retry_lock = threading.Lock()  # two concurrent retries would send the same letters twice

    # --- status ------------------------------------------------------------------------

    def status(self, topics: Sequence[str]) -> list[TopicStatus]:
        ends, groups = self._lag_inputs(topics)
        dead = self.count_dead_letters(set(topics))
        return [self._topic_status(t, ends, groups, dead.get(t, 0)) for t in topics]

    def lags(self, topics: Sequence[str]) -> list[TopicStatus]:
        """Lag and consumers only (no DLQ scan, dlqSize 0): cheap enough for every scrape."""
        ends, groups = self._lag_inputs(topics)
        return [self._topic_status(t, ends, groups, 0) for t in topics]

    def _lag_inputs(self, topics: Sequence[str]) -> tuple[dict[tuple[str, int], int], list[_GroupView]]:
        partitions = self._partitions(topics)
        ends = self._high_watermarks([tp for tps in partitions.values() for tp in tps])
        return ends, self._group_views()

    @staticmethod
    def _topic_status(topic: str, ends: dict[tuple[str, int], int], groups: list[_GroupView],
                      dlq_size: int) -> TopicStatus:
        per_group = []
        for g in groups:
            mine = {tp: off for tp, off in g.committed.items() if tp[0] == topic}
            assigned = [m for m in g.members if topic in m]
            if not mine and not assigned:
                continue  # this group does not read the topic
            # Tansu's high watermark can be below a committed offset: never report negative lag.
            lag = sum(max(0, ends.get(tp, 0) - off) for tp, off in mine.items())
            # A member whose assignment the broker does not report still belongs to a reading group.
            members = len(assigned) + sum(1 for m in g.members if not m)
            per_group.append(GroupLag(group=g.group_id, lag=lag, members=members))
        return TopicStatus(topic=topic, lag=sum(g.lag for g in per_group),
                           consumerCount=sum(g.members for g in per_group), dlqSize=dlq_size,
                           groups=per_group)

    def _partitions(self, topics: Iterable[str]) -> dict[str, list[TopicPartition]]:
        try:
            md = self._admin.list_topics(timeout=self.timeout_s)
        except KafkaException as e:
            raise QueueAdminError(f"Kafka metadata: {e}") from e
        return {t: [TopicPartition(t, p) for p in sorted(md.topics[t].partitions)]
                for t in topics if t in md.topics and md.topics[t].error is None}

    def _high_watermarks(self, tps: list[TopicPartition]) -> dict[tuple[str, int], int]:
        return self._offsets(tps, OffsetSpec.latest())

    def _start_offsets(self, tps: list[TopicPartition]) -> dict[tuple[str, int], int]:
        # An explicit start offset: with OFFSET_BEGINNING librdkafka looks it up first, a slower scan
        # (docs/bridge.md).
        return self._offsets(tps, OffsetSpec.earliest())

    def _offsets(self, tps: list[TopicPartition], spec: OffsetSpec) -> dict[tuple[str, int], int]:
        if not tps:
            return {}
        futures = self._admin.list_offsets({tp: spec for tp in tps}, request_timeout=self.timeout_s)
        return {(tp.topic, tp.partition): self._result(f).offset for tp, f in futures.items()}

    def _group_views(self) -> list[_GroupView]:
        listed = self._result(self._admin.list_consumer_groups(request_timeout=self.timeout_s))
        ids = sorted(g.group_id for g in listed.valid)
        if not ids:
            return []
        views = {gid: _GroupView(gid) for gid in ids}
        for gid, fut in self._admin.describe_consumer_groups(ids, request_timeout=self.timeout_s).items():
            desc = self._result(fut)
            views[gid].members = [{tp.topic for tp in (m.assignment.topic_partitions if m.assignment else [])}
                                  for m in desc.members]
        # librdkafka takes one group per offsets request
        for gid in ids:
            fut = self._admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(gid)],
                                                          request_timeout=self.timeout_s)[gid]
            views[gid].committed = {(tp.topic, tp.partition): tp.offset
                                    for tp in self._result(fut).topic_partitions if tp.offset >= 0}
        return list(views.values())

    def _result(self, fut: Any) -> Any:
        try:
            return fut.result(timeout=self.timeout_s + 1)
        except KafkaException as e:
            raise QueueAdminError(f"Kafka admin: {e}") from e
        except TimeoutError as e:  # concurrent.futures.TimeoutError is TimeoutError since 3.11
            raise QueueAdminError("Kafka admin: timed out") from e

    # --- dead letters ------------------------------------------------------------------

    def count_dead_letters(self, topics: set[str]) -> dict[str, int]:
        """Dead letters per ``dlq-source-topic`` among ``topics``: a bounded scan of the whole DLQ."""
        counts: dict[str, int] = defaultdict(int)
        consumer = self._consumer(f"{RETRY_GROUP_PREFIX}-scan-{uuid.uuid4().hex[:8]}")
        try:
            parts = self._partitions([self.dlq_topic]).get(self.dlq_topic, [])
            starts = self._start_offsets(parts)
            consumer.assign([TopicPartition(tp.topic, tp.partition,
                                            starts.get((tp.topic, tp.partition), OFFSET_BEGINNING))
                             for tp in parts])
            for msg in self._read_to_end(consumer, len(parts), self.scan_limit):
                source = self._source_of(msg)
                if source in topics:
                    counts[source] += 1
        finally:
            consumer.close()
        return dict(counts)

    def retry_dead_letters(self, topic: str, max_messages: int) -> RetryResult:
        """Re-publish up to ``max_messages`` dead letters of ``topic`` to it.

        Progress is a committed offset of a consumer group per source topic on the DLQ, so a
        second call starts after what the first one re-sent; the commit never passes a letter
        whose re-publish failed, so a failure is retried by the next call (at least once).
        """
        with self._retry_lock:
            return self._retry_locked(topic, max_messages)

    def _retry_locked(self, topic: str, max_messages: int) -> RetryResult:
        consumer = self._consumer(f"{RETRY_GROUP_PREFIX}.{topic}")
        producer = self._retry_producer()
        failed_at: dict[int, int] = {}  # partition -> lowest offset whose re-publish failed
        next_offset: dict[int, int] = {}
        retried = skipped = refused = 0
        errors: list[int] = [0]

        def on_delivery(partition: int, offset: int):
            def report(err: KafkaError | None, _msg: Message) -> None:
                if err is not None:
                    errors[0] += 1
                    failed_at[partition] = min(failed_at.get(partition, offset), offset)
                    log.warning("dlq retry failed", extra={"topic": topic})
            return report

        try:
            parts = self._partitions([self.dlq_topic]).get(self.dlq_topic, [])
            start = self._committed_or_beginning(consumer, parts)
            consumer.assign(start)
            for msg in self._read_to_end(consumer, len(parts), self.scan_limit):
                if retried >= max_messages:
                    break
                next_offset[msg.partition()] = msg.offset() + 1
                if self._source_of(msg) != topic:
                    continue
                reason = _header(msg, DLQ_REASON)
                if reason is not None and reason not in RETRIABLE_REASONS:
                    skipped += 1
                    continue
                refusal = _refusal(msg, reason)
                if refusal is not None:
                    # Left in the DLQ, and passed: it will not become retriable by waiting.
                    refused += 1
                    log.warning("dlq retry refused a letter: %s", refusal, extra={"topic": topic})
                    continue
                report = on_delivery(msg.partition(), msg.offset())
                if not self._republish(producer, topic, msg, report):
                    report(KafkaError(KafkaError._INVALID_ARG), msg)  # refused before sending: an error
                retried += 1
            left = producer.flush(self.timeout_s)
            if left:
                raise QueueAdminError(f"Kafka did not confirm {left} re-published letters in time")
            commits = [TopicPartition(self.dlq_topic, p, min(off, failed_at.get(p, off)))
                       for p, off in next_offset.items()]
            if commits:
                consumer.commit(offsets=commits, asynchronous=False)
        except KafkaException as e:
            raise QueueAdminError(f"Kafka: {e}") from e
        finally:
            consumer.close()
        return RetryResult(retried=retried - errors[0], errors=errors[0] + refused, skipped=skipped)

    def _republish(self, producer: Producer, topic: str, msg: Message,
                   report: Callable[[KafkaError | None, Message], None]) -> bool:
        """Queue one letter for ``topic`` with its headers + ``dlq-retried-at``; False if refused locally."""
        headers = list(msg.headers() or []) + [(DLQ_RETRIED_AT, utc_now_iso().encode())]
        for _ in range(2):
            try:
                producer.produce(topic, value=msg.value(), key=msg.key(), headers=headers, on_delivery=report)
                producer.poll(0)
                return True
            except BufferError:  # the local queue is full: let deliveries drain, then try once more
                producer.poll(1.0)
            except KafkaException as e:
                log.warning("dlq retry to %s refused: %s", topic, e)
                return False
        return False

    def _source_of(self, msg: Message) -> str | None:
        header = _header(msg, DLQ_SOURCE_TOPIC)
        return self.source_topic(header) if header is not None else None

    def _committed_or_beginning(self, consumer: Consumer, parts: list[TopicPartition]) -> list[TopicPartition]:
        if not parts:
            return []
        committed = consumer.committed([TopicPartition(tp.topic, tp.partition) for tp in parts],
                                       timeout=self.timeout_s)
        starts = self._start_offsets(parts)
        return [TopicPartition(tp.topic, tp.partition,
                               tp.offset if tp.offset >= 0 else starts.get((tp.topic, tp.partition), OFFSET_BEGINNING))
                for tp in committed]

    def _read_to_end(self, consumer: Consumer, n_partitions: int, limit: int) -> Iterator[Message]:
        """Messages of the assigned partitions until each reports end of partition (bounded)."""
        at_end: set[int] = set()
        seen = 0
        deadline = time.monotonic() + self.timeout_s
        while len(at_end) < n_partitions and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=500, timeout=0.2):
                err = msg.error()
                if err is None:
                    seen += 1
                    yield msg
                    if seen >= limit:
                        log.warning("dlq scan stopped at %d letters", limit)
                        return
                elif err.code() == KafkaError._PARTITION_EOF:
                    at_end.add(msg.partition())
                else:
                    raise QueueAdminError(f"Kafka consumer: {err}")
        if len(at_end) < n_partitions:
            log.warning("dlq scan stopped after %.0f s before the end", self.timeout_s)

    def _consumer(self, group_id: str) -> Consumer:
        # Assigned, never subscribed: no group join (slow on some brokers), commits still work.
        return Consumer({**self._base, "group.id": group_id, "enable.auto.commit": False,
                         "enable.partition.eof": True, "auto.offset.reset": "earliest",
                         "fetch.wait.max.ms": 10})

    def _retry_producer(self) -> Producer:
        if self._producer is None:
            self._producer = Producer({**self._base, "enable.idempotence": True, "acks": "all",
                                       "linger.ms": 5})
        return self._producer

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(self.timeout_s)
