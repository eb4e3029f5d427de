"""How the outbox lies on disk, for the writer and for read-only views alike.

One diskcache ``Cache`` keyed by ``seq`` (an integer, so SQLite orders it), each value
``b"<stream>\\n<envelope json>"``, and the ``seq`` counter under the key ``"seq"`` in the
same transaction, so ``seq`` is gapless and survives restarts.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Iterator

import diskcache

from edge_agent.common.logs import clip

log = logging.getLogger(__name__)

SEQ_KEY = "seq"


def pack(stream: str, payload: bytes) -> bytes:
    return stream.encode() + b"\n" + payload


def unpack(value: bytes) -> tuple[str, bytes]:
    stream, _, payload = value.partition(b"\n")
    return stream.decode(), payload


def last_seq(cache: diskcache.Cache) -> int:
    """The seq counter as stored (0 for a new outbox)."""
    return int(cache.get(SEQ_KEY, 0) or 0)


def stored_entries(cache: diskcache.Cache) -> Iterator[tuple[int, str, bytes, int]]:
    """Every entry on disk in seq order: (seq, stream, envelope JSON, stored size)."""
    for key in cache.iterkeys():
        if not isinstance(key, int):  # the seq counter lives beside the entries
            continue
        try:
            value = cache.get(key)
            stream, payload = unpack(value) if value is not None else ("", b"")
        except Exception as e:  # noqa: BLE001 - one damaged row must not hide (or stop) the rest
            log.error("outbox entry %s is unreadable and skipped: %s", key, clip(f"{type(e).__name__}: {e}"))
            continue
        if value is None:
            continue
        yield key, stream, payload, len(value)


def envelope_time(payload: bytes) -> float:
    """The envelope's ``ts`` as a Unix time (0.0 when unreadable)."""
    try:
        ts = json.loads(payload)["ts"]
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except (ValueError, KeyError, TypeError):
        return 0.0
