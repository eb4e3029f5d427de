"""The consumer loop: poll a batch, write its effect, dead-letter what can never succeed, store
offsets only for what is done.

Rules (DESIGN "Downstream"), and where they live:
- a batch per poll goes to the sink in one write (``Sink.write``); an offset is stored only once
  the records up to it are committed there or are in the dlq (``_settle``);
- a record that fails on its own is retried with exponential backoff while its partition is
  paused and rewound to it (order per device is kept: nothing after it in that partition goes
  first); we keep polling while we wait, so the group never sees us past max.poll.interval.ms;
  after ``retry.max_attempts`` it goes to the dlq with reason ``sink_error``;
- a record that can never succeed (not JSON, not an envelope, not storable) goes to the dlq at once;
- a sink that is down pauses every partition (no attempt counted, nothing dead-lettered) until
  it answers again; health shows it;
- ``stop`` ends the loop after the batch in hand; closing the consumer commits the stored
  offsets and leaves the group.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from pydantic import ValidationError

from edge_agent.bridge.validate import NotStrictJson, strict_envelope
from edge_agent.common.backoff import Backoff, backoff_delay
from edge_agent.common.config import problem_lines
from edge_agent.common.envelope import utc_now_iso
from edge_agent.common.logs import clip
from edge_agent.common import metrics
from edge_agent.consumer.config import ConsumerConfig
from edge_agent.consumer.kafka import consumer_config, consumer_dlq_headers, dlq_producer_config
from edge_agent.consumer.sink import Item, PartialFailure, Poison, Sink, SinkDown, WriteResult

log = logging.getLogger(__name__)

TP = tuple[str, int]
LAG_EVERY_S = 5.0
DLQ_FLUSH_S = 10.0
POLL_WAIT_S = 0.2  # the longest a poll waits: stop, pauses and the auditor are looked at this often


def decode(msg: Message, sink: Sink) -> Item:
    """The record as an Item the sink has prepared, or Poison saying why it can never be one."""
    value = msg.value()
    if not value:
        raise Poison("invalid_json", "empty record")
    try:
        env = strict_envelope(value)
    except NotStrictJson as e:
        raise Poison("invalid_json", str(e)) from None
    except ValidationError as e:
        raise Poison("invalid_envelope", "; ".join(problem_lines(e, root="(envelope)")[:5])) from None
    item = Item(msg.topic(), msg.partition(), msg.offset(), env, value)
    sink.prepare(item)
    return item


@dataclass
class Letter:
    msg: Message
    reason: str
    error: str
    attempts: int
    first_failed_at: str


@dataclass
class Settlement:
    """What one batch came to, partition by partition."""

    done: dict[TP, int] = field(default_factory=dict)  # last offset done
    rewind: dict[TP, int] = field(default_factory=dict)  # offset to read again from
    pause_s: dict[TP, float] = field(default_factory=dict)  # paused for a retry this long
    letters: list[Letter] = field(default_factory=list)
    finished: list[Item] = field(default_factory=list)  # committed or dead-lettered envelopes
    sink_down: str | None = None


class SinkState:
    """A health part: the sink's reachability. Never 'dead' (a down database is waited out)."""

    name = "sink"

    def __init__(self) -> None:
        self.down_since: float | None = None
        self.last_error: str | None = None

    def dead(self) -> bool:
        return False

    def report(self) -> dict[str, Any]:
        if self.down_since is None:
            return {"state": "up", "last_error": self.last_error}
        return {"state": "down", "down_for_s": round(time.monotonic() - self.down_since, 1),
                "last_error": self.last_error, "consumption": "paused"}


