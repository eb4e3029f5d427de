"""CommandProcessor alone (a stand-in AgentControl): verification, codes, audit, answers.

The same paths over a real Mosquitto with a real camera are in tests/test_daemon.py.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime, timezone
from typing import Any

import cv2
import numpy as np
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.agent.command_auth import ReplayCache, parse_rfc3339, sign_request
from edge_agent.agent.commands import CommandProcessor, publish_packet_size
from edge_agent.agent.liveconfig import (
    ChangeForbidden,
    ConfigRejected,
    VersionConflict,
    redact,
)
from edge_agent.agent.supervisor import UnknownCamera
from edge_agent.common.envelope import Draft

SECRET = b"s3cret"
NOW = 1_800_000_000.0
BASE = "edge/gw-1/cmd/"


class FakeControl:
    """Stand-in for the daemon: records calls and raises what the daemon would."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.cameras = 1

    def status(self) -> dict[str, Any]:
        return {"cameras": {f"cam-{i}": {"state": "running"} for i in range(1, self.cameras + 1)}}

    def config_document(self) -> tuple[str, dict[str, Any]]:
        return "v1", {"device_id": "gw-1", "mqtt": {"password_env": "PW", "password": "oops"},
                      "http": {"token": "t"}, "cameras": [{"id": "c", "source": "rtsp://admin:pw@cam/s"}]}

    def set_config(self, patch: dict, expected_version: str, *, correlation_id: str | None) -> dict:
        self.calls.append(("set_config", (patch, expected_version, correlation_id)))
        if expected_version != "v1":
            raise VersionConflict(expected_version, "v1")
        if "bad" in patch:
            raise ConfigRejected(["bad: unknown key", "cameras.0.source: cannot open rtsp://u:pw@h/s"])
        if "mqtt" in patch:
            raise ChangeForbidden(["mqtt.host"])
        return {"version": "v2", "changed": list(patch)}

    def reload_config(self, *, correlation_id: str | None) -> dict:
        return {"version": "v1", "changed": []}

    def restart_camera(self, camera_id: str) -> dict:
        if camera_id != "cam-1":
            raise UnknownCamera(camera_id)
        self.calls.append(("restart_camera", camera_id))
        return {"camera_id": camera_id, "restarted": True}

    def snapshot(self, camera_id: str, *, raw: bool = False) -> bytes | None:
        self.calls.append(("snapshot", camera_id, raw))
        if camera_id == "boom":
            raise RuntimeError("disk on fire")
        if camera_id == "noisy":
            return NOISY_JPEG
        if camera_id != "cam-1":
            raise UnknownCamera(camera_id)
        return b"\xff\xd8jpeg"

    def flush_outbox(self) -> dict:
        return {"depth": 0}


class Harness:
    def __init__(self, secret: bytes | None = SECRET, max_packet_size: int = 268_435_455) -> None:
        self.control = FakeControl()
        self.drafts: list[Draft] = []
        self.published: list[tuple[str, bytes, Any]] = []
        self.now = NOW
        self.proc = CommandProcessor(self.control, device_id="gw-1", topic_prefix="edge", secret=secret,
                                     window_s=60, emit=self.drafts.append, publish=self.publish,
                                     max_packet_size=lambda: max_packet_size, clock=lambda: self.now)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, correlation_data: bytes | None = None) -> None:
        self.published.append((topic, payload, correlation_data))

    def send(self, name: str, args: dict | None = None, *, sign: bool = True, ts: float | None = None,
             nonce: str = "nonce-0001", request_id: str = "r-1", props: Properties | None = None,
             tamper: bool = False):
        topic = BASE + name
        req = {"request_id": request_id, "args": args or {}, "ts": iso(ts or self.now), "nonce": nonce}
        if sign:
            req = sign_request(SECRET, topic, req)
        if tamper:
            req["args"] = {"camera_id": "other"}
        return self.proc.process(topic, json.dumps(req).encode(), props)


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


