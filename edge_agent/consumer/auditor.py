"""The sequence auditor: per device, which seqs arrived; a hole older than the reorder timeout that
no ``outbox.overflow`` / ``outbox.reset`` event explains is a loss (DESIGN "Downstream").

Fed with every envelope whose record is done (committed or dead-lettered: it arrived either way).
A seq below everything seen for a device, once its first reorder window is over, is a device reset
(a new epoch), never a reason to drop the record as a duplicate. Before a hole is called a loss,
``confirm`` (the PostgreSQL sink's ``events`` table) may name seqs another consumer instance took.
"""

from __future__ import annotations

import bisect
import getpass
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from edge_agent.common.envelope import build, encode
from edge_agent.common import metrics

log = logging.getLogger(__name__)

OVERFLOW, RESET = "outbox.overflow", "outbox.reset"
CONSUMER_DEVICE_PREFIX = "consumer/"  # our own audit records: a '/' no MQTT device id can have


class RangeSet:
    """Disjoint sorted [lo, hi] ranges of ints; adding in order is O(1)."""

    def __init__(self) -> None:
        self.los: list[int] = []
        self.his: list[int] = []

    def __contains__(self, n: int) -> bool:
        i = bisect.bisect_right(self.los, n) - 1
        return i >= 0 and self.his[i] >= n

    def add(self, lo: int, hi: int) -> None:
        if self.his and lo > self.his[-1] + 1:
            self.los.append(lo)
            self.his.append(hi)
            return
        i = bisect.bisect_left(self.his, lo - 1)  # first range that may touch [lo, hi]
        j = bisect.bisect_right(self.los, hi + 1)  # ranges before j start at or before hi + 1
        if i < j:
            lo, hi = min(lo, self.los[i]), max(hi, self.his[j - 1])
        self.los[i:j] = [lo]
        self.his[i:j] = [hi]

    def missing(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The parts of [lo, hi] not covered."""
        out, at = [], lo
        i = max(0, bisect.bisect_right(self.los, lo) - 1)
        while at <= hi and i < len(self.los):
            if self.his[i] >= at:
                if self.los[i] > at:
                    out.append((at, min(hi, self.los[i] - 1)))
                at = self.his[i] + 1
            i += 1
        if at <= hi:
            out.append((at, hi))
        return out

    @property
    def low(self) -> int | None:
        return self.los[0] if self.los else None


@dataclass
class DeviceSeqs:
    started: float  # when this epoch was first seen (monotonic)
    high: int
    seen: RangeSet = field(default_factory=RangeSet)
    explained: RangeSet = field(default_factory=RangeSet)
    lost: RangeSet = field(default_factory=RangeSet)
    pending: list[tuple[int, int, float]] = field(default_factory=list)  # holes and when noticed
    missing: int = 0  # seqs reported lost and not arrived since


@dataclass
class Loss:
    device: str
    first: int
    last: int

    @property
    def count(self) -> int:
        return self.last - self.first + 1


def explained_ranges(data: dict[str, Any], type_: str) -> list[tuple[int, int]]:
    """Seq ranges an ``outbox.overflow`` (``dropped: {stream: [[a, b], …]}``) or ``outbox.reset``
    (``seq_skipped: [a, b]``) event says were dropped; malformed parts are ignored."""
    raw: Iterable[Any] = []
    if type_ == OVERFLOW and isinstance(data.get("dropped"), dict):
        raw = [r for ranges in data["dropped"].values() if isinstance(ranges, list) for r in ranges]
    elif type_ == RESET and isinstance(data.get("seq_skipped"), list):
        raw = [data["seq_skipped"]]
    out = []
    for r in raw:
        if (isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r)
                and 1 <= r[0] <= r[1] and r[1] - r[0] <= 10_000_000):
            out.append((r[0], r[1]))
    return out


class SeqAuditor:
    def __init__(self, reorder_timeout_s: float, *, max_devices: int = 100_000,
                 confirm: Callable[[str, int, int], set[int]] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.timeout = reorder_timeout_s
        self.max_devices = max_devices
        self.confirm = confirm
        self.clock = clock
        self.devices: OrderedDict[str, DeviceSeqs] = OrderedDict()

    # --- feeding -------------------------------------------------------------------------------

    def observe(self, device: str, seq: int, type_: str = "", data: dict[str, Any] | None = None) -> None:
        if device.startswith(CONSUMER_DEVICE_PREFIX):
            return
        now = self.clock()
        state = self.devices.get(device)
        if state is None:
            state = self._new_epoch(device, seq, now)
        else:
            self.devices.move_to_end(device)
            self._place(device, state, seq, now)
        if type_ in (OVERFLOW, RESET) and data is not None:
            for lo, hi in explained_ranges(data, type_):
                newly = sum(b - a + 1 for a, b in state.explained.missing(lo, hi))
                state.explained.add(lo, hi)
                metrics.SEQ_EXPLAINED.labels(device).inc(newly)

    def _new_epoch(self, device: str, seq: int, now: float) -> DeviceSeqs:
        state = DeviceSeqs(started=now, high=seq)
        state.seen.add(seq, seq)
        self.devices[device] = state
        while len(self.devices) > self.max_devices:
            self.devices.popitem(last=False)
        metrics.SEQ_LAST.labels(device).set(seq)
        return state

    def _place(self, device: str, state: DeviceSeqs, seq: int, now: float) -> None:
        if seq in state.seen:
            return  # a duplicate: nothing to learn
        if seq > state.high:
            if seq > state.high + 1:
                state.pending.append((state.high + 1, seq - 1, now))
            state.high = seq
            metrics.SEQ_LAST.labels(device).set(seq)
        elif seq < (state.seen.low or seq):
            if now - state.started > self.timeout:
                log.warning("device %s: seq went back from %d to %d: a device reset, new epoch", device,
                            state.high, seq)
                metrics.SEQ_RESETS.labels(device).inc()
                self._new_epoch(device, seq, now)
                return
            state.pending.append((seq + 1, state.seen.low - 1, now))  # we began watching mid-stream
        if seq in state.lost:
            state.missing -= 1
            metrics.SEQ_MISSING.labels(device).set(state.missing)
            log.warning("device %s: seq %d arrived after it was reported lost", device, seq)
        state.seen.add(seq, seq)

    # --- checking ------------------------------------------------------------------------------

    def check(self) -> list[Loss]:
        """Settle the holes older than the reorder timeout; the unexplained ones are losses."""
        now, losses = self.clock(), []
        for device, state in list(self.devices.items()):
            if not state.pending:
                continue
            due = [p for p in state.pending if now - p[2] >= self.timeout]
            if not due:
                continue
            try:
                found = [self._lost(device, state, lo, hi) for lo, hi, _ in due]
            except Exception as e:  # noqa: BLE001 - the confirm lookup failed: try again next check
                log.warning("auditor: cannot confirm holes of %s now: %s", device, e)
                continue
            state.pending = [p for p in state.pending if now - p[2] < self.timeout]
            for loss in (x for group in found for x in group):
                state.lost.add(loss.first, loss.last)
                state.missing += loss.count
                metrics.SEQ_GAPS.labels(device).inc()
                losses.append(loss)
            metrics.SEQ_MISSING.labels(device).set(state.missing)
        return losses

    def _lost(self, device: str, state: DeviceSeqs, lo: int, hi: int) -> list[Loss]:
        holes = [h for a, b in state.seen.missing(lo, hi) for h in state.explained.missing(a, b)]
        holes = [h for a, b in holes for h in state.lost.missing(a, b)]
        if holes and self.confirm is not None:
            for a, b in list(holes):
                for seq in self.confirm(device, a, b):
                    state.seen.add(seq, seq)
            holes = [h for a, b in holes for h in state.seen.missing(a, b)]
        return [Loss(device, a, b) for a, b in holes]


def who() -> str:
    """``user@host`` of this process, for audit records."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def publish_audit(producer: Any, topic: str, device: str, type_: str, data: dict[str, Any]) -> None:
    """Hand one ``audit.logs`` envelope of the consumer (``device`` under ``consumer/``) to ``producer``."""
    env = build(f"{CONSUMER_DEVICE_PREFIX}{device}", time.time_ns() // 1_000_000, type_, data)
    producer.produce(topic, value=encode(env), key=env.kafka_key.encode(), headers=env.kafka_headers())

