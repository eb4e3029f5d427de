"""The bridge's bookkeeping of what is on its way: records, the dedupe window, the e2e acks owed."""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Hashable

from edge_agent.common.wire import (
    DLQ_ERROR,
    seq_ranges,  # the same compact ranges the agent's overflow events use
)

__all__ = ["AckBatcher", "DeadLettered", "DedupeKey", "MessageTag", "RecentIds", "Record"]

DedupeKey = tuple[str, str]  # (device_id, envelope id): one device cannot shadow another's ids
MessageTag = tuple[int, int]  # (MQTT connection number, mid): what to PUBACK, and on which connection


@dataclass(eq=False, slots=True)
class Record:
    """One Kafka record on its way, and what to settle once Kafka has it."""

    topic: str  # where it goes now (the DLQ topic once dead-lettered)
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    source: str  # the MQTT topic it came from, or "api"
    received: float  # time.monotonic() at arrival
    mids: list[MessageTag] = field(default_factory=list)  # the MQTT messages to PUBACK
    device: str | None = None  # who gets the end-to-end ack ...
    seq: int | None = None  # ... for this seq
    dedupe_key: DedupeKey | None = None
    future: Future | None = None
    dead: str | None = None  # the dlq-reason once dead-lettered
    attempts: int = 0
    first_failed_at: str | None = None

    def header(self, name: str) -> str:
        """The last value of header ``name`` (dead-lettering appends), or ""."""
        return next((v.decode("utf-8", "replace") for k, v in reversed(self.headers) if k == name), "")

    def dead_lettered(self) -> DeadLettered:
        """What an API caller waiting for this record gets once it went to the DLQ instead."""
        return DeadLettered(self.dead or "", self.header(DLQ_ERROR))


class DeadLettered(Exception):
    """A submitted record ended in the dead letter topic instead of its own."""

    def __init__(self, reason: str, error: str):
        super().__init__(f"dead-lettered ({reason}): {error}")
        self.reason = reason
        self.error = error


class RecentIds:
    """The ids Kafka confirmed most recently, at most ``size`` of them (oldest forgotten first)."""

    def __init__(self, size: int):
        self._size = size
        self._ids: OrderedDict[Hashable, None] = OrderedDict()

    def __contains__(self, id_: Hashable) -> bool:
        return id_ in self._ids

    def add(self, id_: Hashable) -> None:
        if self._size == 0:
            return
        self._ids[id_] = None
        self._ids.move_to_end(id_)
        while len(self._ids) > self._size:
            self._ids.popitem(last=False)


class AckBatcher:
    """End-to-end acks waiting to be published, per device; due by size or by age."""

    def __init__(self, interval_s: float, batch: int):
        self._interval_s = interval_s
        self._batch = batch
        self._seqs: dict[str, list[int]] = {}
        self._count = 0
        self._oldest = 0.0

    def add(self, device: str, seq: int, now: float) -> None:
        if self._count == 0:
            self._oldest = now
        self._seqs.setdefault(device, []).append(seq)
        self._count += 1

    def due_in(self, now: float) -> float:
        """Seconds until the next publish is due (inf when nothing waits)."""
        if self._count == 0:
            return float("inf")
        if self._count >= self._batch:
            return 0.0
        return max(0.0, self._oldest + self._interval_s - now)

    def take(self) -> dict[str, list[list[int]]]:
        out = {device: seq_ranges(seqs) for device, seqs in self._seqs.items()}
        self._seqs.clear()
        self._count = 0
        return out
