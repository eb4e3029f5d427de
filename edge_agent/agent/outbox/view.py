"""``edge-agent outbox``: a read-only look at an outbox on disk, safe beside a running agent."""

from __future__ import annotations

import time

import diskcache

from edge_agent.agent.config import OutboxConfig
from edge_agent.agent.outbox.layout import envelope_time, last_seq, stored_entries
from edge_agent.common.envelope import utc_now_iso
from edge_agent.common.wire import STREAMS


class OutboxView:
    """Depth, bytes and age per stream, read straight from the outbox's files."""

    def __init__(self, cfg: OutboxConfig):
        self.cfg = cfg
        self._cache = diskcache.Cache(str(cfg.path), eviction_policy="none", cull_limit=0, size_limit=2**62)

    def stats(self) -> dict:
        by_stream = {s: {"depth": 0, "bytes": 0} for s in STREAMS}
        oldest_seq: int | None = None
        oldest_time = 0.0
        for key, stream, payload, size in stored_entries(self._cache):
            slot = by_stream.setdefault(stream, {"depth": 0, "bytes": 0})
            slot["depth"] += 1
            slot["bytes"] += size
            if oldest_seq is None or key < oldest_seq:
                oldest_seq, oldest_time = key, envelope_time(payload)
        age = round(max(0.0, time.time() - oldest_time), 3) if oldest_seq is not None else 0.0
        return {"path": str(self.cfg.path), "depth": sum(v["depth"] for v in by_stream.values()),
                "bytes": sum(v["bytes"] for v in by_stream.values()), "max_bytes": self.cfg.max_bytes,
                "oldest_age_s": age, "oldest_seq": oldest_seq,
                "last_seq": last_seq(self._cache), "by_stream": by_stream,
                "now": utc_now_iso()}

    def close(self) -> None:
        self._cache.close()

    def __enter__(self) -> "OutboxView":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
