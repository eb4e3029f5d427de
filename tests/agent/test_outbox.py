"""The outbox on its own: durability, seq, overflow policy, corruption recovery."""

from __future__ import annotations

import json
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from edge_agent.agent.config import OutboxConfig
from edge_agent.agent.outbox import (
    EnvelopeTooLarge,
    Outbox,
    OutboxDiskFull,
    OutboxFull,
    OutboxUnavailable,
)
from edge_agent.agent.outbox import store as outbox_store
from edge_agent.agent.outbox.index import OutboxIndex
from edge_agent.common import metrics
from edge_agent.common.envelope import Draft, Envelope, build, encode
from edge_agent.common.wire import seq_ranges
from edge_testkit.processes import wait_for


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


def test_a_failing_entry_in_a_group_commit_fails_only_its_own_put(tmp_path):
    """Entries the disk cannot take (a stand-in for a full disk on their write) share a batch with
    good ones: only their own puts fail."""
    box = Outbox(_cfg(tmp_path), "gw-1")
    real_set = box._cache.set
    writing, release = threading.Event(), threading.Event()

    def flaky_set(key, value, *args, **kwargs):
        if isinstance(value, bytes) and b"blocker" in value:
            writing.set()
            release.wait(30)  # hold the writer while the others queue up: they then form one batch
        if isinstance(value, bytes) and b"poison" in value:
            raise sqlite3.OperationalError("database or disk is full")
        return real_set(key, value, *args, **kwargs)

    box._cache.set = flaky_set
    try:
        with ThreadPoolExecutor(65) as ex:
            blocker = ex.submit(box.put, Draft(stream="notifications", type="blocker"))
            wait_for(writing.is_set, 10, message="the writer holds the blocker")
            futures = [ex.submit(box.put, Draft(stream="notifications", type="poison" if i % 8 == 3 else "good",
                                                data={"i": i}))
                       for i in range(64)]
            wait_for(lambda: box._queue.qsize() >= 64, 10, message="puts queued")
            release.set()
            outcomes = {i: f.exception(timeout=30) for i, f in enumerate(futures)}
            assert blocker.result(timeout=30).seq == 1
    finally:
        release.set()
        box.close()
    assert all(isinstance(outcomes[i], OutboxDiskFull) for i in range(3, 64, 8))
    assert all(outcomes[i] is None for i in range(64) if i % 8 != 3), outcomes
    with Outbox(_cfg(tmp_path), "gw-1") as box:
        entries = _all_entries(box)[1:]
    assert sorted(json.loads(e.payload)["data"]["i"] for e in entries) == [i for i in range(64) if i % 8 != 3]
    assert [e.seq for e in entries] == list(range(2, 58))  # gapless: a failed put takes no seq


def test_a_bad_draft_fails_alone_and_takes_no_seq(tmp_path):
    with Outbox(_cfg(tmp_path, max_message_bytes=5000), "gw-1") as box:
        with pytest.raises(EnvelopeTooLarge):
            box.put(_draft(pad=5000))
        with pytest.raises(ValidationError):  # built unchecked: the writer's envelope refuses it, alone
            box.put(Draft.model_construct(stream="notifications", type="t" * 200, data={}))
        assert box.put(_draft()).seq == 1


_texts = st.text(st.characters(codec="utf-8"), max_size=300)
_data = st.recursive(st.none() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | _texts,
                     lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_texts, inner, max_size=5),
                     max_leaves=30)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.dictionaries(_texts, _data, max_size=6), type_=st.text(min_size=1, max_size=128),
       camera=st.none() | st.text(max_size=128), correlation=st.none() | _texts)
def test_whatever_the_outbox_accepts_fits_the_bridge_limit(outbox_4k, data, type_, camera, correlation):
    """The writer measures the envelope it stores: what it accepts fits, what it refuses is (about) over."""
    draft = Draft(stream="notifications", type=type_, data=data, camera_id=camera, correlation_id=correlation)
    exact = len(encode(build("gw-1", 10**18, type_, data, camera_id=camera, correlation_id=correlation)))
    try:
        env = outbox_4k.put(draft)
    except EnvelopeTooLarge:
        assert exact > 4096 - 250
        return
    assert len(encode(env)) <= 4096 and Envelope.model_validate_json(encode(env)) == env


