"""Property: whatever records land in a topic, the running consumer keeps going, and every record
ends either applied in PostgreSQL or in the dlq -- never both, never neither."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer_helpers import healthz, sink_state, sql
from edge_agent.common.envelope import build
from edge_testkit.kafka import create_topics
from edge_testkit.processes import wait_for
from edge_testkit.records import TopicRecorder

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
FIELDS = ["v", "id", "device_id", "camera_id", "seq", "type", "ts", "trace_id", "data"]


def envelope_doc(seq: int, data: dict[str, Any]) -> dict[str, Any]:
    return json.loads(build("gw-fuzz", seq, "counting.crossing", data, camera_id="c").model_dump_json())


@st.composite
def records(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "mutated", "crossing"]))
    if kind == "bytes":
        return draw(st.binary(max_size=120))
    if kind == "json":
        return json.dumps(draw(JSON)).encode()
    seq = draw(st.integers(1, 10**6))
    if kind == "mutated":
        doc = envelope_doc(seq, {"line": "door", "direction": "in"})
        doc[draw(st.sampled_from(FIELDS))] = draw(JSON)
        return json.dumps(doc).encode()
    data = {"line": draw(st.text(max_size=10)), "direction": draw(st.sampled_from(["in", "out", "up"])),
            "class": draw(st.text(max_size=6)), "ts": draw(st.sampled_from(["2026-12-01T10:00:00Z", "never", ""]))}
    return json.dumps(envelope_doc(seq, data)).encode()


def test_random_records_never_stop_the_consumer_and_each_ends_applied_or_dead_lettered(setup, consumer) -> None:
    from confluent_kafka import Producer

    from edge_testkit.kafka import client_config

    topic = setup.topics[0] + "-one"
    create_topics(setup.kafka, [topic], partitions=1)  # one partition: the marker comes last
    setup.topics = [topic]
    proc = consumer(setup)
    wait_for(lambda: sink_state(setup.port) == "up" and sql(setup.dsn, "SELECT to_regclass('edge.events')")[0][0], 30,
             interval=0.1, message="the consumer connected to PostgreSQL")
    producers = [Producer(client_config(setup.kafka))]  # in a list: dropped at the end, not kept by the closure
    recorder = TopicRecorder(setup.kafka, [setup.dlq], partitions=2).start()
    marker_seq = [0]
    seen = {"dlq": 0, "applied": 0}

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(records(), min_size=1, max_size=8))
    def check(batch: list[bytes]) -> None:
        marker_seq[0] += 1
        marker = build("gw-marker", marker_seq[0], "counting.crossing",
                       {"line": "m", "direction": "in", "class": "x"}, camera_id="c")
        offsets: list[int] = []
        for value in batch:
            producers[0].produce(topic, value=value, on_delivery=lambda err, msg: offsets.append(msg.offset()))
        producers[0].produce(topic, value=marker.model_dump_json().encode())
        assert producers[0].flush(20) == 0
        wait_for(lambda: sql(setup.dsn, "SELECT 1 FROM edge.events WHERE id = %s", marker.id), 60, interval=0.05,
                 message=lambda: f"the marker after {batch!r}\n{proc.output()[-2000:]}")

        def accounted() -> dict[int, str] | None:
            dead = {int(r.headers["dlq-source-offset"]): "dlq" for r in recorder.snapshot(setup.dlq)
                    if int(r.headers["dlq-source-offset"]) in offsets}
            applied = {}
            for offset, value in zip(offsets, batch):
                try:
                    doc = json.loads(value)
                    found = sql(setup.dsn, "SELECT 1 FROM edge.events WHERE id::text = %s", str(doc.get("id")))
                except Exception:  # noqa: BLE001 - not JSON, no id, not a uuid: not applied
                    found = []
                if found:
                    applied[offset] = "applied"
            both = set(dead) & set(applied)
            assert not both, f"records both applied and dead-lettered: {both}"
            return {**dead, **applied} if len(dead) + len(applied) >= len(batch) else None
        fates = wait_for(accounted, 20, message=lambda: f"every record of {batch!r} applied or in the dlq")
        for fate in fates.values():
            seen[fate] += 1
        code, body = healthz(setup.port)
        assert code == 200 and proc.alive, body

    try:
        check()
    finally:
        recorder.stop()
        producers.clear()  # its thread would keep calling the session broker after the session
    assert seen["dlq"] and seen["applied"], seen  # both fates were exercised


def test_any_http_request_gets_an_answer_below_500(setup, consumer) -> None:
    import httpx

    proc = consumer(setup)
    wait_for(lambda: sink_state(setup.port) == "up", 30, interval=0.1, message="the consumer's HTTP")
    client = httpx.Client(base_url=f"http://127.0.0.1:{setup.port}", timeout=10)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
           st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="#%?"), max_size=40),
           st.binary(max_size=200))
    def check(method: str, path: str, body: bytes) -> None:
        r = client.request(method, "/" + path, content=body if method not in ("GET", "HEAD") else None)
        assert r.status_code < 500, (method, path, r.status_code)
        if method == "GET" and path == "healthz":
            assert r.json()["status"] == "ok"

    try:
        check()
    finally:
        client.close()
    assert proc.alive
