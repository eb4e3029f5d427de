"""The outbox on its own: durability, seq, overflow policy, corruption recovery."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from edge_agent import metrics
from edge_agent.config import OutboxConfig
from edge_agent.envelope import Draft, Envelope
from edge_agent.outbox import Outbox, OutboxFull, seq_ranges


def _cfg(tmp_path: Path, **kw) -> OutboxConfig:
    return OutboxConfig(path=tmp_path / "outbox", **kw)


def _draft(stream: str = "camera.events", i: int = 0, pad: int = 0) -> Draft:
    return Draft(stream=stream, type="test.event", data={"i": i, "pad": "x" * pad})


def _all_entries(box: Outbox) -> list:
    out = []
    while batch := box.take_unsent(1000):
        out.extend(batch)
    return out


def test_seq_is_gapless_across_threads_and_restarts(tmp_path):
    with Outbox(_cfg(tmp_path), "gw-1") as box:
        with ThreadPoolExecutor(8) as ex:
            envs = list(ex.map(lambda i: box.put(_draft(i=i)), range(500)))
        assert sorted(e.seq for e in envs) == list(range(1, 501))
    with Outbox(_cfg(tmp_path), "gw-1") as box:
        assert box.depth() == 500
        assert box.put(_draft()).seq == 501
        entries = _all_entries(box)
    assert [e.seq for e in entries] == list(range(1, 502))
    env = Envelope.model_validate_json(entries[0].payload)
    assert env.device_id == "gw-1" and env.v == 1 and len(env.trace_id) == 32


@pytest.mark.parametrize("fsync", ["always", "batch", "never"])
def test_every_fsync_policy_stores_and_reopens(tmp_path, fsync):
    with Outbox(_cfg(tmp_path, fsync=fsync), "gw-1") as box:
        for i in range(20):
            box.put(_draft(i=i))
    with Outbox(_cfg(tmp_path, fsync=fsync), "gw-1") as box:
        assert box.depth() == 20


def test_ack_deletes_and_survives_reopen(tmp_path):
    with Outbox(_cfg(tmp_path), "gw-1") as box:
        for i in range(10):
            box.put(_draft(i=i))
        sent = box.take_unsent(10)
        assert box.ack([e.seq for e in sent[:6]]) == 6
        assert box.ack([1, 2]) == 0  # acked twice: nothing left to delete
        assert box.depth() == 4
    with Outbox(_cfg(tmp_path), "gw-1") as box:
        assert [e.seq for e in _all_entries(box)] == [7, 8, 9, 10]


def test_requeue_sends_inflight_again_in_order(tmp_path):
    with Outbox(_cfg(tmp_path), "gw-1") as box:
        for i in range(5):
            box.put(_draft(i=i))
        first = box.take_unsent(3)
        box.requeue([e.seq for e in first])
        assert [e.seq for e in box.take_unsent(10)] == [1, 2, 3, 4, 5]


def test_higher_priority_streams_are_sent_first(tmp_path):
    with Outbox(_cfg(tmp_path), "gw-1") as box:
        box.put(_draft("ai.inference.results"))
        box.put(_draft("camera.events"))
        box.put(_draft("audit.logs"))
        box.put(_draft("notifications"))
        assert [e.stream for e in box.take_unsent(10)] == [
            "audit.logs", "notifications", "camera.events", "ai.inference.results"]


def test_overflow_drops_oldest_lowest_priority_and_keeps_audit(tmp_path):
    before = metrics.OUTBOX_DROPPED.labels(stream="ai.inference.results", reason="overflow")._value.get()
    with Outbox(_cfg(tmp_path, max_bytes=20_000), "gw-1") as box:
        for i in range(10):
            box.put(_draft("audit.logs", i=i, pad=200))
        results = [box.put(_draft("ai.inference.results", i=i, pad=200)) for i in range(80)]
    # closing flushes the last coalesced overflow report
    with Outbox(_cfg(tmp_path, max_bytes=20_000), "gw-1") as box:
        entries = _all_entries(box)
    streams = [e.stream for e in entries]
    assert streams.count("audit.logs") == 10, "audit entries are never dropped"
    kept_results = sorted(e.seq for e in entries if e.stream == "ai.inference.results")
    assert kept_results == sorted(r.seq for r in results)[-len(kept_results):], "the oldest went first"
    assert len(kept_results) < 80
    reports = [Envelope.model_validate_json(e.payload) for e in entries
               if b'"outbox.overflow"' in e.payload]
    assert reports, "an outbox.overflow event names what was dropped"
    dropped = [r for rep in reports for r in rep.data["dropped"]["ai.inference.results"]]
    dropped_seqs = {s for lo, hi in dropped for s in range(lo, hi + 1)}
    assert dropped_seqs == {r.seq for r in results} - set(kept_results)
    after = metrics.OUTBOX_DROPPED.labels(stream="ai.inference.results", reason="overflow")._value.get()
    assert after - before == len(dropped_seqs)


def test_refuse_policy_raises_and_keeps_everything(tmp_path):
    with Outbox(_cfg(tmp_path, max_bytes=5_000, overflow="refuse"), "gw-1") as box:
        stored = 0
        with pytest.raises(OutboxFull):
            for i in range(100):
                box.put(_draft(i=i, pad=200))
                stored += 1
        assert box.depth() == stored
        # seq stays gapless after a refusal
        box.ack([e.seq for e in box.take_unsent(100)])
        assert box.put(_draft()).seq == stored + 1


def test_audit_only_outbox_that_is_full_refuses(tmp_path):
    with Outbox(_cfg(tmp_path, max_bytes=3_000), "gw-1") as box:
        with pytest.raises(OutboxFull, match="audit"):
            for i in range(100):
                box.put(_draft("audit.logs", i=i, pad=200))


def test_corrupt_outbox_is_moved_aside_and_reported(tmp_path):
    with Outbox(_cfg(tmp_path), "gw-1") as box:
        for i in range(1200):  # crosses a seq high-water mark written beside the outbox
            box.put(_draft(i=i))
    db = tmp_path / "outbox" / "cache.db"
    db.write_bytes(b"this is not an sqlite database" * 100)
    for extra in (tmp_path / "outbox").glob("cache.db-*"):
        extra.unlink()
    with Outbox(_cfg(tmp_path), "gw-1") as box:
        assert box.reset_report is not None
        aside = Path(box.reset_report["moved_to"])
        assert aside.exists() and (aside / "cache.db").exists(), "the damaged file is kept for forensics"
        entries = _all_entries(box)
    assert len(entries) == 1
    env = Envelope.model_validate_json(entries[0].payload)
    assert env.type == "outbox.reset"
    assert env.seq > 1200, "seq never goes back, even after losing the outbox"
    assert env.data["seq_skipped"][0] <= 1201


def test_readonly_view_reports_depth_and_age(tmp_path):
    with Outbox(_cfg(tmp_path), "gw-1") as box:
        box.put(_draft("notifications"))
        box.put(_draft("audit.logs"))
        with Outbox.open_readonly(_cfg(tmp_path)) as view:
            st = view.stats()
    assert st["depth"] == 2 and st["by_stream"]["notifications"]["depth"] == 1
    assert st["oldest_age_s"] >= 0 and st["last_seq"] == 2
    json.dumps(st)


def test_unknown_stream_is_refused(tmp_path):
    with Outbox(_cfg(tmp_path), "gw-1") as box:
        with pytest.raises(ValueError, match="unknown stream"):
            box.put(Draft(stream="nope", type="x"))


def test_seq_ranges():
    assert seq_ranges([5, 1, 2, 3, 9, 8]) == [[1, 3], [5, 5], [8, 9]]
    assert seq_ranges([]) == []


def test_outbox_command_prints_the_state(tmp_path):
    import subprocess
    import sys

    import yaml

    cfg = tmp_path / "agent.yaml"
    cfg.write_text(yaml.safe_dump({"device_id": "gw-1", "outbox": {"path": str(tmp_path / "outbox")}}))
    with Outbox(_cfg(tmp_path), "gw-1") as box:
        box.put(_draft("notifications"))
        box.put(_draft("notifications"))
    out = subprocess.run([sys.executable, "-m", "edge_agent", "outbox", "-c", str(cfg), "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert st["depth"] == 2 and st["by_stream"]["notifications"]["depth"] == 2 and st["oldest_age_s"] >= 0
