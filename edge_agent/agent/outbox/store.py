"""The durable outbox: store and forward on the camera host's disk (diskcache / SQLite).

Every envelope is written here before anything tries to send it, and leaves only when
the bridge acknowledges end to end that Kafka has it.

The files are laid out as ``layout`` says. A single writer thread owns all writes: puts are
grouped into one transaction per batch (group commit), so a ``put`` returns only when its
entry is durable while the fsync cost is shared. Which seq waits and which is in flight is
the in-memory ``OutboxIndex``; payloads stay on disk.
"""

from __future__ import annotations

import errno
import logging
import queue
import shutil
import sqlite3
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import diskcache
from pydantic import ValidationError

from edge_agent.agent.config import OutboxConfig
from edge_agent.agent.outbox.index import OutboxIndex
from edge_agent.agent.outbox.layout import (
    SEQ_KEY,
    envelope_time,
    last_seq,
    pack,
    stored_entries,
    unpack,
)
from edge_agent.agent.outbox.view import OutboxView
from edge_agent.common import metrics
from edge_agent.common.envelope import Draft, Envelope, build, encode
from edge_agent.common.files import atomic_write
from edge_agent.common.logs import clip
from edge_agent.common.supervised import SupervisedThread
from edge_agent.common.wire import STREAM_PRIORITY, STREAMS, seq_ranges

log = logging.getLogger(__name__)

_SYNCHRONOUS = {"always": 2, "batch": 2, "never": 0}  # SQLite PRAGMA synchronous: FULL / OFF
_SIDECAR_EVERY = 1000  # the seq high-water mark beside the outbox is refreshed this often
_CORRUPT_SEQ_MARGIN = 2 * _SIDECAR_EVERY
_OVERFLOW_REPORT_EVERY_S = 1.0  # overflow reports are coalesced: they take room themselves
_READ_RETRY_S = 1.0  # after a transient read error (locked, I/O) the uplink gets nothing this long


_WAKE = object()  # queued to make the writer apply pending deletes


class OutboxFull(Exception):
    """The outbox is at ``max_bytes`` and its policy refuses the entry."""


class OutboxDiskFull(OutboxFull):
    """The disk under the outbox is full (SQLite "database or disk is full", ENOSPC)."""


class OutboxClosed(Exception):
    pass


class OutboxBusy(Exception):
    """A transient read error: the entry is still there, try again later."""


class _StoreFailed(Exception):
    """The transaction of a commit failed: nothing of it is stored (the writer's own signal)."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


class EnvelopeTooLarge(ValueError):
    """The entry's envelope would be over ``max_message_bytes``: the bridge would not forward it whole."""


class OutboxUnavailable(Exception):
    """The outbox could not store the entry (a storage error other than a full disk)."""


@dataclass
class _Put:
    draft: Draft
    future: Future = field(default_factory=Future)


def refusal_reason(e: BaseException) -> str:
    """A put's failure as a metric label (``edge_outbox_dropped_total{reason}``)."""
    for kind, reason in ((OutboxDiskFull, "disk_full"), (OutboxFull, "full"), (OutboxClosed, "closed"),
                         (EnvelopeTooLarge, "too_large"), (ValidationError, "invalid")):
        if isinstance(e, kind):
            return reason
    return "error"


def _storage_error(e: BaseException) -> Exception:
    """What a failed store means to the one who put the entry."""
    if isinstance(e, (OutboxFull, OutboxClosed)):
        return e
    if (isinstance(e, sqlite3.OperationalError) and "full" in str(e)) or (
            isinstance(e, OSError) and e.errno == errno.ENOSPC):
        return OutboxDiskFull(f"disk full: the outbox cannot store more ({e})")
    return OutboxUnavailable(f"outbox cannot store: {type(e).__name__}: {e}")


@dataclass
class StoredEntry:
    seq: int
    stream: str
    payload: bytes  # the envelope JSON


