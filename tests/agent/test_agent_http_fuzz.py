"""Hostile HTTP at a running agent (a real `edge-agent run` child process over a real Mosquitto).

hypothesis throws random methods, paths, headers, Content-Lengths and bodies (random bytes,
random JSON, deep nesting, near-valid publishes) at the agent's loopback port. Every answer
must be a well-formed HTTP response with a JSON body and no 5xx, a valid publish must still
get 200 after each one, and everything the agent answered 200 for must reach the far end.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import string
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_uplink import Acker

from edge_agent.common.wire import STREAMS
from edge_testkit.agent import AgentApi, write_agent_config
from edge_testkit.mqtt import start_mosquitto
from edge_testkit.processes import AgentProcess, wait_for

pytestmark = pytest.mark.timeout(300)

PATHS = ["/healthz", "/metrics", "/api/v1/status", "/api/v1/queue/publish", "/", "/api/v1/queue/publish?x=1",
         "//api/v1/queue/publish", "/api/v1/status/../status"]
_TOKEN = string.ascii_letters + string.digits + "-"
_HEADER_VALUE = "".join(chr(c) for c in range(0x20, 0x7f)) + "éü\t"
_SPECIAL_HEADERS = {"connection", "content-length", "transfer-encoding", "host", "expect"}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20)
messages = st.dictionaries(st.sampled_from(["type", "camera_id", "trace_id", "x"]) | st.text(max_size=8),
                           json_values | st.text(alphabet="0123456789abcdefABCDEF", min_size=32, max_size=32)
                           | st.text(min_size=120, max_size=140), max_size=5)
publishes = st.fixed_dictionaries({"topic": st.sampled_from([*STREAMS, "dlq", ""]), "message": messages}).map(
    lambda d: json.dumps(d).encode())
nestings = st.tuples(st.sampled_from([b"[", b'{"a":', b'{"topic":"notifications","message":{"a":']),
                     st.integers(1, 5000)).map(lambda t: t[0] * t[1])
bodies = st.one_of(publishes, json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=2000), nestings)


@dataclass
class Hostile:
    method: str
    path: str
    headers: list[tuple[str, str]]
    length: str  # how Content-Length is sent
    body: bytes

    def encode(self) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1", "Host: agent", "Connection: close"]
        declared = {"exact": str(len(self.body)), "negative": "-1", "garbage": "abc", "short": str(len(self.body) // 2),
                    "long": str(len(self.body) + 10), "huge": str(10**9), "spaces": f" {len(self.body)} "}
        if self.length in declared:
            lines.append(f"Content-Length: {declared[self.length]}")
        lines += [f"{k}: {v}" for k, v in self.headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


hostile_requests = st.builds(
    Hostile,
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"])
    | st.text(alphabet=string.ascii_uppercase, min_size=1, max_size=10),
    path=st.sampled_from(PATHS) | st.text(alphabet=string.printable.strip(), min_size=0, max_size=100).map(
        lambda s: "/" + s),
    headers=st.lists(st.tuples(st.text(alphabet=_TOKEN, min_size=1, max_size=20).filter(
        lambda n: n.lower() not in _SPECIAL_HEADERS), st.text(alphabet=_HEADER_VALUE, max_size=60)), max_size=5),
    length=st.sampled_from(["exact", "exact", "exact", "missing", "negative", "garbage", "short", "long", "huge",
                            "spaces"]),
    body=bodies)


def send(port: int, raw: bytes, method: str) -> http.client.HTTPResponse:
    """Send raw bytes, half-close, and parse the answer as an HTTP client would (read fully)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    try:
        sock.sendall(raw)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the server already answered (e.g. 400 for a bad Content-Length) and closed
            pass
        response = http.client.HTTPResponse(sock, method=method if method in ("HEAD", "GET", "POST") else None)
        response.begin()
        response.body = response.read()  # type: ignore[attr-defined]
        return response
    finally:
        sock.close()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory):
    if os.environ.get("EDGE_TEST_MQTT"):
        pytest.skip("needs its own Mosquitto")
    tmp = tmp_path_factory.mktemp("agent-fuzz")
    broker = start_mosquitto(tmp / "mosquitto")
    acker = Acker(broker.host, broker.port, client_id="fuzz-acker")
    cfg, port = write_agent_config(tmp, broker)
    proc = AgentProcess(["run", "-c", str(cfg)], tmp / "agent.log").start()
    api = AgentApi(port)
    try:
        api.wait_up(proc)
        yield proc, api, acker, port
    finally:
        proc.kill()
        acker.close()
        broker.kill()
        print(proc.output()[-3000:])


def test_hostile_http_gets_well_formed_4xx_and_valid_publishes_still_land(agent) -> None:
    proc, api, acker, port = agent
    confirmed: list[str] = []  # every id the agent answered 200 for

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(req=hostile_requests)
    def hostile_then_valid(req: Hostile) -> None:
        answer = send(port, req.encode(), req.method)
        assert answer.status < 500, (answer.status, answer.body[:300])
        ctype = answer.getheader("Content-Type", "")
        if not ctype.startswith("application/json"):  # only the Prometheus page is text
            assert (answer.status, req.method, ctype.split(";")[0]) == (200, "GET", "text/plain")
        elif req.method != "HEAD":
            doc = json.loads(answer.body)
            if answer.status == 200 and "messageId" in doc:
                confirmed.append(doc["messageId"])
        good = api.publish("notifications", {"type": "fuzz.valid", "after": req.method})
        assert good.status_code == 200, good.text
        confirmed.append(good.json()["messageId"])

    hostile_then_valid()
    assert proc.alive
    assert api.http.get("/healthz").status_code == 200
    wait_for(lambda: {e["id"] for e in acker.envelopes()} >= set(confirmed), 60,
             message=lambda: f"{len(set(confirmed) - {e['id'] for e in acker.envelopes()})} confirmed ids missing")
    wait_for(lambda: api.status()["outbox"]["depth"] == 0, 30, message="every confirmed entry acked")


@pytest.mark.parametrize("body", [
    b'{"topic": "notifications", "message": {"n": NaN}}',
    b'{"topic": "notifications", "message": {"n": -Infinity}}',
    b'{"topic": "notifications", "message": {"d": 1, "d": 2}}',
    b'{"topic": "notifications", "topic": "audit.logs", "message": {}}',
    b'{"topic": "notifications", "message": ' + b'{"a":' * 3000 + b'1' + b'}' * 3001,
    b'{"topic": "notifications", "message": {"t": "\xff"}}',  # not UTF-8
])
def test_what_is_not_strict_json_is_400_and_nothing_is_stored(agent, body) -> None:
    """The envelope carries what the producer sent: no NaN turned into null, no key silently dropped."""
    proc, api, acker, port = agent
    r = api.http.post("/api/v1/queue/publish", content=body)
    assert r.status_code == 400 and r.json()["error"].startswith("body"), r.text
