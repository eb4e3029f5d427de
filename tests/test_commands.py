"""CommandProcessor alone (a stand-in AgentControl): verification, codes, audit, answers.

The same paths over a real Mosquitto with a real camera are in tests/test_daemon.py.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.commands import CommandProcessor, ReplayCache, UnknownCamera, redact, sign_request
from edge_agent.envelope import Draft
from edge_agent.liveconfig import ConfigRejected, VersionConflict

SECRET = b"s3cret"
NOW = 1_800_000_000.0
BASE = "edge/gw-1/cmd/"


class FakeControl:
    """Stand-in for the daemon: records calls and raises what the daemon would."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def status(self) -> dict[str, Any]:
        return {"cameras": {"cam-1": {"state": "running"}}}

    def config_document(self) -> tuple[str, dict[str, Any]]:
        return "v1", {"device_id": "gw-1", "mqtt": {"password_env": "PW", "password": "oops"},
                      "http": {"token": "t"}}

    def set_config(self, patch: dict, expected_version: str, *, correlation_id: str | None) -> dict:
        self.calls.append(("set_config", (patch, expected_version, correlation_id)))
        if expected_version != "v1":
            raise VersionConflict(expected_version, "v1")
        if "bad" in patch:
            raise ConfigRejected(["bad: unknown key"])
        return {"version": "v2", "changed": list(patch)}

    def reload_config(self, *, correlation_id: str | None) -> dict:
        return {"version": "v1", "changed": []}

    def restart_camera(self, camera_id: str) -> dict:
        if camera_id != "cam-1":
            raise UnknownCamera(camera_id)
        self.calls.append(("restart_camera", camera_id))
        return {"camera_id": camera_id, "restarted": True}

    def snapshot(self, camera_id: str) -> bytes | None:
        if camera_id == "boom":
            raise RuntimeError("disk on fire")
        if camera_id != "cam-1":
            raise UnknownCamera(camera_id)
        return b"\xff\xd8jpeg"

    def flush_outbox(self) -> dict:
        return {"depth": 0}


class Harness:
    def __init__(self, secret: bytes | None = SECRET) -> None:
        self.control = FakeControl()
        self.drafts: list[Draft] = []
        self.published: list[tuple[str, bytes, Any]] = []
        self.now = NOW
        self.proc = CommandProcessor(self.control, device_id="gw-1", topic_prefix="edge", secret=secret,
                                     window_s=60, emit=self.drafts.append, publish=self.publish,
                                     clock=lambda: self.now)

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
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "ops/replies/42"
    props.CorrelationData = b"corr-42"
    h.send("ping", props=props)
    topic, _, corr = h.published[-1]
    assert (topic, corr) == ("ops/replies/42", b"corr-42")
    assert h.drafts[-1].correlation_id == "corr-42"


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
                                     b'{"request_id": "r", "surprise": 1}', b"x" * 300_000])
def test_malformed_requests_get_400_are_audited_and_do_not_raise(h: Harness, payload: bytes) -> None:
    res = h.proc.process(BASE + "ping", payload, None)
    assert (res.ok, res.code) == (False, 400)
    assert h.drafts[-1].type == "command.rejected" and h.drafts[-1].data["code"] == 400
    assert json.loads(h.published[-1][1])["code"] == 400


def test_unknown_command_and_unknown_camera_get_404(h: Harness) -> None:
    assert h.send("format_disk").code == 404
    assert h.drafts[-1].data["command"] == "format_disk"
    assert h.send("restart_camera", {"camera_id": "nope"}, nonce="nonce-0002").code == 404
    assert h.send("snapshot", {"camera_id": "nope"}, nonce="nonce-0003").code == 404


def test_bad_args_get_400(h: Harness) -> None:
    res = h.send("restart_camera", {"camera": "cam-1"})
    assert res.code == 400 and "camera_id" in res.error


def test_set_config_codes(h: Harness) -> None:
    ok = h.send("set_config", {"patch": {"report": {"interval_s": 5}}, "expected_version": "v1"}, nonce="n-000001")
    assert ok.code == 200 and ok.result["version"] == "v2"
    assert h.control.calls[-1] == ("set_config", ({"report": {"interval_s": 5}}, "v1", "r-1"))
    stale = h.send("set_config", {"patch": {}, "expected_version": "v0"}, nonce="n-000002")
    assert stale.code == 409
    bad = h.send("set_config", {"patch": {"bad": 1}, "expected_version": "v1"}, nonce="n-000003")
    assert bad.code == 422 and "bad: unknown key" in bad.error
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
    assert redact({"keepalive_s": 30, "tls": {"key": "/x"}}) == {"keepalive_s": 30, "tls": {"key": "***"}}


def test_snapshot_is_base64_jpeg(h: Harness) -> None:
    res = h.send("snapshot", {"camera_id": "cam-1"})
    import base64
    assert base64.b64decode(res.result["jpeg_base64"]) == b"\xff\xd8jpeg"


def test_without_secret_unsigned_requests_run() -> None:
    h = Harness(secret=None)
    assert h.send("ping", sign=False).code == 200


def test_own_result_topics_are_ignored_so_answers_never_loop(h: Harness) -> None:
    h.proc.on_message(BASE + "ping/result", b'{"request_id": "r"}', None)
    assert h.proc._queue.empty()


def test_without_secret_the_start_warns_that_the_acl_is_the_only_guard(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="edge_agent.commands"):
        Harness(secret=None)
    assert "ACL is the only guard" in caplog.text


def test_commands_are_counted_by_command_and_code(h: Harness) -> None:
    from edge_agent.metrics import COMMANDS
    before = COMMANDS.labels(command="unknown", result="404")._value.get()
    h.send("no_such_thing")
    assert COMMANDS.labels(command="unknown", result="404")._value.get() == before + 1


def test_a_flood_beyond_the_queue_is_answered_503_not_dropped_silently(h: Harness) -> None:
    from edge_agent.commands import QUEUE_SIZE
    for i in range(QUEUE_SIZE):  # the worker is not started: the queue fills up
        h.proc.on_message(BASE + "ping", b'{"request_id": "q%d"}' % i, None)
    h.proc.on_message(BASE + "ping", b'{"request_id": "overflow"}', None)
    from brokers import wait_for
    wait_for(lambda: any(json.loads(p)["request_id"] == "overflow" for _, p, _ in h.published), 10)
    answer = next(json.loads(p) for _, p, _ in h.published if json.loads(p)["request_id"] == "overflow")
    assert answer["code"] == 503 and h.drafts[-1].type == "command.rejected"
    h.proc.start()  # the queued ones are still answered
    wait_for(lambda: len(h.published) == QUEUE_SIZE + 1, 10)
    h.proc.stop()