def props(*, response_topic: str | None = None, correlation: bytes | None = None) -> Properties:
    p = Properties(PacketTypes.PUBLISH)
    if response_topic is not None:
        p.ResponseTopic = response_topic
    if correlation is not None:
        p.CorrelationData = correlation
    return p


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_ping_is_answered_on_the_default_result_topic_and_audited(h: Harness) -> None:
    res = h.send("ping")
    assert res.ok and res.code == 200 and res.result["pong"] is True
    topic, payload, _ = h.published[-1]
    assert topic == BASE + "ping/result" and json.loads(payload)["request_id"] == "r-1"
    audit = h.drafts[-1]
    assert (audit.stream, audit.type) == ("audit.logs", "command.executed")
    assert audit.data["command"] == "ping" and audit.data["code"] == 200 and audit.correlation_id == "r-1"


def test_result_goes_to_the_response_topic_with_its_correlation_data(h: Harness) -> None:
    h.send("ping", props=props(response_topic="edge/gw-1/reply/42", correlation=b"corr-42"))
    topic, _, corr = h.published[-1]
    assert (topic, corr) == ("edge/gw-1/reply/42", b"corr-42")
    assert h.drafts[-1].correlation_id == "corr-42"


@pytest.mark.parametrize("response_topic", [
    "ops/replies/42",  # another tree
    "edge/gw-2/reply/42",  # another device
    "edge/gw-1",  # the device's own name, not under it
    "edge/gw-1/cmd/restart_camera",  # a request topic: the answer would be taken for a request
    "edge/gw-1/up/camera.events",  # the uplink: the bridge would dead-letter it
    "edge/gw-1/ack", "edge/gw-1/status",
])
def test_a_response_topic_outside_the_devices_own_topics_is_ignored(h: Harness, response_topic: str) -> None:
    res = h.send("ping", props=props(response_topic=response_topic, correlation=b"c-1"))
    assert res.code == 200
    assert [(t, c) for t, _, c in h.published] == [(BASE + "ping/result", b"c-1")]


def test_long_correlation_data_is_refused_and_echoed_nowhere(h: Harness) -> None:
    corr = b"k" * 257
    res = h.send("ping", props=props(correlation=corr))
    assert (res.code, res.request_id) == (400, "r-1") and "correlation data" in res.error
    topic, payload, echoed = h.published[-1]
    assert echoed is None and b"kkkk" not in payload
    audit = h.drafts[-1]
    assert audit.type == "command.rejected" and audit.correlation_id == "r-1"
    assert "kkkk" not in audit.model_dump_json()
    assert h.send("ping", nonce="nonce-0002", props=props(correlation=b"k" * 256)).code == 200


@pytest.mark.parametrize("mutate, reason", [
    (dict(sign=False), "missing signature"),
    (dict(tamper=True), "bad signature"),
    (dict(ts=NOW - 61), "stale"),
    (dict(ts=NOW + 61), "stale"),
])
def test_unauthenticated_requests_get_401(h: Harness, mutate: dict, reason: str) -> None:
    res = h.send("restart_camera", {"camera_id": "cam-1"}, **mutate)
    assert (res.ok, res.code) == (False, 401) and reason in res.error
    assert not h.control.calls  # nothing ran
    assert h.drafts[-1].type == "command.rejected" and h.drafts[-1].data["code"] == 401


def test_a_replayed_request_is_refused(h: Harness) -> None:
    assert h.send("ping", nonce="nonce-aaaa").code == 200
    h.now += 30
    res = h.send("ping", nonce="nonce-aaaa", ts=NOW)  # byte-identical request, still within the window
    assert res.code == 401 and "replayed" in res.error
    assert h.send("ping", nonce="nonce-bbbb").code == 200