class ConsumerLoop:
    """One consumer and its dlq producer. ``run`` is a SupervisedThread body."""

    def __init__(self, cfg: ConsumerConfig, sink: Sink, stop: threading.Event, *,
                 observe: Callable[[list[Item]], None] | None = None,
                 tick: Callable[[Producer], None] | None = None,
                 sink_state: SinkState | None = None):
        self.cfg = cfg
        self.sink = sink
        self.stop = stop
        self.observe = observe  # the sequence auditor's feed: every envelope that is done
        self.tick = tick  # called between polls (the auditor's check)
        self.sink_state = sink_state or SinkState()
        self.attempts: dict[tuple[str, int, int], tuple[int, str]] = {}
        self.paused_until: dict[TP, float] = {}
        self.sink_backoff = Backoff(min(0.2, cfg.retry.max_delay_s), max(cfg.retry.max_delay_s, 0.2))
        self.next_probe = 0.0
        self.consumer: Consumer | None = None
        self.producer: Producer | None = None
        self._lag_at = 0.0
        metrics.SINK_UP.labels(cfg.group).set(1)

    # --- life cycle --------------------------------------------------------------------------

    def kafka_consumer(self) -> Consumer:
        return Consumer(consumer_config(self.cfg), logger=log)

    def begin(self, consumer: Consumer) -> None:
        consumer.subscribe(self.cfg.topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                           on_lost=self._on_revoke)

    def run(self) -> None:
        self.paused_until = {}  # a restart after a crash starts with a new consumer: nothing paused
        self.consumer = self.kafka_consumer()
        self.producer = Producer(dlq_producer_config(self.cfg), logger=log)
        try:
            self.begin(self.consumer)
            self._check_sink_at_start()
            while not self.stop.is_set() and not self.finished():
                self.step()
        finally:
            self.close()

    def _check_sink_at_start(self) -> None:
        """Connect (and create the tables) now, so that health tells at once whether the sink is there."""
        try:
            self.sink.ping()
        except SinkDown as e:
            self._sink_went_down(str(e))

    def finished(self) -> bool:
        return False  # a group consumer runs until stopped; a replay ends (replay.py)

    def close(self) -> None:
        if self.producer is not None:
            self.producer.flush(DLQ_FLUSH_S)
        if self.consumer is not None:
            try:
                self.consumer.close()  # commits the stored offsets, leaves the group
            except (KafkaException, RuntimeError) as e:
                log.warning("closing the consumer: %s", e)
            self.consumer = None

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("assigned %s", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = {(p.topic, p.partition) for p in partitions}
        for tp in gone:
            self.paused_until.pop(tp, None)
        self.attempts = {k: v for k, v in self.attempts.items() if (k[0], k[1]) not in gone}
        metrics.PAUSED.labels(self.cfg.group).set(len(self.paused_until))

    # --- one step ----------------------------------------------------------------------------

    def step(self) -> None:
        consumer = self.consumer
        assert consumer is not None
        now = time.monotonic()
        self._resume_due(now)
        if self.sink_state.down_since is not None and now >= self.next_probe:
            self._probe_sink()
        if self.tick is not None and self.producer is not None:
            self.tick(self.producer)
        if now - self._lag_at >= LAG_EVERY_S:
            self._lag_at = now
            self._update_lag()
        if self.producer is not None:
            self.producer.poll(0)  # delivery reports of audit records
        records = [m for m in self._poll_batch(consumer) if self._is_record(m)]
        if not records:
            return
        for m in records:
            metrics.CONSUMED.labels(m.topic()).inc()
        records = self.accept(records)
        if self.sink_state.down_since is not None:
            self._rewind_all(records)  # fetched before the pause took effect: read them again later
            return
        self.handle(records)

    def _poll_batch(self, consumer: Consumer) -> list[Message]:
        """What is there now, up to batch_max; else wait (bounded) for the first record and take what
        came with it. consume(n, timeout) alone waits for n records or the timeout: that was the latency."""
        msgs = consumer.consume(self.cfg.batch_max, timeout=0)
        if msgs:
            return msgs
        first = consumer.poll(POLL_WAIT_S)
        if first is None:
            return []
        return [first, *consumer.consume(self.cfg.batch_max - 1, timeout=0)] if self.cfg.batch_max > 1 else [first]

    def accept(self, records: list[Message]) -> list[Message]:
        """The records this loop is to process (a replay drops those outside its window)."""
        return records

    @staticmethod
    def _is_record(msg: Message) -> bool:
        err = msg.error()
        if err is None:
            return True
        if err.fatal():  # e.g. the group or a topic is not authorized: the supervisor restarts us, health shows it
            raise KafkaException(err)
        if err.code() != KafkaError._PARTITION_EOF:
            log.warning("consumer: %s", err)
        return False

    def handle(self, records: list[Message]) -> None:
        """Write one batch, dead-letter, rewind and pause as needed, store offsets."""
        decoded: list[tuple[Message, Item | Poison]] = []
        for msg in records:
            try:
                decoded.append((msg, decode(msg, self.sink)))
            except Poison as p:
                decoded.append((msg, p))
        good = [d for _, d in decoded if isinstance(d, Item)]
        started = time.perf_counter()
        done, error = self._write(good)
        metrics.SINK_SECONDS.observe(time.perf_counter() - started)
        plan = self._settle(decoded, good, done, error)
        self._send_letters(plan)
        self._apply(plan)

    def _write(self, good: list[Item]) -> tuple[int, BaseException | None]:
        """(items committed, the error of the next one or None)."""
        if not good:
            return 0, None
        try:
            result = self.sink.write(good)
        except SinkDown as e:
            return 0, e
        except PartialFailure as pf:
            return pf.done, pf.error
        self._count(good, result)
        self.sink_state.last_error = None
        return len(good), None

    @staticmethod
    def _count(items: list[Item], result: WriteResult) -> None:
        for item in items:
            metrics.PROCESSED.labels(item.topic).inc()
        if result.duplicates and items:
            metrics.DUPLICATES.labels(items[0].topic).inc(result.duplicates)

    def _settle(self, decoded: list[tuple[Message, Item | Poison]], good: list[Item], done: int,
                error: BaseException | None) -> Settlement:
        plan = Settlement()
        index = {id(item): i for i, item in enumerate(good)}
        if error is not None and done:
            for item in good[:done]:
                metrics.PROCESSED.labels(item.topic).inc()
        for msg, what in decoded:
            tp = (msg.topic(), msg.partition())
            if tp in plan.rewind:
                continue  # something before it in its partition is not done: it waits its turn
            if isinstance(what, Poison):
                plan.letters.append(Letter(msg, what.reason, str(what), 1, utc_now_iso()))
                plan.done[tp] = msg.offset()
                continue
            i = index[id(what)]
            if i < done:
                plan.done[tp] = msg.offset()
                plan.finished.append(what)
                self.attempts.pop((tp[0], tp[1], msg.offset()), None)
            elif i == done and error is not None:
                self._failed(plan, msg, what, error)
            else:
                plan.rewind[tp] = msg.offset()  # not written: the batch stopped before it
        return plan

    def _failed(self, plan: Settlement, msg: Message, item: Item, error: BaseException) -> None:
        tp = (msg.topic(), msg.partition())
        if isinstance(error, Poison):
            plan.letters.append(Letter(msg, error.reason, str(error), 1, utc_now_iso()))
            plan.done[tp] = msg.offset()
            plan.finished.append(item)
            return
        if isinstance(error, SinkDown):
            plan.sink_down = str(error)
            plan.rewind[tp] = msg.offset()
            return
        key = (tp[0], tp[1], msg.offset())
        attempts, first = self.attempts.get(key, (0, utc_now_iso()))
        attempts += 1
        text = f"{type(error).__name__}: {error}"
        if attempts >= self.cfg.retry.max_attempts:
            log.error("%s[%d]@%d failed %d times, to the dlq: %s", tp[0], tp[1], msg.offset(), attempts, clip(text))
            self.attempts.pop(key, None)
            plan.letters.append(Letter(msg, "sink_error", text, attempts, first))
            plan.done[tp] = msg.offset()
            plan.finished.append(item)
            return
        self.attempts[key] = (attempts, first)
        delay = self._retry_delay(attempts)
        log.warning("%s[%d]@%d failed (attempt %d of %d), partition paused %.2fs: %s", tp[0], tp[1],
                    msg.offset(), attempts, self.cfg.retry.max_attempts, delay, clip(text))
        metrics.RETRIED.labels(tp[0]).inc()
        plan.rewind[tp] = msg.offset()
        plan.pause_s[tp] = delay

    def _retry_delay(self, attempts: int) -> float:
        r = self.cfg.retry
        if r.backoff == "fixed":
            return min(r.delay_s, r.max_delay_s)
        return backoff_delay(attempts, r.delay_s, r.max_delay_s)

    # --- dead letters ------------------------------------------------------------------------

    def _send_letters(self, plan: Settlement) -> None:
        """Produce the batch's dead letters and wait for Kafka; a letter Kafka did not take makes its
        partition read it again (its offset is not stored)."""
        if not plan.letters:
            return
        producer = self.producer
        assert producer is not None
        failed: dict[int, str] = {}
        for n, letter in enumerate(plan.letters):
            msg = letter.msg
            headers = list(msg.headers() or []) + consumer_dlq_headers(
                reason=letter.reason, error=letter.error, topic=msg.topic(), partition=msg.partition(),
                offset=msg.offset(), attempts=letter.attempts, first_failed_at=letter.first_failed_at,
                group=self.cfg.group)

            def report(err: KafkaError | None, _m: Message, n: int = n) -> None:
                if err is not None:
                    failed[n] = str(err)
            try:
                producer.produce(self.cfg.dlq.topic, value=msg.value(), key=msg.key(), headers=headers,
                                 on_delivery=report)
            except (KafkaException, BufferError) as e:
                failed[n] = str(e)
        left = producer.flush(DLQ_FLUSH_S)
        for n, letter in enumerate(plan.letters):
            tp, offset = (letter.msg.topic(), letter.msg.partition()), letter.msg.offset()
            if n in failed or left:
                log.error("dead letter of %s[%d]@%d not taken by Kafka (%s): reading it again", tp[0], tp[1], offset,
                          failed.get(n, "flush timed out"))
                plan.rewind[tp] = min(plan.rewind.get(tp, offset), offset)
                plan.pause_s[tp] = max(plan.pause_s.get(tp, 0.0), self.cfg.retry.delay_s)
                plan.done[tp] = min(plan.done.get(tp, offset), offset - 1)
            else:
                metrics.DEAD_LETTERED.labels(letter.reason).inc()
                log.warning("dead-lettered %s[%d]@%d: %s: %s", tp[0], tp[1], offset, letter.reason,
                            clip(letter.error))

    # --- after a batch -----------------------------------------------------------------------

    def _apply(self, plan: Settlement) -> None:
        consumer = self.consumer
        assert consumer is not None
        if self.observe is not None and plan.finished:
            self.observe(plan.finished)
        for (topic, partition), offset in plan.rewind.items():
            self._seek(topic, partition, offset)
        now = time.monotonic()
        for tp, delay in plan.pause_s.items():
            self._pause([tp], now + delay)
        stores = [TopicPartition(t, p, o + 1) for (t, p), o in plan.done.items()
                  if o + 1 <= plan.rewind.get((t, p), o + 1)]
        if stores:
            self.store(stores)
        if plan.sink_down is not None:
            self._sink_went_down(plan.sink_down)

    def store(self, offsets: list[TopicPartition]) -> None:
        try:
            self.consumer.store_offsets(offsets=offsets)  # type: ignore[union-attr]
        except KafkaException as e:  # revoked meanwhile: the new owner reads them again (no-ops)
            log.info("offsets not stored: %s", e)

    def _seek(self, topic: str, partition: int, offset: int) -> None:
        try:
            self.consumer.seek(TopicPartition(topic, partition, offset))  # type: ignore[union-attr]
        except KafkaException as e:
            log.info("seek %s[%d]@%d: %s (revoked?)", topic, partition, offset, e)

    def _rewind_all(self, records: list[Message]) -> None:
        first: dict[TP, int] = {}
        for m in records:
            first.setdefault((m.topic(), m.partition()), m.offset())
        for (topic, partition), offset in first.items():
            self._seek(topic, partition, offset)
        self._pause_assignment()

    # --- pausing -----------------------------------------------------------------------------

    def _pause(self, tps: list[TP], until: float) -> None:
        try:
            self.consumer.pause([TopicPartition(t, p) for t, p in tps])  # type: ignore[union-attr]
        except KafkaException as e:
            log.info("pause: %s", e)
        for tp in tps:
            self.paused_until[tp] = until
        metrics.PAUSED.labels(self.cfg.group).set(len(self.paused_until))

    def _resume_due(self, now: float) -> None:
        if self.sink_state.down_since is not None:
            return
        due = [tp for tp, until in self.paused_until.items() if until <= now]
        if not due:
            return
        try:
            self.consumer.resume([TopicPartition(t, p) for t, p in due])  # type: ignore[union-attr]
        except KafkaException as e:
            log.info("resume: %s", e)
        for tp in due:
            del self.paused_until[tp]
        metrics.PAUSED.labels(self.cfg.group).set(len(self.paused_until))

    def _pause_assignment(self) -> None:
        assigned = [(p.topic, p.partition) for p in self.consumer.assignment()]  # type: ignore[union-attr]
        self._pause(assigned, float("inf"))

    def _sink_went_down(self, error: str) -> None:
        if self.sink_state.down_since is None:
            log.error("sink down, consumption paused: %s", clip(error))
            self.sink_state.down_since = time.monotonic()
            metrics.SINK_UP.labels(self.cfg.group).set(0)
        self.sink_state.last_error = clip(error, 500)
        self._pause_assignment()
        self.next_probe = time.monotonic() + self.sink_backoff.next_delay()

    def _probe_sink(self) -> None:
        try:
            self.sink.ping()
        except SinkDown as e:
            self.sink_state.last_error = clip(str(e), 500)
            self._pause_assignment()  # partitions assigned while down
            self.next_probe = time.monotonic() + self.sink_backoff.next_delay()
            return
        log.info("sink back after %.1fs: resuming", time.monotonic() - (self.sink_state.down_since or 0))
        self.sink_state.down_since = None
        self.sink_backoff.reset()
        metrics.SINK_UP.labels(self.cfg.group).set(1)
        self.paused_until = {tp: 0.0 for tp in self.paused_until}  # retries wait no longer than the outage
        self._resume_due(time.monotonic())

    # --- lag ---------------------------------------------------------------------------------

    def _update_lag(self) -> None:
        consumer = self.consumer
        if consumer is None:
            return
        try:
            for tp in consumer.position(consumer.assignment()):
                if tp.offset < 0:
                    continue
                # cached: the last fetch response's watermark, no broker round trip in the loop
                _low, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), cached=True)
                if high < 0:
                    continue
                metrics.LAG.labels(tp.topic, str(tp.partition)).set(max(0, high - tp.offset))
        except KafkaException as e:
            log.debug("lag: %s", e)
