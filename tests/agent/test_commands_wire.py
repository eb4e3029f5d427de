"""Remote commands against a running `edge-agent run` over a real Mosquitto whose maximum packet
size is small: hostile requests and MQTT v5 properties get a 4xx and an audit record, answers
stay in the device's own topics and fit the broker's limit (a snapshot is downscaled, anything
else too big is a 413), a remote set_config cannot escalate, camera credentials never leave
the host; then a property-based run throws random requests at the command handler.

One agent serves the module (starting one loads the model and opens a camera).
"""

from __future__ import annotations

import base64
import json
import os
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from test_commands import props
from test_daemon import (
    DEVICE,
    SECRET,
    agent_config,
    file_camera,
    footage_file,
    start_agent,
    version_of_file,
)

from edge_agent.agent.command_auth import sign_request
from edge_agent.agent.commands import publish_packet_size
from edge_testkit.mqtt import start_mosquitto
from edge_testkit.processes import AgentProcess, free_port, wait_for

pytestmark = pytest.mark.timeout(300)

PACKET_LIMIT = 20_000  # Mosquitto's max_packet_size here: a full-size snapshot does not fit
SPACE = f"edge/{DEVICE}/"
CAMERA_PASSWORDS = ("hunter2", "s3cr3t-cam")  # one in a source URL, one in the environment
# Under the device's topics but no place for an answer (requests, uplink, acks, status).
RESERVED_REPLIES = (f"{SPACE}cmd/ping", f"{SPACE}cmd/get_status", f"{SPACE}up/camera.events",
                    f"{SPACE}ack", f"{SPACE}status")


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    correlation: bytes | None
    doc: Any = None  # the payload parsed once on arrival: waits scan many messages many times

    def json(self) -> Any:
        return self.doc