def test_replay_cache_is_bounded_and_forgets_expired_nonces() -> None:
    cache = ReplayCache(window_s=60, max_entries=2)
    assert cache.check_and_add("a", 0) is None and cache.check_and_add("b", 1) is None
    assert "full" in cache.check_and_add("c", 2)
    assert cache.check_and_add("c", 200) is None  # a and b expired


@pytest.mark.parametrize("payload", [b"\xff\xfe not json", b"[1,2]", b'{"args": {}}', b'{"request_id": ""}',
                                     b'{"request_id": "r", "surprise": 1}', b"x" * 300_000,
                                     b'{"a":' * 3000, b"[" * 3000, b'{"request_id": "r", "args": [1]}',
                                     b'{"request_id": "r", "args": ' + b"[" * 3000 + b"]" * 3000 + b"}"])
def test_malformed_requests_get_400_are_audited_and_do_not_raise(h: Harness, payload: bytes) -> None:
    res = h.proc.process(BASE + "ping", payload, None)
    assert (res.ok, res.code) == (False, 400)
    assert h.drafts[-1].type == "command.rejected" and h.drafts[-1].data["code"] == 400
    assert json.loads(h.published[-1][1])["code"] == 400


def test_a_long_request_id_is_refused_and_not_echoed(h: Harness) -> None:
    res = h.send("ping", request_id="r" * 5000)
    assert res.code == 400 and res.request_id is None
    assert "rrrrr" not in h.published[-1][1].decode() and h.drafts[-1].data["request_id"] is None


def test_a_non_ascii_signature_is_401_not_500(h: Harness) -> None:
    topic = BASE + "ping"
    req = {"request_id": "r-1", "args": {}, "ts": iso(h.now), "nonce": "nonce-0001", "sig": "é" * 64}
    res = h.proc.process(topic, json.dumps(req, ensure_ascii=False).encode(), None)
    assert (res.code, res.error) == (401, "bad signature")


@pytest.mark.parametrize("ts", ["2027-01-15 08:00:00Z", "2027-01-15", "2027-01-15T08:00:00", "2027-01-15T08:00Z",
                                "２０２７-01-15T08:00:00Z", "2027-01-15T08:00:00Z\n", "2027-01-15T25:00:00Z"])
def test_ts_must_be_strict_rfc3339(h: Harness, ts: str) -> None:
    topic = BASE + "ping"
    req = sign_request(SECRET, topic, {"request_id": "r-1", "args": {}, "ts": ts, "nonce": "nonce-0001"})
    res = h.proc.process(topic, json.dumps(req).encode(), None)
    assert res.code == 400 and "ts" in res.error


def test_rfc3339_offsets_and_fractions_are_read() -> None:
    assert parse_rfc3339("2027-01-15T08:00:00Z") == parse_rfc3339("2027-01-15t09:00:00+01:00")
    assert parse_rfc3339("2027-01-15T08:00:00.250z") - parse_rfc3339("2027-01-15T08:00:00Z") == 0.25


def test_unknown_command_and_unknown_camera_get_404(h: Harness) -> None:
    assert h.send("format_disk").code == 404
    assert h.drafts[-1].data["command"] == "format_disk"
    assert h.send("restart_camera", {"camera_id": "nope"}, nonce="nonce-0002").code == 404
    assert h.send("snapshot", {"camera_id": "nope"}, nonce="nonce-0003").code == 404


def test_bad_args_get_400(h: Harness) -> None:
    res = h.send("restart_camera", {"camera": "cam-1"})
    assert res.code == 400 and "camera_id" in res.error


def test_a_forbidden_config_change_is_403_with_the_paths_in_the_audit_record(h: Harness) -> None:
    res = h.send("set_config", {"patch": {"mqtt": {"host": "evil"}}, "expected_version": "v1"})
    assert res.code == 403 and "mqtt.host" in res.error and "edit the config file" in res.error
    audit = h.drafts[-1]
    assert audit.type == "command.rejected" and audit.data["refused"] == ["mqtt.host"]


