"""The agent's loopback HTTP over a real socket, with a real outbox behind it."""

from __future__ import annotations

import httpx
import pytest

from edge_agent.agent_http import AgentHttp
from edge_agent.config import OutboxConfig
from edge_agent.envelope import Envelope
from edge_agent.outbox import Outbox


@pytest.fixture
def served(tmp_path):
    def make(**outbox_kw):
        box = Outbox(OutboxConfig(path=tmp_path / "outbox", **outbox_kw), "gw-1")
        http = AgentHttp("127.0.0.1", 0, box, lambda: {"outbox": box.stats(), "mqtt": {"connected": False}})
        http.start()
        made.append((http, box))
        return httpx.Client(base_url=f"http://127.0.0.1:{http.port}", timeout=10), box

    made: list = []
    yield make
    for http, box in made:
        http.stop()
        box.close()


def test_publish_is_durable_and_wrapped_in_an_envelope(served):
    client, box = served()
    r = client.post("/api/v1/queue/publish", json={"topic": "notifications",
                                                     "message": {"type": "door.open", "camera_id": "cam-2", "n": 1}},
                    headers={"X-Correlation-ID": "corr-1"})
    assert r.status_code == 200 and r.json()["status"] == "ok"
    entry = box.take_unsent(10)[0]
    env = Envelope.model_validate_json(entry.payload)
    assert env.id == r.json()["messageId"] and entry.stream == "notifications"
    assert env.type == "door.open" and env.camera_id == "cam-2" and env.correlation_id == "corr-1"
    assert env.data == {"type": "door.open", "camera_id": "cam-2", "n": 1}


def test_message_without_a_type_is_external(served):
    client, box = served()
    assert client.post("/api/v1/queue/publish", json={"topic": "camera.events", "message": {"x": 1}}).status_code == 200
    env = Envelope.model_validate_json(box.take_unsent(1)[0].payload)
    assert env.type == "external" and env.camera_id is None


@pytest.mark.parametrize("body, needle", [
    ({"topic": "dlq", "message": {}}, "topic must be one of"),
    ({"topic": "notifications", "message": [1, 2]}, "message"),
    ({"topic": "notifications", "message": "text"}, "message"),
    ({"message": {}}, "topic"),
    ({"topic": "notifications", "message": {}, "extra": 1}, "extra"),
])
def test_bad_bodies_get_400_and_store_nothing(served, body, needle):
    client, box = served()
    r = client.post("/api/v1/queue/publish", json=body)
    assert r.status_code == 400 and r.json()["status"] == "error"
    assert needle in r.json()["error"]
    assert box.depth() == 0


def test_invalid_json_gets_400(served):
    client, box = served()
    r = client.post("/api/v1/queue/publish", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and box.depth() == 0


def test_full_outbox_that_refuses_answers_507_and_keeps_what_it_has(served):
    client, box = served(max_bytes=3000, overflow="refuse")
    codes = [client.post("/api/v1/queue/publish",
                         json={"topic": "notifications", "message": {"pad": "x" * 300}}).status_code
             for _ in range(20)]
    assert 507 in codes
    stored = codes.index(507)
    assert set(codes[:stored]) == {200} and box.depth() == stored


def test_status_health_and_metrics(served):
    client, box = served()
    client.post("/api/v1/queue/publish", json={"topic": "audit.logs", "message": {}})
    assert client.get("/healthz").status_code == 200
    st = client.get("/api/v1/status").json()
    assert {"depth", "bytes", "oldest_age_s", "by_stream"} <= set(st["outbox"])
    assert st["outbox"]["by_stream"]["audit.logs"] == 1 and st["mqtt"] == {"connected": False}
    text = client.get("/metrics").text
    for name in ("edge_outbox_depth", "edge_outbox_bytes", "edge_published_total", "edge_acked_total",
                 "edge_resent_total", "edge_outbox_dropped_total"):
        assert f"# TYPE {name}" in text or f"# TYPE {name.removesuffix('_total')}" in text, name
    assert client.get("/nope").status_code == 404
