"""The bridge's policy for records the central broker did not take (send again, back off,
dead-letter), and the heap of records waiting for their next try.

Pure: ``plan_after_failure`` decides from the error (a ``sink.SendError``, whichever broker), the
attempts so far and the config, so that every rule is tested without a broker. Which Kafka
errors are the record's fault is decided here too (``is_records_fault``); RabbitMQ's are
decided by its sink (``rabbitmq``).
"""

from __future__ import annotations

import heapq
import itertools
import random
from typing import Generic, Literal, NamedTuple, TypeVar

from confluent_kafka import KafkaError

from edge_agent.bridge.config import RetryConfig
from edge_agent.bridge.sink import SendError
from edge_agent.common.backoff import backoff_delay

__all__ = ["NOT_THE_RECORDS_FAULT", "Plan", "RetryHeap", "is_purge", "is_records_fault", "plan_after_failure",
           "retry_delay"]

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
OUTAGE_RESEND_S = 0.5  # a record an outage sent back waits this long (a purged one goes at once)


def is_records_fault(err: KafkaError) -> bool:
    """True when a Kafka delivery error is about the record (counts as an attempt), False for outages."""
    return err.code() not in NOT_THE_RECORDS_FAULT


def is_purge(err: KafkaError) -> bool:
    """The record was purged to go to a fresh producer: it may be sent again at once."""
    return err.code() in _PURGED


def retry_delay(attempt: int, cfg: RetryConfig, rng: random.Random | None = None) -> float:
    """Seconds before attempt ``attempt + 1``: exponential, linear or fixed, capped, with equal jitter.

    Half fixed, half random: the retries of many records spread out without ever coming at once.
    """
    if cfg.backoff == "linear":  # delay_s, 2 * delay_s, 3 * delay_s, ...
        delay = min(cfg.delay_s * max(1, attempt), cfg.max_delay_s)
        return delay / 2 + (rng or random).uniform(0, delay / 2)
    exponent_of = attempt if cfg.backoff == "exponential" else 1  # "fixed": always the first delay
    return backoff_delay(exponent_of, cfg.delay_s, cfg.max_delay_s, jitter="equal", rng=rng)


class Plan(NamedTuple):
    action: Literal["send_again", "dead_letter"]
    delay: float = 0.0
    reason: str = ""
    counts: bool = False  # whether this failure uses up one of retry.max_attempts


def plan_after_failure(err: SendError, attempts: int, is_dead_letter: bool, cfg: RetryConfig) -> Plan:
    """What to do with a record whose delivery failed with ``err`` after ``attempts`` counted failures.

    Outages (timeouts, purges, a stuck producer, a lost or blocked connection) never count: the
    record waits for the broker. A record refused by the broker for good is dead-lettered at
    once; retriable refusals back off until max_attempts. A dead letter itself is never given up on.
    """
    if not err.records_fault:
        return Plan("send_again", OUTAGE_RESEND_S if err.retry_after is None else err.retry_after)
    attempts += 1
    if is_dead_letter or (err.retriable and attempts < cfg.max_attempts):
        return Plan("send_again", retry_delay(attempts, cfg), counts=True)
    return Plan("dead_letter", reason="retries_exhausted" if err.retriable else "rejected", counts=True)


T = TypeVar("T")


class RetryHeap(Generic[T]):
    """Items waiting to be sent again, soonest due first (equal times: first scheduled first)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, T]] = []
        self._tiebreak = itertools.count()  # items themselves are never compared

    def __len__(self) -> int:
        return len(self._heap)

    def schedule(self, item: T, due: float) -> None:
        """Send ``item`` again at ``due`` (a time.monotonic() value)."""
        heapq.heappush(self._heap, (due, next(self._tiebreak), item))

    def pop_due(self, now: float) -> T | None:
        """The soonest item if it is due at ``now``, taken off the heap; else None."""
        if self._heap and self._heap[0][0] <= now:
            return heapq.heappop(self._heap)[2]
        return None

    def due_in(self, now: float) -> float:
        """Seconds until the soonest item is due (negative: overdue; inf: nothing waits)."""
        return self._heap[0][0] - now if self._heap else float("inf")