@pytest.fixture(scope="module")
def outbox_4k(tmp_path_factory):
    with Outbox(_cfg(tmp_path_factory.mktemp("ob4k"), max_message_bytes=4096, fsync="never"), "gw-1") as box:
        yield box


def test_an_unreadable_entry_is_dropped_counted_and_the_rest_still_taken(tmp_path):
    with Outbox(_cfg(tmp_path), "gw-1") as box:
        for i in range(5):
            box.put(_draft(i=i))
    damage_row(tmp_path / "outbox", seq=3)
    before = metrics.OUTBOX_DROPPED.labels(stream="camera.events", reason="unreadable")._value.get()
    with Outbox(_cfg(tmp_path), "gw-1") as box:  # the index skips it at start...
        assert box.depth() == 4
    with Outbox(_cfg(tmp_path), "gw-1") as box:
        damage_row(tmp_path / "outbox", seq=4)  # ...and a row damaged while running is dropped when taken
        assert [e.seq for e in _all_entries(box)] == [1, 2, 5]
        assert box.depth() == 3  # 1, 2 and 5 in flight; 4 gone
    after = metrics.OUTBOX_DROPPED.labels(stream="camera.events", reason="unreadable")._value.get()
    assert after - before == 1


def damage_row(outbox_dir: Path, seq: int) -> None:
    """Make one stored row undecodable: diskcache then fails to unpickle it (a damaged page's effect)."""
    with sqlite3.connect(outbox_dir / "cache.db") as db:
        db.execute("UPDATE Cache SET mode = 4, value = ? WHERE key = ?", (b"\x80\x05damaged", seq))


def test_a_storage_error_shows_in_health_until_the_outbox_stores_again(tmp_path):
    with Outbox(_cfg(tmp_path), "gw-1") as box:
        real_set = box._cache.set
        box._cache.set = lambda *a, **kw: (_ for _ in ()).throw(sqlite3.DatabaseError("disk image is malformed"))
        with pytest.raises(OutboxUnavailable):
            box.put(_draft())
        assert "malformed" in box.storage_problem() and "malformed" in box.stats()["last_store_error"]
        box._cache.set = real_set  # the storage works again: an idle recheck says so without a put
        wait_for(lambda: box.storage_problem() is None, 10, message="the recheck clears the storage problem")
        assert box.put(_draft()).seq == 1


def test_an_overflow_report_too_big_for_one_envelope_names_the_span(tmp_path, monkeypatch):
    """Drops scattered among kept entries make many ranges; the report still fits the envelope bound."""
    # All drops go into the report made at close: with the 1 s coalescing window a slow host spread
    # them over several small reports (none truncated), and the full outbox evicted the early ones.
    monkeypatch.setattr(outbox_store, "_OVERFLOW_REPORT_EVERY_S", 1e7)
    cfg = _cfg(tmp_path, max_bytes=60_000, max_message_bytes=4096)
    with Outbox(cfg, "gw-1") as box:
        for i in range(1200):
            box.put(_draft("ai.inference.results" if i % 2 else "notifications", i=i, pad=50))
    with Outbox(cfg, "gw-1") as box:
        reports = [Envelope.model_validate_json(e.payload) for e in _all_entries(box)
                   if b'"outbox.overflow"' in e.payload]
    assert any(r.data.get("ranges_truncated") for r in reports), [r.data for r in reports]
    assert sum(r.data["count"] for r in reports) >= 400


# --- the in-memory index alone -----------------------------------------------------------------

def test_index_takes_by_priority_requeues_in_order_and_accounts_bytes() -> None:
    index = OutboxIndex(["low", "high"])
    index.add([(1, "low", 10), (2, "high", 20), (3, "low", 30), (4, "high", 40)])
    assert index.take(3, ["high", "low"]) == [(2, "high"), (4, "high"), (1, "low")]
    assert index.unsent_count() == 1 and sorted(index.inflight()) == [1, 2, 4]
    index.requeue([4, 2])
    assert index.take(10, ["high", "low"]) == [(2, "high"), (4, "high"), (3, "low")]
    assert index.drop_known([2, 99]) == [2] and index.drop(99) is None
    assert index.oldest_of("low") == 1 and index.oldest_seq() == 1
    stats = index.stats()
    assert (stats.depth, stats.bytes, stats.inflight, stats.by_stream) == (3, 80, 3, {"low": 2, "high": 1})
