"""Reading what reached Kafka in tests: by partition assignment, never a consumer group (see kafka.py)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

from edge_testkit.kafka import (
    TANSU_CONSUMER_DEFAULTS,
    KafkaTarget,
    client_config,
    create_topics,
)
from edge_testkit.processes import WaitTimeout, wait_for


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]  # last value wins for a repeated header name
    timestamp_ms: int

    def json(self) -> Any:
        import json

        return json.loads(self.value or b"null")


def _record(msg: Any) -> Record:
    return Record(topic=msg.topic(), partition=msg.partition(), offset=msg.offset(), key=msg.key(),
                  value=msg.value(), headers={k: v for k, v in (msg.headers() or [])},
                  timestamp_ms=msg.timestamp()[1])


def _assigning_consumer(target: KafkaTarget, extra: Mapping[str, Any] | None = None) -> Any:
    from confluent_kafka import Consumer

    # A group id is mandatory for librdkafka even when we only assign; nothing is committed.
    conf = {**client_config(target), **TANSU_CONSUMER_DEFAULTS, "group.id": "edge-tests-reader",
            "enable.partition.eof": True, **(extra or {})}
    return Consumer(conf)


def _partitions(consumer: Any, topic: str, timeout: float) -> list[int]:
    def listed() -> list[int]:
        md = consumer.list_topics(topic, timeout=2.0).topics.get(topic)
        if md is None or md.error is not None or not md.partitions:
            return []
        return sorted(md.partitions)

    return wait_for(listed, timeout, interval=0.05, message=f"topic {topic} in metadata")


def consume_all(target: KafkaTarget, topic: str, expect_n: int, timeout: float = 30.0,
                settle_s: float = 0.0) -> list[Record]:
    """Records of ``topic`` from the beginning, until ``expect_n`` are read or ``timeout`` passes.

    Returns what was read (possibly fewer: the caller asserts). ``settle_s`` keeps
    reading that long after ``expect_n`` is reached, to catch duplicates/extras.
    Reads by partition assignment, no consumer group (a Tansu group join takes seconds).
    """
    from confluent_kafka import TopicPartition

    deadline = time.monotonic() + timeout
    consumer = _assigning_consumer(target)
    records: list[Record] = []
    try:
        try:
            parts = _partitions(consumer, topic, timeout)
        except WaitTimeout:
            return []  # the topic never appeared: nothing was produced to it
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        settle_until: float | None = None
        while True:
            now = time.monotonic()
            if now >= deadline or (settle_until is not None and now >= settle_until):
                break
            msg = consumer.poll(0.05)
            if msg is not None and msg.error() is None:
                records.append(_record(msg))
            elif msg is not None and msg.error().fatal():
                raise RuntimeError(f"consuming {topic}: {msg.error()}")
            # Other errors (EOF, a broker restarting) are transient: keep reading until the deadline.
            if settle_until is None and len(records) >= expect_n:
                settle_until = time.monotonic() + settle_s
    finally:
        consumer.close()
    return records


def read_topic(target: KafkaTarget, topic: str, idle_s: float = 0.5, timeout: float = 30.0) -> list[Record]:
    """Every record now in ``topic``: reads until nothing new came for ``idle_s``; [] if it does not exist.

    A quiet period, not the high watermark: Tansu 0.6 reports the high watermark
    as (base offset of the LAST BATCH + 1), e.g. 1 after one batch of 25 records,
    so watermark-based "read to the end" (and lag) is wrong against Tansu.
    """
    from confluent_kafka import TopicPartition

    consumer = _assigning_consumer(target)
    records: list[Record] = []
    try:
        md = consumer.list_topics(topic, timeout=min(timeout, 10.0)).topics.get(topic)
        if md is None or md.error is not None or not md.partitions:
            return []
        consumer.assign([TopicPartition(topic, p, 0) for p in md.partitions])
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - last_new < idle_s:
            msg = consumer.poll(0.05)
            if msg is not None and msg.error() is None:
                records.append(_record(msg))
                last_new = time.monotonic()
            elif msg is not None and msg.error().fatal():
                raise RuntimeError(f"reading {topic}: {msg.error()}")
    finally:
        consumer.close()
    return records


class TopicRecorder:
    """Reads topics in a background thread from the beginning, surviving broker restarts.

    Tansu forgets everything on restart, so outage tests record records as they
    arrive. After a restart Tansu's offsets start again at 0 but a fetch beyond
    its end answers "no data" rather than OFFSET_OUT_OF_RANGE, so
    ``auto.offset.reset`` never fires. Instead: after any transport error the
    recorder rewinds every partition to 0 and skips records it already holds
    (same topic, partition, offset, timestamp, key and value).
    """

    def __init__(self, target: KafkaTarget, topics: Sequence[str], partitions: int = 1):
        import threading

        self.target = target
        self.topics = list(topics)
        self.partitions = partitions
        self.records: list[Record] = []
        self._seen: set[tuple[Any, ...]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._rewind = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="topic-recorder", daemon=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 20.0) -> TopicRecorder:
        create_topics(self.target, self.topics, partitions=self.partitions)
        self._rewind.set()
        self._thread.start()
        wait_for(self._ready.is_set, timeout, message="recorder assigned")
        return self

    def _on_error(self, err: Any) -> None:
        from confluent_kafka import KafkaError

        if err.code() in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN):
            self._rewind.set()

    def _assign_from_start(self, consumer: Any) -> bool:
        """Assign every partition of every topic at offset 0; False while a topic is not there yet."""
        from confluent_kafka import KafkaException, TopicPartition

        try:
            listed = consumer.list_topics(timeout=1.0).topics
        except KafkaException:
            return False
        assignment = []
        for topic in self.topics:
            md = listed.get(topic)
            if md is None or md.error is not None or not md.partitions:
                return False
            assignment += [TopicPartition(topic, p, 0) for p in md.partitions]
        consumer.assign(assignment)
        return True

    def _run(self) -> None:
        consumer = _assigning_consumer(self.target, {"enable.partition.eof": False, "error_cb": self._on_error})
        try:
            while not self._stop.is_set():
                if self._rewind.is_set():
                    self._rewind.clear()
                    if not self._assign_from_start(consumer):
                        self._rewind.set()
                        self._stop.wait(0.1)
                        continue
                    self._ready.set()
                msg = consumer.poll(0.05)
                if msg is not None and msg.error() is None:
                    self._keep(_record(msg))
        finally:
            consumer.close()

    def _keep(self, record: Record) -> None:
        identity = (record.topic, record.partition, record.offset, record.timestamp_ms, record.key, record.value)
        with self._lock:
            if identity not in self._seen:
                self._seen.add(identity)
                self.records.append(record)

    def snapshot(self, topic: str | None = None) -> list[Record]:
        with self._lock:
            return [r for r in self.records if topic is None or r.topic == topic]

    def wait_count(self, n: int, timeout: float, topic: str | None = None) -> list[Record]:
        """Wait until at least ``n`` records (of ``topic``) are recorded; returns them all."""
        def enough() -> list[Record] | None:
            got = self.snapshot(topic)
            return got if len(got) >= n else None

        return wait_for(enough, timeout, interval=0.05,
                        message=lambda: f"{n} records (have {len(self.snapshot(topic))})")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