def test_set_config_codes(h: Harness) -> None:
    ok = h.send("set_config", {"patch": {"report": {"interval_s": 5}}, "expected_version": "v1"}, nonce="n-000001")
    assert ok.code == 200 and ok.result["version"] == "v2"
    assert h.control.calls[-1] == ("set_config", ({"report": {"interval_s": 5}}, "v1", "r-1"))
    stale = h.send("set_config", {"patch": {}, "expected_version": "v0"}, nonce="n-000002")
    assert stale.code == 409
    bad = h.send("set_config", {"patch": {"bad": 1}, "expected_version": "v1"}, nonce="n-000003")
    assert bad.code == 422 and "bad: unknown key" in bad.error
    assert "rtsp://***@h/s" in bad.error and "pw@" not in bad.error and "pw@" not in h.drafts[-1].model_dump_json()
    assert h.send("set_config", {"patch": {}}, nonce="n-000004").code == 400  # expected_version is required


def test_internal_failure_is_500_and_the_processor_survives(h: Harness) -> None:
    res = h.send("snapshot", {"camera_id": "boom"})
    assert res.code == 500 and "RuntimeError" in res.error
    assert h.drafts[-1].type == "command.executed"
    assert h.send("ping", nonce="nonce-0009").code == 200


def test_get_config_redacts_secret_values_but_not_variable_names(h: Harness) -> None:
    res = h.send("get_config")
    cfg = res.result["config"]
    assert res.result["version"] == "v1"
    assert cfg["mqtt"] == {"password_env": "PW", "password": "***"} and cfg["http"]["token"] == "***"
    assert cfg["cameras"][0]["source"] == "rtsp://***@cam/s"
    assert redact({"keepalive_s": 30, "tls": {"key": "/x"}}) == {"keepalive_s": 30, "tls": {"key": "***"}}


def _noisy_jpeg(width: int = 640, height: int = 480) -> bytes:
    """Noise: the worst case for JPEG, hundreds of KB at this size."""
    image = np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


NOISY_JPEG = _noisy_jpeg()


def test_snapshot_is_downscaled_until_its_answer_fits_the_packet_limit() -> None:
    h = Harness(max_packet_size=50_000)
    assert len(NOISY_JPEG) > 200_000
    reply = props(response_topic="edge/gw-1/reply/snap", correlation=b"c" * 200)
    res = h.send("snapshot", {"camera_id": "noisy"}, props=reply)
    assert res.code == 200, res.error
    topic, payload, corr = h.published[-1]
    assert (topic, corr) == ("edge/gw-1/reply/snap", b"c" * 200)
    assert publish_packet_size(topic, len(payload), corr) <= 50_000
    jpeg = base64.b64decode(json.loads(payload)["result"]["jpeg_base64"])
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[1] < 640 and res.result["bytes"] == len(jpeg)


def test_a_snapshot_that_cannot_fit_is_413_and_the_refusal_fits() -> None:
    h = Harness(max_packet_size=600)
    res = h.send("snapshot", {"camera_id": "noisy"})
    assert res.code == 413 and "maximum packet size" in res.error
    topic, payload, corr = h.published[-1]
    assert publish_packet_size(topic, len(payload), corr) <= 600
    assert h.drafts[-1].type == "command.rejected" and h.drafts[-1].data["code"] == 413


def test_any_result_over_the_packet_limit_is_413() -> None:
    h = Harness(max_packet_size=2_000)
    h.control.cameras = 200
    res = h.send("get_status")
    assert res.code == 413 and not res.ok and res.result is None
    topic, payload, corr = h.published[-1]
    assert json.loads(payload)["code"] == 413 and publish_packet_size(topic, len(payload), corr) <= 2_000
    h.control.cameras = 1
    assert h.send("get_status", nonce="nonce-0002").code == 200