def _parsed(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except (ValueError, RecursionError):
        return None


class Wire:
    """The operator's MQTT v5 client: sends requests and sees every message anybody else
    publishes anywhere (``#`` with No Local), so an answer in the wrong place shows up too."""

    def __init__(self, port: int):
        self.lock = threading.Lock()
        self.messages: list[Message] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"wire-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe("#", options=SubscribeOptions(qos=1, noLocal=True))
        wait_for(self.subscribed.is_set, 10, message="SUBACK")

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        corr = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
        with self.lock:
            self.messages.append(Message(msg.topic, bytes(msg.payload), corr, _parsed(msg.payload)))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def since(self, mark: int) -> list[Message]:
        with self.lock:
            return self.messages[mark:]

    def mark(self) -> int:
        with self.lock:
            return len(self.messages)

    # --- sending ---

    def send_raw(self, topic: str, payload: bytes, props: Properties | None = None) -> None:
        self.client.publish(topic, payload, qos=1, properties=props).wait_for_publish(10)

    def build(self, name: str, args: Any = None, **fields: Any) -> tuple[str, dict]:
        topic = f"{SPACE}cmd/{name}"
        req = {"request_id": uuid.uuid4().hex, "args": {} if args is None else args,
               "ts": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"), "nonce": uuid.uuid4().hex,
               **fields}
        return topic, sign_request(SECRET.encode(), topic, req)

    def call(self, name: str, args: Any = None, *, props: Properties | None = None, timeout: float = 60,
             **fields: Any) -> tuple[Message, dict]:
        topic, req = self.build(name, args, **fields)
        mark = self.mark()
        self.send_raw(topic, json.dumps(req).encode(), props)
        return self.answer(req["request_id"], timeout, since=mark)

    # --- reading ---

    def answer(self, request_id: str, timeout: float = 60, *, since: int = 0) -> tuple[Message, dict]:
        def found() -> tuple[Message, dict] | None:
            with self.lock:
                return next(((m, doc) for m in self.messages[since:] if "/up/" not in m.topic
                             and isinstance(doc := m.json(), dict) and doc.get("request_id") == request_id), None)
        return wait_for(found, timeout, message=f"answer to {request_id}")

    def envelopes(self, type_: str) -> list[dict]:
        with self.lock:
            docs = [m.json() for m in self.messages if m.topic.startswith(f"{SPACE}up/")]
        return [d for d in docs if isinstance(d, dict) and d.get("type") == type_]

    def wait_envelope(self, type_: str, timeout: float = 60, **match: Any) -> dict:
        def found() -> dict | None:
            return next((e for e in reversed(self.envelopes(type_))
                         if all(e.get(k) == v or e["data"].get(k) == v for k, v in match.items())), None)
        return wait_for(found, timeout, message=f"{type_} {match}")


@dataclass
class Running:
    proc: AgentProcess
    cfg_path: Path
    wire: Wire


def big_disabled_camera() -> dict:
    """A camera whose lines make get_config's answer larger than the broker's packet limit."""
    lines = [{"id": f"line-{i:03d}-" + "x" * 200, "points": [[0.5, 0.0], [0.5, 1.0]]} for i in range(120)]
    return {"id": "cam-big", "source": "rtsp://127.0.0.1:9/none", "enabled": False, "lines": lines}


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    if os.environ.get("EDGE_TEST_MQTT"):
        pytest.skip("needs its own Mosquitto")
    tmp = tmp_path_factory.mktemp("commands-wire")
    broker = start_mosquitto(tmp / "mosquitto", extra_conf=f"max_packet_size {PACKET_LIMIT}\n")
    wire = Wire(broker.port)
    failing = {"reconnect_min_s": 0.5, "reconnect_max_s": 1, "fps": 1}
    cameras = [file_camera("cam-1", footage_file("PETS09-S2L1", "avi")),
               {"id": "cam-url", "source": f"rtsp://admin:hunter2@127.0.0.1:{free_port()}/s", **failing},
               {"id": "cam-env", "source": f"rtsp://127.0.0.1:{free_port()}/s", "username": "viewer",
                "password_env": "EDGE_TEST_CAM_PW", **failing},
               big_disabled_camera()]
    proc, path = start_agent(tmp, agent_config(tmp, broker.port, cameras), env={"EDGE_TEST_CAM_PW": "s3cr3t-cam"})
    try:
        wire.wait_envelope("agent.started", timeout=90)
        yield Running(proc, path, wire)
    finally:
        proc.kill()
        wire.close()
        broker.kill()


def assert_still_serving(wire: Wire) -> None:
    _, ping = wire.call("ping")
    assert ping["code"] == 200 and ping["result"]["pong"] is True
    _, status = wire.call("get_status")
    assert status["code"] == 200 and status["result"]["mqtt"]["connected"] is True


# --- answers fit the broker --------------------------------------------------------------------

def test_snapshot_is_downscaled_to_fit_the_brokers_packet_limit(running: Running) -> None:
    wire = running.wire
    msg, res = wait_for(lambda: (got := wire.call("snapshot", {"camera_id": "cam-1"}))[1]["ok"] and got, 90,
                        message="a snapshot of cam-1")
    jpeg = base64.b64decode(res["result"]["jpeg_base64"])
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[1] <= 768 and res["result"]["bytes"] == len(jpeg)
    assert publish_packet_size(msg.topic, len(msg.payload), msg.correlation) <= PACKET_LIMIT
    assert_still_serving(wire)  # a packet over the limit would have cost the agent its connection


def test_a_result_over_the_packet_limit_is_413_and_the_agent_stays_connected(running: Running) -> None:
    wire = running.wire
    msg, res = wire.call("get_config")
    assert (res["ok"], res["code"]) == (False, 413) and "maximum packet size" in res["error"]
    assert msg.topic == f"{SPACE}cmd/get_config/result"
    audit = wire.wait_envelope("command.rejected", request_id=res["request_id"])
    assert audit["data"]["code"] == 413
    assert_still_serving(wire)


# --- answers stay in the device's topics ---------------------------------------------------------

@pytest.mark.parametrize("response_topic", ["ops/replies/1", "edge/gw-other/reply/1", *RESERVED_REPLIES])
def test_a_response_topic_outside_the_devices_own_topics_is_ignored(running: Running, response_topic: str) -> None:
    wire = running.wire
    mark = wire.mark()
    msg, res = wire.call("ping", props=props(response_topic=response_topic, correlation=b"corr-1"))
    assert res["code"] == 200 and (msg.topic, msg.correlation) == (f"{SPACE}cmd/ping/result", b"corr-1")
    assert not [m for m in wire.since(mark) if m.topic == response_topic]


def test_a_response_topic_under_the_device_is_used(running: Running) -> None:
    msg, res = running.wire.call("ping", props=props(response_topic=f"{SPACE}reply/op-7", correlation=b"c-7"))
    assert res["code"] == 200 and (msg.topic, msg.correlation) == (f"{SPACE}reply/op-7", b"c-7")


def test_long_correlation_data_is_refused_and_echoed_nowhere(running: Running) -> None:
    wire = running.wire
    msg, res = wire.call("ping", props=props(correlation=b"Q" * 5000))
    assert (res["ok"], res["code"]) == (False, 400) and "correlation data" in res["error"]
    assert msg.correlation is None and b"QQQQ" not in msg.payload
    audit = wire.wait_envelope("command.rejected", request_id=res["request_id"])
    assert audit["correlation_id"] == res["request_id"] and "QQQQ" not in json.dumps(audit)


# --- malformed requests -------------------------------------------------------------------------

def _deep(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize("build, code, why", [
    (lambda r: (f"{SPACE}cmd/ping", b'{"a":' * 3000), 400, "nested too deeply"),
    (lambda r: (f"{SPACE}cmd/ping", b"[" * 3000), 400, "nested too deeply"),
    (lambda r: (f"{SPACE}cmd/ping", json.dumps({**r.wire.build("ping")[1], "sig": "é" * 64}).encode()), 401,
     "bad signature"),
    (lambda r: _signed(r.wire, "ping", ts="2027-01-15 08:00:00Z"), 400, "ts"),
    (lambda r: _signed(r.wire, "ping", ts="2027-01-15"), 400, "ts"),
    (lambda r: _signed(r.wire, "ping", args=[1, 2]), 400, "args"),
    (lambda r: _signed(r.wire, "set_config", args={"patch": _deep(600),
                                                   "expected_version": version_of_file(r.cfg_path)}), 400,
     "nested too deeply"),
])
def test_malformed_requests_get_a_4xx_and_an_audit_record(running: Running, build: Any, code: int, why: str) -> None:
    wire = running.wire
    topic, payload = build(running)
    mark = wire.mark()
    wire.send_raw(topic, payload)
    answer = wait_for(lambda: [m for m in wire.since(mark) if m.topic == f"{topic}/result"], 60,
                      message="an answer")[0].json()
    assert (answer["ok"], answer["code"]) == (False, code) and why in answer["error"]
    wait_for(lambda: [e for e in wire.envelopes("command.rejected") if e["data"]["code"] == code
                      and e["data"]["error"] == answer["error"]], 60, message="the audit record")
    assert_still_serving(wire)


def _signed(wire: Wire, name: str, *, args: Any = None, **fields: Any) -> tuple[str, bytes]:
    topic, req = wire.build(name, args, **fields)
    return topic, json.dumps(req).encode()


# --- remote config cannot escalate, credentials stay on the host --------------------------------

def test_a_remote_set_config_cannot_take_over_the_hosts_secrets(running: Running) -> None:
    wire = running.wire
    before = running.cfg_path.read_bytes()
    version = version_of_file(running.cfg_path)
    _, res = wire.call("set_config", {"patch": {"mqtt": {"host": "10.6.6.6", "password_env": "EDGE_CMD_SECRET"},
                                                "commands": None}, "expected_version": version})
    assert res["code"] == 403 and "mqtt.host" in res["error"]
    audit = wire.wait_envelope("command.rejected", request_id=res["request_id"])
    assert audit["data"]["refused"] == ["commands.enabled", "commands.hmac_secret_env", "mqtt.host",
                                        "mqtt.password_env"]
    assert running.cfg_path.read_bytes() == before
    _, ok = wire.call("set_config", {"patch": {"report": {"interval_s": 4}}, "expected_version": version})
    assert ok["code"] == 200 and ok["result"]["changed"] == ["report.interval_s"]


def test_camera_credentials_never_leave_the_host(running: Running) -> None:
    wire = running.wire
    for cam in ("cam-url", "cam-env"):
        wire.wait_envelope("camera.stream_error", camera_id=cam)
    with wire.lock:
        seen = b"".join(m.payload for m in wire.messages)
    text = running.proc.output()
    for password in CAMERA_PASSWORDS:
        assert password.encode() not in seen and password not in text
    errors = [e for e in wire.envelopes("camera.stream_error") if e.get("camera_id") == "cam-url"]
    assert errors[0]["data"]["source"].startswith("rtsp://***@127.0.0.1:")


# --- property-based: random requests at the running command handler ----------------------------

COMMANDS = ("ping", "get_status", "get_config", "set_config", "reload_config", "restart_camera", "snapshot",
            "flush_outbox")
TOPIC_TEXT = st.text(st.characters(whitelist_categories=("L", "N", "P", "S", "Zs"), blacklist_characters="+#"),
                     max_size=40)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=20)
REQUEST_LIKE = st.fixed_dictionaries({}, optional={
    "request_id": st.text(max_size=200) | JSON, "args": JSON, "ts": st.text(max_size=40) | JSON,
    "nonce": st.text(max_size=200) | JSON, "sig": st.text(max_size=80) | JSON, "extra": JSON})
RAW_PAYLOADS = st.one_of(
    st.binary(max_size=2000),
    JSON.map(lambda v: json.dumps(v).encode()),
    REQUEST_LIKE.map(lambda v: json.dumps(v).encode()),
    # Deep enough to break a recursive parser, small enough for the broker: a packet over its
    # max_packet_size would cost the operator's own connection, not test the agent.
    st.integers(1, 4000).map(lambda n: b"[" * n),
    st.integers(1, (PACKET_LIMIT - 2000) // 5).map(lambda n: b'{"a":' * n),
)
# Signed, fresh requests to real commands whose args are wrong: each must still be a 4xx.
NONEMPTY_DICT = st.dictionaries(st.text(min_size=1, max_size=8), JSON, min_size=1, max_size=3)
BAD_SIGNED = st.one_of(
    st.tuples(st.sampled_from(["ping", "get_status", "get_config", "reload_config", "flush_outbox"]), NONEMPTY_DICT),
    st.tuples(st.sampled_from(["restart_camera", "snapshot"]),
              st.fixed_dictionaries({"camera_id": st.text(max_size=20).filter(lambda s: not s.startswith("cam-"))})),
    st.tuples(st.just("set_config"), st.fixed_dictionaries({"patch": JSON, "expected_version": st.just("0" * 16)})),
    st.tuples(st.sampled_from(COMMANDS), JSON.filter(lambda v: v is not None and not isinstance(v, dict))),
)
RESPONSE_TOPICS = st.one_of(
    st.none(), TOPIC_TEXT.filter(bool), TOPIC_TEXT.map(lambda t: SPACE + t), st.sampled_from(RESERVED_REPLIES),
    TOPIC_TEXT.map(lambda t: "edge/gw-other/" + t))
CORRELATION = st.none() | st.binary(min_size=1, max_size=400)


@dataclass
class Tally:
    requests: int = 0  # sent on a request topic: each one is answered and audited


def _answers_since(wire: Wire, mark: int, fence_request_id: str) -> list[Message]:
    """What the agent published since ``mark``, its uplink, its status and the fence's answer left out."""
    return [m for m in wire.since(mark) if not m.topic.startswith(f"{SPACE}up/") and m.topic != f"{SPACE}status"
            and (m.json() if isinstance(m.json(), dict) else {}).get("request_id") != fence_request_id]


def test_random_requests_and_properties_get_4xx_answers_inside_the_device_topics(running: Running) -> None:
    wire = running.wire
    tally = Tally()
    rejected_before = len(wire.envelopes("command.rejected"))

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(name=st.sampled_from(COMMANDS) | TOPIC_TEXT, raw=RAW_PAYLOADS, signed=st.none() | BAD_SIGNED,
           response_topic=RESPONSE_TOPICS, correlation=CORRELATION)
    def one_request(name: str, raw: bytes, signed: tuple[str, Any] | None, response_topic: str | None,
                    correlation: bytes | None) -> None:
        if signed is not None:
            name, args = signed
            topic, payload = _signed(wire, name, args=args)
        else:
            topic, payload = f"{SPACE}cmd/{name}", raw
        is_request = bool(name) and "/" not in name
        mark = wire.mark()
        wire.send_raw(topic, payload, props(response_topic=response_topic, correlation=correlation))
        fence = wire.call("ping")  # the worker answers in arrival order: ours came first
        assert fence[1]["code"] == 200
        answers = _answers_since(wire, mark, fence[1]["request_id"])
        outside = [m.topic for m in answers if not m.topic.startswith(SPACE)]
        assert not outside, outside
        if not is_request:
            assert answers == [], answers
            return
        tally.requests += 1
        assert len(answers) == 1, answers
        answer, doc = answers[0], answers[0].json()
        assert doc["ok"] is False and 400 <= doc["code"] < 500, doc
        in_space = response_topic is not None and response_topic.startswith(SPACE)
        assert answer.topic in ({response_topic, f"{topic}/result"} if in_space else {f"{topic}/result"})
        assert answer.topic not in RESERVED_REPLIES
        bounded = correlation is not None and len(correlation) <= 256
        assert answer.correlation == (correlation if bounded else None)

    one_request()
    wait_for(lambda: len(wire.envelopes("command.rejected")) >= rejected_before + tally.requests, 60,
             message=lambda: f"{tally.requests} audit records")
    assert_still_serving(wire)
