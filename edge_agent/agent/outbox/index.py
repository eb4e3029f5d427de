"""The outbox's in-memory index: per stream the seqs not yet sent (FIFO), the seqs in flight,
and what they take on disk. Payloads stay on disk; this only says which seq is where.

Thread-safe: the writer adds and drops, the uplink takes, requeues and acks, health reads.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class IndexStats:
    depth: int
    bytes: int
    inflight: int
    by_stream: dict[str, int]


class OutboxIndex:
    def __init__(self, streams: Iterable[str]):
        self._lock = threading.Lock()
        self._unsent: dict[str, deque[int]] = {s: deque() for s in streams}
        self._inflight: dict[int, str] = {}
        self._stream_of: dict[int, str] = {}  # every stored seq (unsent or in flight)
        self._sizes: dict[int, int] = {}
        self._count: dict[str, int] = {s: 0 for s in self._unsent}
        self._bytes = 0

    # --- what is stored -----------------------------------------------------------------

    def knows(self, stream: str) -> bool:
        return stream in self._unsent

    def add(self, entries: Iterable[tuple[int, str, int]]) -> None:
        """Stored entries ``(seq, stream, size)``, at the back of their stream's unsent queue."""
        with self._lock:
            for seq, stream, size in entries:
                self._unsent[stream].append(seq)
                self._stream_of[seq] = stream
                self._sizes[seq] = size
                self._count[stream] += 1
                self._bytes += size

    def drop(self, seq: int) -> str | None:
        """Forget a stored entry (acked, dropped for room, unreadable); its stream, None if unknown."""
        with self._lock:
            return self._drop(seq)

    def drop_known(self, seqs: Iterable[int]) -> list[int]:
        """Forget the entries of ``seqs`` that are stored (an ack); the ones that were."""
        with self._lock:
            return [seq for seq in seqs if self._drop(seq) is not None]

    def _drop(self, seq: int) -> str | None:
        stream = self._stream_of.pop(seq, None)
        if stream is None:
            return None
        if self._inflight.pop(seq, None) is None:  # not in flight: it is in the unsent queue
            q = self._unsent[stream]
            if q and q[0] == seq:
                q.popleft()
            elif seq in q:  # O(n), but only for an ack of an entry we never sent (after a restart)
                q.remove(seq)
        self._bytes -= self._sizes.pop(seq, 0)
        self._count[stream] -= 1
        return stream

    def oldest_of(self, stream: str) -> int | None:
        """The oldest stored seq of ``stream``, in flight or not: the next to drop for room."""
        with self._lock:
            # In-flight entries are older than the unsent ones of their stream; the window is small.
            candidates = [s for s, st in self._inflight.items() if st == stream]
            if self._unsent[stream]:
                candidates.append(self._unsent[stream][0])
            return min(candidates) if candidates else None

    def stream_of(self, seq: int) -> str | None:
        with self._lock:
            return self._stream_of.get(seq)

    # --- sending ------------------------------------------------------------------------

    def take(self, limit: int, order: Iterable[str]) -> list[tuple[int, str]]:
        """Up to ``limit`` unsent ``(seq, stream)``, streams in ``order``, FIFO within one; now in flight."""
        picked: list[tuple[int, str]] = []
        with self._lock:
            for stream in order:
                q = self._unsent[stream]
                while q and len(picked) < limit:
                    seq = q.popleft()
                    self._inflight[seq] = stream
                    picked.append((seq, stream))
        return picked

    def settle(self, seq: int) -> None:
        """A taken entry turned out to be gone meanwhile: no longer in flight."""
        with self._lock:
            self._inflight.pop(seq, None)

    def inflight(self) -> list[int]:
        with self._lock:
            return list(self._inflight)

    def requeue(self, seqs: Iterable[int]) -> None:
        """In-flight entries back to the front of their stream, in seq order."""
        with self._lock:
            for seq in sorted(seqs, reverse=True):
                stream = self._inflight.pop(seq, None)
                if stream is not None and seq in self._stream_of:
                    self._unsent[stream].appendleft(seq)

    # --- state --------------------------------------------------------------------------

    @property
    def bytes(self) -> int:
        return self._bytes

    def depth(self) -> int:
        with self._lock:
            return len(self._stream_of)

    def unsent_count(self) -> int:
        with self._lock:
            return sum(len(q) for q in self._unsent.values())

    def oldest_seq(self) -> int | None:
        """The oldest stored seq, unsent or in flight."""
        with self._lock:
            heads = [q[0] for q in self._unsent.values() if q]
            if self._inflight:
                heads.append(min(self._inflight))
        return min(heads) if heads else None

    def stats(self) -> IndexStats:
        with self._lock:
            return IndexStats(len(self._stream_of), self._bytes, len(self._inflight), dict(self._count))