class Outbox:
    def __init__(self, cfg: OutboxConfig, device_id: str):
        build(device_id, 1, "probe", {})  # a device id the envelope refuses fails at start, not every put
        self.cfg = cfg
        self.device_id = device_id
        self.path = Path(cfg.path)
        self.reset_report: dict | None = None  # set when a corrupt outbox was moved aside
        self._cache = self._open_or_reset()
        self._index = OutboxIndex(STREAMS)
        self._oldest_ts: tuple[int, float] | None = None  # (seq, its envelope time), read lazily
        self._gauges_at = 0.0
        self._seq = 0
        self._rebuild_index()
        self._queue: "queue.Queue[_Put | object | None]" = queue.Queue()
        self._deletes: "queue.Queue[list[int]]" = queue.Queue()
        self._closed = False
        self._overflow_pending: dict[str, list[int]] = {}
        self._overflow_reported_at = 0.0
        self._read_blocked_until = 0.0
        self.last_store_error: Exception | None = None  # the last commit's storage error, None once one succeeds
        self.thread = SupervisedThread("outbox-writer", self._write_loop)
        self.thread.start()
        self._refresh_gauges(force=True)
        if self.reset_report:
            self._emit_reset_event()

    # --- opening ----------------------------------------------------------------------

    def _cache_settings(self) -> dict:
        return dict(eviction_policy="none", cull_limit=0, size_limit=2**62, statistics=0,
                    sqlite_synchronous=_SYNCHRONOUS[self.cfg.fsync], sqlite_journal_mode="wal")

    def _sidecar(self) -> Path:
        return self.path.with_name(self.path.name + ".seq")

    def _open_or_reset(self) -> diskcache.Cache:
        """Open the outbox; a corrupt one is moved aside so the agent starts instead of crash-looping."""
        try:
            cache = diskcache.Cache(str(self.path), **self._cache_settings())
            self._probe(cache)
            return cache
        except (sqlite3.DatabaseError, OSError, ValueError) as e:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            log.error("outbox at %s cannot be opened (%s); moved aside to %s, starting a fresh one",
                      self.path, e, aside)
            if self.path.exists():
                shutil.move(str(self.path), str(aside))
            self.reset_report = {"path": str(self.path), "moved_to": str(aside), "error": str(e)}
            cache = diskcache.Cache(str(self.path), **self._cache_settings())
            # seq must not go back: continue above the last high-water mark we wrote beside it.
            hwm = self._read_sidecar()
            if hwm:
                first = hwm + _CORRUPT_SEQ_MARGIN
                cache.set(SEQ_KEY, first)
                self.reset_report["seq_skipped"] = [hwm + 1, first]
            return cache

    @staticmethod
    def _probe(cache: diskcache.Cache) -> None:
        # Touch the whole table once: a damaged page shows up here, not later in the writer.
        row = cache._sql("PRAGMA quick_check").fetchone()  # noqa: SLF001 - diskcache exposes no check lite
        if row and row[0] != "ok":
            raise sqlite3.DatabaseError(f"quick_check: {row[0]}")

    def _read_sidecar(self) -> int:
        try:
            return int(self._sidecar().read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _write_sidecar(self, seq: int) -> None:
        try:
            atomic_write(self._sidecar(), str(seq).encode())
        except OSError as e:  # best effort: only matters when the outbox itself is lost
            log.warning("cannot write seq high-water mark: %s", e)

    def _rebuild_index(self) -> None:
        self._seq = last_seq(self._cache)
        known: list[tuple[int, str, int]] = []
        for key, stream, _payload, size in stored_entries(self._cache):
            if not self._index.knows(stream):
                log.warning("outbox entry %s has unknown stream %r; kept, not sent", key, stream)
                continue
            known.append((key, stream, size))
            self._seq = max(self._seq, key)
        self._index.add(known)
        self._seq = max(self._seq, self._read_sidecar() if self.reset_report else 0, self._seq)

    def _emit_reset_event(self) -> None:
        try:
            self.put(Draft(stream="camera.events", type="outbox.reset", data=self.reset_report or {}))
        except Exception:  # noqa: BLE001 - reporting must not stop the start
            log.exception("cannot record the outbox reset")

    @classmethod
    def open_readonly(cls, cfg: OutboxConfig) -> "OutboxView":
        return OutboxView(cfg)

    # --- producing --------------------------------------------------------------------

    def put(self, draft: Draft, timeout: float | None = 30.0) -> Envelope:
        """Store one entry; returns once it is durable (per the fsync policy).

        A bad entry fails alone: the Draft carries the envelope's field rules (pydantic
        ValidationError when it was built), and the writer measures the envelope it encodes and
        refuses one over ``max_message_bytes`` (EnvelopeTooLarge) without failing its batch.
        """
        if not self._index.knows(draft.stream):
            raise ValueError(f"unknown stream {draft.stream!r}; one of {', '.join(STREAMS)}")
        if self._closed:
            raise OutboxClosed("outbox is closed")
        item = _Put(draft)
        self._queue.put(item)
        return item.future.result(timeout=timeout)

    # --- the writer thread ------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=_OVERFLOW_REPORT_EVERY_S)
            except queue.Empty:
                self._maybe_report_overflow()
                self._recheck_storage()
                continue
            if first is None:
                self._apply_deletes()
                self._maybe_report_overflow(final=True)
                return
            batch = self._gather_batch(first)
            try:
                self._apply_deletes()
                if batch:
                    self._commit_puts(batch)
                self._maybe_report_overflow()
            except BaseException as e:
                # A bug of ours: nobody waits forever on this batch; the supervisor restarts us.
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(_storage_error(e))
                raise

    def _gather_batch(self, first: _Put | object) -> list[_Put]:
        batch = [first] if isinstance(first, _Put) else []
        limit = 1 if self.cfg.fsync == "always" else self.cfg.batch_max
        while len(batch) < limit:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                self._queue.put(None)  # finish this batch, then stop
                break
            if isinstance(nxt, _Put):
                batch.append(nxt)
        return batch

    def _commit_puts(self, batch: list[_Put]) -> None:
        """One transaction for the batch; if it fails, each entry alone, so a failure stays its own."""
        try:
            self._commit_together(batch)
        except _StoreFailed as e:
            if len(batch) == 1:
                self._fail_put(batch[0], e.error)
                return
            log.warning("outbox group commit of %d entries failed (%s); storing them one by one",
                        len(batch), clip(str(e.error)))
            for item in batch:
                try:
                    self._commit_together([item])
                except _StoreFailed as one:
                    self._fail_put(item, one.error)

    def _fail_put(self, item: _Put, error: BaseException) -> None:
        failure = _storage_error(error)
        if isinstance(failure, (OutboxDiskFull, OutboxUnavailable)):
            log.error("outbox cannot store a %s entry: %s", item.draft.stream, clip(str(error)))
            self.last_store_error = failure
        item.future.set_exception(failure)

    def _recheck_storage(self) -> None:
        """After a storage error, one small write per idle second tells when the outbox works again
        (health must not stay 503 only because no entry came to prove it)."""
        if not isinstance(self.last_store_error, OutboxUnavailable):
            return
        try:
            with self._cache.transact():
                self._cache.set(SEQ_KEY, self._seq)
        except Exception:  # noqa: BLE001 - still failing: health keeps saying so
            return
        log.info("outbox stores again")
        self.last_store_error = None

    def storage_problem(self) -> str | None:
        """Why the outbox cannot store at all (health): a storage error other than a full disk."""
        error = self.last_store_error
        return str(error) if isinstance(error, OutboxUnavailable) else None

    def _commit_together(self, batch: list[_Put]) -> None:
        """Store the batch in one transaction (all or nothing); settles the puts only once committed."""
        results: list[tuple[_Put, Envelope | BaseException]] = []
        # (seq, stream, size, bytes staged so far): indexed only once committed
        staged: list[tuple[int, str, int, int]] = []
        overflow: dict[str, list[int]] = {}
        first_seq = self._seq
        try:
            with self._cache.transact():
                for item in batch:
                    try:
                        results.append((item, self._store_one(item.draft, staged, overflow)))
                    except (OutboxFull, EnvelopeTooLarge, ValidationError) as e:  # fails alone; the others go on
                        results.append((item, e))
                self._cache.set(SEQ_KEY, self._seq)
        except Exception as e:  # noqa: BLE001 - any storage error: the caller decides per put
            self._seq = first_seq  # nothing of the batch is stored: its seqs are free again
            raise _StoreFailed(e) from e
        self.last_store_error = None
        self._index.add((seq, stream, size) for seq, stream, size, _ in staged)
        if self._seq // _SIDECAR_EVERY != first_seq // _SIDECAR_EVERY:
            self._write_sidecar(self._seq)
        for item, res in results:
            if isinstance(res, BaseException):
                item.future.set_exception(res)
            else:
                item.future.set_result(res)
        self._refresh_gauges()
        for stream, seqs in overflow.items():
            self._overflow_pending.setdefault(stream, []).extend(seqs)
        self._maybe_report_overflow()

    def _store_one(self, draft: Draft, staged: list[tuple[int, str, int, int]],
                   overflow: dict[str, list[int]]) -> Envelope:
        seq = self._seq + 1
        env, encoded = self._envelope(draft, seq)
        value = pack(draft.stream, encoded)
        staged_bytes = staged[-1][3] if staged else 0
        self._make_room(len(value) + staged_bytes, overflow)
        self._cache.set(seq, value)
        self._seq = seq
        staged.append((seq, draft.stream, len(value), staged_bytes + len(value)))
        return env

    def _envelope(self, draft: Draft, seq: int) -> tuple[Envelope, bytes]:
        """The envelope of ``draft`` at ``seq`` and its JSON; EnvelopeTooLarge when the bridge would refuse it."""
        env = build(self.device_id, seq, draft.type, draft.data, camera_id=draft.camera_id,
                    trace_id=draft.trace_id, correlation_id=draft.correlation_id)
        encoded = encode(env)
        if len(encoded) > self.cfg.max_message_bytes:
            raise EnvelopeTooLarge(f"the envelope is {len(encoded)} bytes, over max_message_bytes "
                                   f"{self.cfg.max_message_bytes}")
        return env, encoded

    def _make_room(self, size: int, overflow: dict[str, list[int]]) -> None:
        """Drop the oldest entries of the lowest-priority stream until ``size`` fits."""
        index = self._index
        if index.bytes + size <= self.cfg.max_bytes:
            return
        if self.cfg.overflow == "refuse":
            raise OutboxFull(f"outbox full ({index.bytes} of {self.cfg.max_bytes} bytes)")
        for stream in STREAM_PRIORITY[:-1]:  # audit.logs is never dropped
            while index.bytes + size > self.cfg.max_bytes:
                victim = index.oldest_of(stream)
                if victim is None:
                    break
                self._cache.delete(victim)
                index.drop(victim)
                overflow.setdefault(stream, []).append(victim)
                metrics.OUTBOX_DROPPED.labels(stream=stream, reason="overflow").inc()
            if index.bytes + size <= self.cfg.max_bytes:
                return
        raise OutboxFull(f"outbox full of audit records ({index.bytes} of {self.cfg.max_bytes} bytes)")

    def _maybe_report_overflow(self, final: bool = False) -> None:
        """Store one ``outbox.overflow`` event naming the dropped seq ranges, at most once a second."""
        now = time.monotonic()
        if not self._overflow_pending or (not final and now - self._overflow_reported_at < _OVERFLOW_REPORT_EVERY_S):
            return
        pending, self._overflow_pending = self._overflow_pending, {}
        self._overflow_reported_at = now
        data = {"dropped": {s: seq_ranges(seqs) for s, seqs in pending.items()},
                "count": sum(len(v) for v in pending.values()), "max_bytes": self.cfg.max_bytes}
        log.warning("outbox overflow: dropped %d entries %s", data["count"], clip(data["dropped"], 2000))
        report = Draft(stream="camera.events", type="outbox.overflow", data=data)
        try:
            self._envelope(report, self._seq + 1)
        except EnvelopeTooLarge:  # too many scattered ranges for one envelope: their span and count
            data["dropped"] = {s: [[min(seqs), max(seqs)]] for s, seqs in pending.items()}
            report = Draft(stream="camera.events", type="outbox.overflow", data={**data, "ranges_truncated": True})
        # We are on the writer thread: commit the report here rather than wait on our own queue.
        self._commit_puts([_Put(report)])

    # --- consuming (the uplink) -------------------------------------------------------

    def take_unsent(self, limit: int) -> list[StoredEntry]:
        """Up to ``limit`` entries not yet sent, highest-priority stream first, FIFO within a stream.

        An entry that cannot be read is dropped (logged and counted); a transient read error
        puts the rest back and pauses taking for a moment.
        """
        if time.monotonic() < self._read_blocked_until:
            return []
        picked = self._index.take(limit, reversed(STREAM_PRIORITY))
        out = []
        for i, (seq, stream) in enumerate(picked):
            try:
                entry = self.get(seq)
            except OutboxBusy:
                self.requeue(s for s, _ in picked[i:])
                break
            if entry is None:  # acked or dropped meanwhile
                self._index.settle(seq)
                continue
            out.append(entry)
        return out

    def get(self, seq: int) -> StoredEntry | None:
        """The stored entry; None when it is gone (acked, dropped, or unreadable and now dropped).

        Raises OutboxBusy on a transient read error (locked, I/O): the entry stays.
        """
        try:
            value = self._cache.get(seq)
            return None if value is None else StoredEntry(seq, *unpack(value))
        except (sqlite3.OperationalError, diskcache.Timeout, OSError) as e:
            self._read_blocked_until = time.monotonic() + _READ_RETRY_S
            log.warning("outbox read of seq %s failed, retrying in %.0f s: %s", seq, _READ_RETRY_S,
                        clip(str(e)))
            raise OutboxBusy(str(e)) from e
        except Exception as e:  # noqa: BLE001 - a damaged row (bad page, undecodable value)
            self._drop_unreadable(seq, e)
            return None

    def _drop_unreadable(self, seq: int, error: Exception) -> None:
        stream = self._index.drop(seq) or "?"
        metrics.OUTBOX_DROPPED.labels(stream=stream, reason="unreadable").inc()
        log.error("outbox entry %s (%s) is unreadable and dropped: %s", seq, stream,
                  clip(f"{type(error).__name__}: {error}"), extra={"seq": seq, "stream": stream})
        self._deletes.put([seq])
        self._queue.put(_WAKE)

    def requeue_inflight(self) -> None:
        """Every in-flight entry back to the front of its stream (after a reconnect or an uplink crash)."""
        self.requeue(self._index.inflight())

    def requeue(self, seqs: Iterable[int]) -> None:
        """In-flight entries go back to the front of their stream (after a reconnect)."""
        self._index.requeue(seqs)

    def ack(self, seqs: Iterable[int]) -> int:
        """Delete acknowledged entries; returns how many were still here."""
        gone = self._index.drop_known(seqs)
        if gone:
            self._deletes.put(gone)
            self._queue.put(_WAKE)  # wake the writer so deletes do not wait for the next put
            metrics.ACKED.inc(len(gone))
            self._refresh_gauges()
        return len(gone)

    def _apply_deletes(self) -> None:
        seqs: list[int] = []
        while True:
            try:
                seqs.extend(self._deletes.get_nowait())
            except queue.Empty:
                break
        if not seqs:
            return
        # A lost delete only means a duplicate send later, so no fsync is owed here.
        with self._cache.transact():
            for seq in seqs:
                self._cache.delete(seq)

    # --- state ------------------------------------------------------------------------

    def depth(self) -> int:
        return self._index.depth()

    def unsent_count(self) -> int:
        return self._index.unsent_count()

    def _oldest_age_s(self) -> float:
        """Age of the oldest entry, from its envelope's ``ts`` (so it survives restarts)."""
        oldest = self._index.oldest_seq()
        if oldest is None:
            return 0.0
        if self._oldest_ts is None or self._oldest_ts[0] != oldest:
            try:
                entry = self.get(oldest)
            except OutboxBusy:
                return 0.0
            if entry is None:
                return 0.0
            self._oldest_ts = (oldest, envelope_time(entry.payload))
        return round(max(0.0, time.time() - self._oldest_ts[1]), 3)

    def stats(self) -> dict:
        age = self._oldest_age_s()
        index = self._index.stats()
        return {"depth": index.depth, "bytes": index.bytes,
                "max_bytes": self.cfg.max_bytes, "inflight": index.inflight,
                "oldest_age_s": age, "next_seq": self._seq + 1, "by_stream": index.by_stream,
                "last_store_error": str(self.last_store_error) if self.last_store_error else None}

    def _refresh_gauges(self, force: bool = False) -> None:
        # At thousands of acks a second the gauges need not follow every one.
        now = time.monotonic()
        if not force and now - self._gauges_at < 0.2:
            return
        self._gauges_at = now
        index = self._index.stats()
        for stream, n in index.by_stream.items():
            metrics.OUTBOX_DEPTH.labels(stream=stream).set(n)
        metrics.OUTBOX_BYTES.set(index.bytes)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.thread.stop_restarting()
        self._queue.put(None)
        self.thread.join(timeout=30)
        self._refresh_gauges(force=True)
        self._write_sidecar(self._seq)
        self._cache.close()

    def __enter__(self) -> "Outbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