def test_publish_packet_size_counts_what_the_broker_counts() -> None:
    # fixed header 1 + remaining length 1; topic 2 + 1; packet id 2; properties length 1 + 0; payload 3
    assert publish_packet_size("t", 3, None) == 1 + 1 + 2 + 1 + 2 + 1 + 3
    assert publish_packet_size("t", 200, b"xy") == 1 + 2 + 2 + 1 + 2 + 1 + (1 + 2 + 2) + 200


def test_snapshot_is_base64_jpeg(h: Harness) -> None:
    res = h.send("snapshot", {"camera_id": "cam-1"})
    import base64
    assert base64.b64decode(res.result["jpeg_base64"]) == b"\xff\xd8jpeg"


def test_snapshot_is_annotated_unless_args_raw(h: Harness) -> None:
    assert h.send("snapshot", {"camera_id": "cam-1"}).code == 200
    assert h.send("snapshot", {"camera_id": "cam-1", "raw": True}, nonce="nonce-0002").code == 200
    assert h.send("snapshot", {"camera_id": "cam-1", "raw": "maybe"}, nonce="nonce-0003").code == 400
    assert [c for c in h.control.calls if c[0] == "snapshot"] == [("snapshot", "cam-1", False),
                                                                  ("snapshot", "cam-1", True)]


def test_without_secret_unsigned_requests_run() -> None:
    h = Harness(secret=None)
    assert h.send("ping", sign=False).code == 200


def test_own_result_topics_are_ignored_so_answers_never_loop(h: Harness) -> None:
    h.proc.on_message(BASE + "ping/result", b'{"request_id": "r"}', None)
    assert h.proc._queue.empty()


def test_without_secret_the_start_warns_that_the_acl_is_the_only_guard(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="edge_agent.agent.commands"):
        Harness(secret=None)
    assert "ACL is the only guard" in caplog.text


def test_commands_are_counted_by_command_and_code(h: Harness) -> None:
    from edge_agent.common.metrics import COMMANDS
    before = COMMANDS.labels(command="unknown", result="404")._value.get()
    h.send("no_such_thing")
    assert COMMANDS.labels(command="unknown", result="404")._value.get() == before + 1


def test_a_flood_beyond_the_queue_is_answered_503_not_dropped_silently(h: Harness) -> None:
    from edge_agent.agent.commands import QUEUE_SIZE
    for i in range(QUEUE_SIZE):  # the worker is not started: the queue fills up
        h.proc.on_message(BASE + "ping", b'{"request_id": "q%d"}' % i, None)
    h.proc.on_message(BASE + "ping", b'{"request_id": "overflow"}', None)
    from edge_testkit.processes import wait_for
    wait_for(lambda: any(json.loads(p)["request_id"] == "overflow" for _, p, _ in h.published), 10)
    answer = next(json.loads(p) for _, p, _ in h.published if json.loads(p)["request_id"] == "overflow")
    assert answer["code"] == 503 and h.drafts[-1].type == "command.rejected"
    h.proc.start()  # the queued ones are still answered
    wait_for(lambda: len(h.published) == QUEUE_SIZE + 1, 10)
    h.proc.stop()


def test_the_worker_restarts_after_a_crash_outside_a_requests_guard(h: Harness) -> None:
    from edge_testkit.processes import wait_for
    process, crashes = h.proc.process, []

    def crash_once(*args: Any) -> Any:  # SystemExit from a library slips past the per-request guard
        if not crashes:
            crashes.append(1)
            raise SystemExit("library bailed out")
        return process(*args)

    h.proc.process = crash_once  # type: ignore[method-assign]
    h.proc.start()
    try:
        h.proc.on_message(BASE + "ping", b'{"request_id": "lost"}', None)
        h.proc.on_message(BASE + "ping", b'{"request_id": "after"}', None)
        wait_for(lambda: any(json.loads(p)["request_id"] == "after" for _, p, _ in h.published), 10)
        assert h.proc.thread.report()["restarts"] == 1 and h.proc.thread.report()["state"] == "running"
    finally:
        h.proc.stop()
    assert h.proc.thread.report()["state"] == "stopped"
