"""The sequence auditor: its rules with a fake clock, and a hole reported over the real wire."""

from __future__ import annotations

import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from consumer_helpers import Setup, metric, wait_rows
from edge_agent.common.envelope import build
from edge_agent.consumer.auditor import RangeSet, SeqAuditor, explained_ranges
from edge_testkit.kafka import create_topics
from edge_testkit.processes import free_port, wait_for
from edge_testkit.records import read_topic


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def auditor(timeout: float = 10.0, confirm=None) -> tuple[SeqAuditor, Clock]:
    clock = Clock()
    return SeqAuditor(timeout, clock=clock, confirm=confirm), clock


def test_a_hole_is_a_loss_only_after_the_reorder_timeout() -> None:
    a, clock = auditor()
    for seq in (1, 2, 3, 6, 7):
        a.observe("gw", seq)
    assert a.check() == []
    clock.t += 9
    assert a.check() == []
    clock.t += 2
    losses = a.check()
    assert [(x.device, x.first, x.last) for x in losses] == [("gw", 4, 5)]
    assert a.check() == []  # reported once
    assert a.devices["gw"].missing == 2
    a.observe("gw", 4)  # a late arrival: no longer missing
    assert a.devices["gw"].missing == 1


def test_a_hole_filled_in_time_is_no_loss_and_duplicates_change_nothing() -> None:
    a, clock = auditor()
    for seq in (1, 3, 2, 2, 3, 4):
        a.observe("gw", seq)
    clock.t += 60
    assert a.check() == []


def test_overflow_and_reset_events_explain_their_ranges() -> None:
    a, clock = auditor()
    for seq in (1, 2, 5, 6, 9):
        a.observe("gw", seq)
    a.observe("gw", 10, "outbox.overflow", {"dropped": {"ai.inference.results": [[3, 4]], "camera.events": [[7, 7]]}})
    a.observe("gw", 20, "outbox.reset", {"seq_skipped": [11, 19]})
    clock.t += 60
    losses = a.check()
    assert [(x.first, x.last) for x in losses] == [(8, 8)]


def test_a_seq_going_back_after_the_first_window_is_a_reset_not_a_duplicate() -> None:
    a, clock = auditor()
    for seq in range(100, 110):
        a.observe("gw", seq)
    clock.t += 30
    a.observe("gw", 1)  # the device's disk was replaced: it starts again
    a.observe("gw", 2)
    a.observe("gw", 4)
    assert a.devices["gw"].high == 4
    clock.t += 30
    assert [(x.first, x.last) for x in a.check()] == [(3, 3)]


def test_a_lower_seq_in_the_first_window_is_reorder_not_a_reset() -> None:
    a, clock = auditor()
    a.observe("gw", 10)
    a.observe("gw", 8)  # another partition of the same device, a little behind
    a.observe("gw", 9)
    clock.t += 30
    assert a.check() == []
    assert a.devices["gw"].high == 10


def test_confirm_finds_seqs_another_instance_stored() -> None:
    a, clock = auditor(confirm=lambda device, lo, hi: {4})
    for seq in (1, 2, 3, 6):
        a.observe("gw", seq)
    clock.t += 60
    assert [(x.first, x.last) for x in a.check()] == [(5, 5)]


def test_consumer_records_and_malformed_explanations_are_ignored() -> None:
    a, clock = auditor()
    a.observe("consumer/g", 5)
    a.observe("consumer/g", 500)
    assert "consumer/g" not in a.devices
    assert explained_ranges({"dropped": {"x": [[5, 3], "a", [1, True], [2, 4]]}}, "outbox.overflow") == [(2, 4)]
    assert explained_ranges({"seq_skipped": "1-2"}, "outbox.reset") == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 300), st.integers(0, 20)), max_size=40))
def test_rangeset_matches_a_plain_set(ranges) -> None:
    rs, plain = RangeSet(), set()
    for lo, span in ranges:
        rs.add(lo, lo + span)
        plain |= set(range(lo, lo + span + 1))
    assert all((n in rs) == (n in plain) for n in range(0, 330))
    missing = {n for a, b in rs.missing(1, 320) for n in range(a, b + 1)}
    assert missing == set(range(1, 321)) - plain
    assert all(rs.his[i] + 1 < rs.los[i + 1] for i in range(len(rs.los) - 1))  # disjoint, not touching


def test_a_seq_hole_is_reported_an_overflow_announced_hole_is_not(kafka_factory, pg_dsn, tmp_path, consumer) -> None:
    broker = kafka_factory()
    streams = ["camera.events", "ai.inference.results", "notifications", "audit.logs"]
    create_topics(broker, [*streams, "dlq"], partitions=2)
    s = Setup(broker, pg_dsn, tmp_path, streams, "dlq", f"audit-{uuid.uuid4().hex[:6]}", free_port(),
              extra={"audit": {"reorder_timeout_s": 1.0, "check_interval_s": 0.2}})
    lossy = [build("gw-a", seq, "counting.interval", {}, camera_id="c1") for seq in (*range(1, 11), *range(13, 21))]
    explained = [build("gw-b", seq, "counting.interval", {}, camera_id="c1") for seq in (1, 2, 3, 4, 5, 8, 9, 10)]
    overflow = build("gw-b", 11, "outbox.overflow", {"dropped": {"ai.inference.results": [[6, 7]]}, "count": 2})
    s.produce(lossy + explained, "ai.inference.results")
    s.produce([overflow], "camera.events")
    proc = consumer(s)
    wait_rows(s.dsn, "events", len(lossy) + len(explained) + 1, proc=proc)
    gaps = wait_for(lambda: [r for r in read_topic(broker, "audit.logs") if r.json()["type"] == "audit.seq_gap"], 30,
                    message="an audit.seq_gap record")
    assert [(g.json()["data"]["device"], g.json()["data"]["from"], g.json()["data"]["to"]) for g in gaps] == \
        [("gw-a", 11, 12)]
    assert metric(s.port, "edge_seq_missing", {"device": "gw-a"}) == 2
    assert metric(s.port, "edge_seq_gaps_total", {"device": "gw-a"}) == 1
    assert metric(s.port, "edge_seq_missing", {"device": "gw-b"}) == 0
    assert metric(s.port, "edge_seq_explained_drops_total", {"device": "gw-b"}) == 2
    assert metric(s.port, "edge_seq_last", {"device": "gw-a"}) == 20
