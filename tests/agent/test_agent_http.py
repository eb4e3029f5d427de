"""The agent's loopback HTTP over a real socket, with a real outbox behind it."""

from __future__ import annotations

import json
import re
import socket

import diskcache
import httpx
import pytest

from edge_agent.agent.config import OutboxConfig
from edge_agent.agent.http import AgentHttp
from edge_agent.agent.outbox import Outbox
from edge_agent.common.envelope import MAX_MESSAGE_BYTES, Envelope
from edge_testkit.processes import wait_for


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


def test_an_empty_camera_id_or_trace_id_means_none_as_on_the_bridge(served):
    client, box = served()
    message = {"type": "door.open", "camera_id": "", "trace_id": ""}
    assert client.post("/api/v1/queue/publish", json={"topic": "notifications", "message": message}).status_code == 200
    env = Envelope.model_validate_json(box.take_unsent(1)[0].payload)
    assert env.camera_id is None and env.trace_id and env.data == message


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


# --- one bad input fails alone ----------------------------------------------------------------

@pytest.mark.parametrize("message, field", [
    ({"type": "t" * 129}, "message.type"),
    ({"type": "door.open", "trace_id": "A" * 32}, "message.trace_id"),
    ({"camera_id": "c" * 129}, "message.camera_id"),
])
def test_a_message_that_breaks_the_envelope_rules_is_400_naming_the_field(served, message, field):
    client, box = served()
    r = client.post("/api/v1/queue/publish", json={"topic": "notifications", "message": message})
    assert r.status_code == 400 and r.json()["error"].startswith(field + ":"), r.text
    assert box.depth() == 0
    assert client.post("/api/v1/queue/publish", json={"topic": "notifications", "message": {}}).status_code == 200


def test_an_envelope_over_the_bridge_limit_is_413_and_one_under_it_is_stored(served):
    client, box = served()
    body = json.dumps({"topic": "notifications", "message": {"pad": "x" * (MAX_MESSAGE_BYTES - 100)}})
    assert len(body) < MAX_MESSAGE_BYTES  # the body fits; its envelope does not
    r = client.post("/api/v1/queue/publish", content=body)
    assert r.status_code == 413 and "max_message_bytes" in r.json()["error"]
    fits = json.dumps({"topic": "notifications", "message": {"pad": "x" * (MAX_MESSAGE_BYTES - 400)}})
    assert client.post("/api/v1/queue/publish", content=fits).status_code == 200
    stored = box.take_unsent(1)[0].payload
    assert len(stored) <= MAX_MESSAGE_BYTES and Envelope.model_validate_json(stored).data["pad"]
    assert box.depth() == 1


def test_a_full_disk_answers_507_and_the_outbox_takes_more_once_room_is_made(served, tmp_path):
    # SQLite's max_page_count, kept in the cache's settings, stands in for a small file system.
    diskcache.Cache(str(tmp_path / "outbox"), sqlite_max_page_count=48).close()
    client, box = served()
    codes = [client.post("/api/v1/queue/publish",
                         json={"topic": "notifications", "message": {"pad": "x" * 2000}}).status_code
             for _ in range(80)]
    assert 507 in codes and set(codes) == {200, 507}, codes
    r = client.post("/api/v1/queue/publish", json={"topic": "notifications", "message": {"pad": "x" * 2000}})
    assert r.status_code == 507 and "disk full" in r.json()["error"]
    assert client.get("/api/v1/status").status_code == 200
    box.ack([e.seq for e in box.take_unsent(1000)])
    wait_for(lambda: client.post("/api/v1/queue/publish",
                                 json={"topic": "notifications", "message": {"n": 1}}).status_code == 200,
             10, interval=0.1, message="a put after the deletes made room")


# --- bounded HTTP -------------------------------------------------------------------------------

def raw_request(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes, half-close, and read the whole answer (the server closes after errors)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:  # the server already answered and closed: its answer is still to be read
            pass
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def status_of(answer: bytes) -> int:
    m = re.match(rb"HTTP/1\.[01] (\d{3}) ", answer)
    assert m, answer[:200]
    return int(m.group(1))


@pytest.fixture
def bounded(tmp_path):
    box = Outbox(OutboxConfig(path=tmp_path / "outbox"), "gw-1")
    http = AgentHttp("127.0.0.1", 0, box, lambda: {"outbox": box.stats()}, max_connections=4,
                     read_timeout_s=1.5, max_body=10_000)
    http.start()
    yield http, box
    http.stop()
    box.close()


@pytest.mark.parametrize("headers, code", [
    (b"Content-Length: -1\r\n", 400),
    (b"Content-Length: abc\r\n", 400),
    (b"Content-Length: 5\r\nContent-Length: 6\r\n", 400),
    (b"", 411),
    (b"Transfer-Encoding: chunked\r\n", 411),
    (b"Content-Length: 300000000\r\n", 413),
])
def test_bad_content_lengths_get_a_4xx_answer(bounded, headers, code):
    http, box = bounded
    answer = raw_request(http.port, b"POST /api/v1/queue/publish HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n{}")
    assert status_of(answer) == code
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["status"] == "error"
    assert box.depth() == 0


@pytest.mark.parametrize("request_line, code", [
    (b"BREW /api/v1/status HTTP/1.1", 405),
    (b"GET /healthz HTTP/2.0", 400),
    (b"GET /" + b"x" * 70_000 + b" HTTP/1.1", 414),
    (b"complete nonsense here now", 400),
])
def test_malformed_request_lines_get_a_4xx_never_a_5xx(bounded, request_line, code):
    http, _ = bounded
    assert status_of(raw_request(http.port, request_line + b"\r\nHost: x\r\n\r\n")) == code


def test_idle_half_sent_connections_end_and_the_cap_refuses_more_at_once(bounded):
    http, box = bounded
    idle = [socket.create_connection(("127.0.0.1", http.port), timeout=10) for _ in range(4)]
    try:
        for s in idle:
            s.sendall(b"POST /api/v1/queue/publish HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"topic\"")
        # The cap holds four: a fifth connection is answered 503 at once, without a thread.
        wait_for(lambda: status_of(raw_request(http.port, b"")) == 503, 5, message="503 past the cap")
        # The read timeout ends the idle ones (408, then the server closes)...
        for s in idle:
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
            assert status_of(answer) == 408
    finally:
        for s in idle:
            s.close()
    # ...so their slots are free again.
    client = httpx.Client(base_url=f"http://127.0.0.1:{http.port}", timeout=10)
    wait_for(lambda: client.post("/api/v1/queue/publish", json={"topic": "notifications", "message": {}}
                                 ).status_code == 200, 10, message="a publish after the idle ones ended")
    assert box.depth() == 1
