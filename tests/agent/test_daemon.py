"""The daemon over the real wire: `edge-agent run` with real cameras on the footage, a real
Mosquitto, signed commands from an operator client, live config, audit records, a camera
source that dies mid-run, graceful SIGTERM and the systemd notify protocol.

One agent serves the command/config tests of this module (starting one loads the model and
opens cameras); tests that stop an agent start their own.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import threading
import time
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.agent.command_auth import sign_request
from edge_testkit.agent import NotifySocket
from edge_testkit.mqtt import start_mosquitto
from edge_testkit.processes import AgentProcess, free_port, shared_dir, wait_for

SECRET = "op-secret-for-tests"
DEVICE = "gw-ops"
pytestmark = pytest.mark.timeout(240)


def footage_file(name: str, ext: str) -> Path:
    path = shared_dir() / "footage" / name / f"{name}.{ext}"
    if not path.is_file():
        pytest.skip(f"footage {path} missing (set EDGE_SHARED_DIR)")
    return path


def model_file() -> Path:
    path = shared_dir() / "models" / "yolox_nano.onnx"
    if not path.is_file():
        pytest.skip(f"model {path} missing (set EDGE_SHARED_DIR)")
    return path


def version_of_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# --- a camera that can die: the footage streamed over HTTP at about real time -----------------

class DyingStream:
    """Serves a video file over HTTP, throttled like a live feed; ``die()`` cuts it mid-stream."""

    def __init__(self, video: Path, rate_bytes_s: int = 300_000):
        self.video = video
        self.rate = rate_bytes_s
        self.port = free_port()
        self.dead = threading.Event()
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{self.video.name}"

    def start(self) -> "DyingStream":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Type", "video/x-msvideo")
                self.end_headers()
                chunk = owner.rate // 10
                with open(owner.video, "rb") as f:
                    while not owner.dead.is_set():
                        data = f.read(chunk)
                        if not data:
                            return
                        try:
                            self.wfile.write(data)
                        except OSError:
                            return
                        owner.dead.wait(0.1)  # throttle like a live camera; die() ends it at once

        self.dead.clear()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def die(self) -> None:
        """Stop mid-file: open connections end, new ones are refused."""
        self.dead.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


# --- the operator: signs commands, reads results and the device's uplink ----------------------

class Operator:
    def __init__(self, port: int, device: str = DEVICE, secret: str | None = SECRET):
        self.device = device
        self.secret = secret.encode() if secret else None
        self.lock = threading.Lock()
        self.results: list[tuple[str, dict, bytes | None]] = []
        self.envelopes: dict[str, dict] = {}
        self.receipts: dict[str, int] = {}  # envelope id -> times received
        self.statuses: list[dict] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"op-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        base = f"edge/{device}"
        for topic in (f"{base}/cmd/+/result", f"{base}/reply/#", f"{base}/up/#", f"{base}/status"):
            self.client.subscribe(topic, qos=1)

    def _on_message(self, client, userdata, msg) -> None:
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            return
        corr = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
        with self.lock:
            if "/up/" in msg.topic:
                self.envelopes[doc["id"]] = doc  # the agent may send an entry twice: keep one
                self.receipts[doc["id"]] = self.receipts.get(doc["id"], 0) + 1
            elif msg.topic.endswith("/status"):
                self.statuses.append(doc)
            else:
                self.results.append((msg.topic, doc, corr))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    # --- sending ---

    def build(self, name: str, args: dict | None = None, *, ts: datetime | None = None,
              sign: bool = True, request_id: str | None = None) -> tuple[str, bytes]:
        topic = f"edge/{self.device}/cmd/{name}"
        req = {"request_id": request_id or uuid.uuid4().hex, "args": args or {},
               "ts": (ts or datetime.now(timezone.utc)).isoformat().replace("+00:00", "Z"),
               "nonce": uuid.uuid4().hex}
        if sign and self.secret:
            req = sign_request(self.secret, topic, req)
        return topic, json.dumps(req).encode()

    def send_raw(self, topic: str, payload: bytes, props: Properties | None = None) -> None:
        self.client.publish(topic, payload, qos=1, properties=props).wait_for_publish(10)

    def call(self, name: str, args: dict | None = None, *, timeout: float = 60, **kw: Any) -> dict:
        topic, payload = self.build(name, args, **kw)
        rid = json.loads(payload)["request_id"]
        self.send_raw(topic, payload)
        return self.result_for(rid, timeout)

    def result_for(self, request_id: str | None, timeout: float = 60) -> dict:
        def found() -> dict | None:
            with self.lock:
                return next((doc for _, doc, _ in self.results if doc.get("request_id") == request_id), None)
        return wait_for(found, timeout, message=f"result for {request_id}")

    # --- reading the uplink ---

    def events(self, type_: str, **match: Any) -> list[dict]:
        with self.lock:
            found = [e for e in self.envelopes.values() if e["type"] == type_
                     and all(e.get(k) == v or e["data"].get(k) == v for k, v in match.items())]
        return sorted(found, key=lambda e: e["seq"])

    def wait_event(self, type_: str, timeout: float = 60, **match: Any) -> dict:
        return wait_for(lambda: self.events(type_, **match), timeout,
                        message=lambda: f"{type_} {match}; seen types: {self.seen_types()}")[-1]

    def seen_types(self) -> list[str]:
        with self.lock:
            return sorted({e["type"] for e in self.envelopes.values()})


# --- the agent under test -------------------------------------------------------------------

def agent_config(tmp: Path, mqtt_port: int, cameras: list[dict], **extra: Any) -> dict:
    return {
        "device_id": DEVICE,
        "mqtt": {"host": "127.0.0.1", "port": mqtt_port, "ack_timeout_s": 120, "reconnect_max_s": 2},
        "outbox": {"path": str(tmp / "outbox")},
        "state_dir": str(tmp / "state"),
        "model": {"path": str(model_file()), "threads": 1, "classes": ["person"]},
        "cameras": cameras,
        "report": {"interval_s": 3},
        "http": {"listen": f"127.0.0.1:{free_port()}"},
        "commands": {"enabled": True, "hmac_secret_env": "EDGE_CMD_SECRET"},
        **extra,
    }


def file_camera(cam_id: str, video: Path, **extra: Any) -> dict:
    return {"id": cam_id, "source": str(video), "loop": True, "fps": 2,
            "lines": [{"id": "mid", "points": [[0.5, 0.0], [0.5, 1.0]]}], **extra}


def start_agent(tmp: Path, cfg: dict, env: dict | None = None) -> tuple[AgentProcess, Path]:
    path = tmp / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = AgentProcess(["run", "-c", str(path)], tmp / "agent.log",
                        env={"EDGE_CMD_SECRET": SECRET, **(env or {})}).start()
    return proc, path


class Running:
    def __init__(self, proc: AgentProcess, cfg_path: Path, op: Operator, stream: DyingStream):
        self.proc, self.cfg_path, self.op, self.stream = proc, cfg_path, op, stream

    def camera(self, cam_id: str) -> dict:
        return self.op.call("get_status")["result"]["cameras"][cam_id]


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    if os.environ.get("EDGE_TEST_MQTT"):
        pytest.skip("needs its own Mosquitto")
    tmp = tmp_path_factory.mktemp("daemon")
    broker = start_mosquitto(tmp / "mosquitto")
    stream = DyingStream(footage_file("PETS09-S2L1", "avi")).start()
    op = Operator(broker.port)
    cameras = [file_camera("cam-1", footage_file("PETS09-S2L1", "avi")),
               file_camera("cam-2", footage_file("TUD-Campus", "mp4")),
               {"id": "cam-net", "source": stream.url, "fps": 2, "stall_s": 3, "reconnect_min_s": 0.5,
                "reconnect_max_s": 1}]
    proc, path = start_agent(tmp, agent_config(tmp, broker.port, cameras))
    try:
        op.wait_event("agent.started", timeout=60)
        yield Running(proc, path, op, stream)
    finally:
        proc.kill()
        op.close()
        stream.die()
        broker.kill()


# --- commands -------------------------------------------------------------------------------

def test_ping_answers_on_the_response_topic_with_correlation_data(running: Running) -> None:
    op = running.op
    topic, payload = op.build("ping")
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = f"edge/{DEVICE}/reply/op-1"
    props.CorrelationData = b"corr-123"
    op.send_raw(topic, payload, props)
    rid = json.loads(payload)["request_id"]
    wait_for(lambda: [r for r in op.results if r[1].get("request_id") == rid], 60)
    answer = next(r for r in op.results if r[1].get("request_id") == rid)
    assert answer[0] == f"edge/{DEVICE}/reply/op-1" and answer[2] == b"corr-123"
    assert answer[1]["ok"] is True and answer[1]["code"] == 200 and answer[1]["result"]["pong"] is True
    audit = op.wait_event("command.executed", request_id=rid)
    assert audit["correlation_id"] == "corr-123" and audit["data"]["command"] == "ping"


def test_get_status_shows_every_camera_counting(running: Running) -> None:
    wait_for(lambda: all(c["state"] == "running" and c["frames"] > 0 for c in
                         (running.camera("cam-1"), running.camera("cam-2"))), 90,
             message=lambda: str(running.op.call("get_status")["result"]["cameras"]))
    status = running.op.call("get_status")["result"]
    assert status["device_id"] == DEVICE and status["mqtt"]["connected"] is True
    assert status["config_version"] == version_of_file(running.cfg_path)


def test_get_config_returns_the_file_version_and_redacts(running: Running) -> None:
    res = running.op.call("get_config")
    assert res["code"] == 200
    assert res["result"]["version"] == version_of_file(running.cfg_path)
    assert res["result"]["config"]["commands"]["hmac_secret_env"] == "EDGE_CMD_SECRET"  # a name, not a secret
    assert SECRET not in json.dumps(res)


def test_snapshot_is_annotated_unless_raw_is_asked(running: Running) -> None:
    def snapshot(**args: Any) -> np.ndarray:
        res = wait_for(lambda: (r := running.op.call("snapshot", {"camera_id": "cam-1", **args}))["ok"] and r, 60)
        jpeg = base64.b64decode(res["result"]["jpeg_base64"])
        image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.shape == (576, 768, 3)  # PETS09 frames, under the broker's limit
        return image

    annotated, raw = snapshot(), snapshot(raw=True)
    diff = np.abs(annotated.astype(int) - raw.astype(int)).max(axis=2)
    # cam-1's line "mid" runs down the middle of the frame: drawn there in the annotated one only.
    middle = [diff[y, 383] for y in range(100, 500, 25)]
    assert sum(d > 60 for d in middle) >= len(middle) * 3 // 4, middle


def test_restart_camera_restarts_only_that_camera(running: Running) -> None:
    wait_for(lambda: running.camera("cam-2")["frames"] > 0 and running.camera("cam-1")["frames"] > 0, 90)
    cam2_before = running.camera("cam-2")
    res = running.op.call("restart_camera", {"camera_id": "cam-1"})
    assert res["code"] == 200 and res["result"]["restarted"] is True
    wait_for(lambda: running.camera("cam-1")["restarts"] == 1 and running.camera("cam-1")["state"] == "running", 60)
    cam2_after = running.camera("cam-2")
    assert cam2_after["frames"] >= cam2_before["frames"] and cam2_after["restarts"] == cam2_before["restarts"]


def test_flush_outbox_resends_unacked_entries_now(running: Running) -> None:
    op = running.op
    # Nobody acks in this module and ack_timeout_s is 120 s: agent.started is still unacked.
    started = op.wait_event("agent.started")
    before = op.receipts[started["id"]]
    res = op.call("flush_outbox")
    assert res["code"] == 200 and res["result"]["connected"] is True and res["result"]["resent"] >= 1
    wait_for(lambda: op.receipts[started["id"]] > before, 30, message="agent.started sent again")


@pytest.mark.parametrize("build, code, why", [
    (lambda op: (f"edge/{DEVICE}/cmd/ping", b"{not json"), 400, "not JSON"),
    (lambda op: (f"edge/{DEVICE}/cmd/ping", b'{"args": {}}'), 400, "request_id"),
    (lambda op: op.build("ping", sign=False), 401, "missing signature"),
    (lambda op: op.build("ping", ts=datetime.fromtimestamp(time.time() - 300, timezone.utc)), 401, "stale"),
    (lambda op: op.build("format_disk"), 404, "unknown command"),
    (lambda op: op.build("restart_camera", {"camera_id": "cam-9"}), 404, "unknown camera"),
    (lambda op: op.build("restart_camera", {}), 400, "camera_id"),
    (lambda op: op.build("set_config", {"patch": {}, "expected_version": "0000000000000000"}), 409, "stale"),
])
def test_refused_requests_get_their_code_and_an_audit_record(running: Running, build: Callable, code: int,
                                                             why: str) -> None:
    op = running.op
    topic, payload = build(op)
    try:
        rid = json.loads(payload).get("request_id")
    except ValueError:
        rid = None
    before = len(op.events("command.rejected"))
    op.send_raw(topic, payload)
    if rid is None:  # no request_id: the result still comes, with request_id null
        wait_for(lambda: len(op.events("command.rejected")) > before, 60)
        audit = op.events("command.rejected")[-1]
        assert audit["data"]["request_id"] is None and audit["data"]["code"] == code
        assert any(r[1]["request_id"] is None and r[1]["code"] == code for r in op.results)
        return
    res = op.result_for(rid)
    assert (res["ok"], res["code"]) == (False, code) and why in res["error"]
    audit = op.wait_event("command.rejected", request_id=rid)
    assert audit["data"]["code"] == code and audit["correlation_id"] == rid
    assert op.call("ping")["code"] == 200  # the agent carries on


def test_a_replayed_request_is_refused(running: Running) -> None:
    op = running.op
    topic, payload = op.build("restart_camera", {"camera_id": "cam-2"})
    rid = json.loads(payload)["request_id"]
    op.send_raw(topic, payload)
    wait_for(lambda: op.result_for(rid)["code"] == 200, 60)
    op.send_raw(topic, payload)  # the same bytes again: valid signature, fresh ts, used nonce
    wait_for(lambda: len([r for r in op.results if r[1].get("request_id") == rid]) == 2, 60)
    second = [r[1] for r in op.results if r[1].get("request_id") == rid][1]
    assert second["code"] == 401 and "replayed" in second["error"]


# --- live config ----------------------------------------------------------------------------

def test_set_config_persists_applies_and_keeps_untouched_cameras(running: Running) -> None:
    op = running.op
    wait_for(lambda: running.camera("cam-1")["frames"] > 0, 60)
    version = op.call("get_config")["result"]["version"]
    cam1 = running.camera("cam-1")
    before = running.cfg_path.read_bytes()
    res = op.call("set_config", {"patch": {"cameras": [
        file_camera("cam-1", footage_file("PETS09-S2L1", "avi")),
        file_camera("cam-2", footage_file("TUD-Campus", "mp4"), fps=1),
        yaml.safe_load(before)["cameras"][2]]}, "expected_version": version})
    assert res["code"] == 200, res
    assert res["result"]["changed"] == ["cameras.cam-2.fps"]
    assert res["result"]["version"] == version_of_file(running.cfg_path) != version
    assert yaml.safe_load(running.cfg_path.read_text())["cameras"][1]["fps"] == 1
    assert (running.cfg_path.parent / "agent.yaml.bak").read_bytes() == before
    changed = op.wait_event("config.changed", version=res["result"]["version"])
    assert changed["data"]["source"] == "remote" and changed["data"]["changed"] == ["cameras.cam-2.fps"]
    assert changed["correlation_id"] == res["request_id"]
    cam1_after = running.camera("cam-1")
    assert cam1_after["restarts"] == cam1["restarts"] and cam1_after["frames"] >= cam1["frames"]
    assert op.call("get_config")["result"]["version"] == res["result"]["version"]


def test_an_invalid_patch_is_422_and_nothing_changes(running: Running) -> None:
    op = running.op
    version = op.call("get_config")["result"]["version"]
    before = running.cfg_path.read_bytes()
    res = op.call("set_config", {"patch": {"report": {"interval_s": -5}, "bogus": True},
                                 "expected_version": version})
    assert res["code"] == 422 and "report.interval_s" in res["error"] and "bogus" in res["error"]
    assert running.cfg_path.read_bytes() == before
    assert op.call("get_config")["result"]["version"] == version


def test_a_hand_edit_is_applied_and_a_broken_one_refused(running: Running) -> None:
    op = running.op
    doc = yaml.safe_load(running.cfg_path.read_text())
    doc["report"]["interval_s"] = 4
    tmp = running.cfg_path.with_suffix(".edit")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, running.cfg_path)
    new_version = version_of_file(running.cfg_path)
    changed = op.wait_event("config.changed", version=new_version)
    assert changed["data"]["source"] == "file" and changed["data"]["changed"] == ["report.interval_s"]
    assert op.call("get_config")["result"]["version"] == new_version

    running.cfg_path.write_text("device_id: [unclosed\n")
    broken = version_of_file(running.cfg_path)
    rejected = op.wait_event("config.rejected", version=broken)
    assert rejected["data"]["running_version"] == new_version
    status = op.call("get_status")["result"]
    assert status["config_version"] == new_version and status["cameras"]["cam-1"]["state"] == "running"
    assert op.call("reload_config")["code"] == 422  # asking again says why; the running config stays
    # SIGHUP after a fix: the agent reloads (systemctl reload).
    doc["report"]["interval_s"] = 5
    running.cfg_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.kill(running.proc.pid, signal.SIGHUP)
    fixed = version_of_file(running.cfg_path)
    op.wait_event("config.changed", version=fixed)
    assert running.proc.alive
    res = op.call("reload_config")  # nothing new on disk now
    assert res["code"] == 200 and res["result"] == {"version": fixed, "changed": [], "restart_required": []}


# --- a camera source that dies ------------------------------------------------------------------

def test_a_camera_source_that_dies_mid_run_leaves_the_rest_working(running: Running) -> None:
    op = running.op
    wait_for(lambda: running.camera("cam-net")["state"] == "running" and running.camera("cam-net")["frames"] > 0,
             90, message=lambda: str(running.camera("cam-net")))
    running.stream.die()
    op.wait_event("camera.offline", camera_id="cam-net", timeout=60)
    op.wait_event("camera.stream_error", camera_id="cam-net", timeout=60)
    frames = running.camera("cam-1")["frames"]
    wait_for(lambda: running.camera("cam-1")["frames"] > frames + 2, 60)  # the others keep counting
    assert running.camera("cam-net")["state"] != "running"
    assert op.call("ping")["code"] == 200  # and commands still answer
    assert running.proc.alive
    # The camera comes back: the agent picks it up again without a restart.
    onlines = len(op.events("camera.online", camera_id="cam-net"))
    running.stream.start()
    wait_for(lambda: len(op.events("camera.online", camera_id="cam-net")) > onlines, 60)
    wait_for(lambda: running.camera("cam-net")["state"] == "running", 60)


def test_audit_records_carry_request_ids_codes_and_trace_ids(running: Running) -> None:
    op = running.op
    records = op.events("command.executed") + op.events("command.rejected")
    assert {r["data"]["command"] for r in op.events("command.executed")} >= {
        "ping", "get_status", "get_config", "snapshot", "restart_camera", "flush_outbox", "set_config"}
    assert {r["data"]["code"] for r in op.events("command.rejected")} >= {400, 401, 404, 409, 422}
    for r in records:
        assert len(r["trace_id"]) == 32 and r["device_id"] == DEVICE
        assert r["correlation_id"] in (r["data"]["request_id"], "corr-123")


def test_metrics_page_has_the_design_names_and_counts_commands(running: Running) -> None:
    import httpx

    listen = yaml.safe_load(running.cfg_path.read_text())["http"]["listen"]
    running.op.call("ping")
    page = httpx.get(f"http://{listen}/metrics", timeout=10).text
    for name in ("edge_frames_total", "edge_inference_seconds", "edge_camera_fps", "edge_crossings_total",
                 "edge_outbox_depth", "edge_outbox_bytes", "edge_outbox_dropped_total", "edge_published_total",
                 "edge_acked_total", "edge_resent_total", "edge_commands_total"):
        assert f"# TYPE {name.removesuffix('_total')}" in page, name
    pings = [line for line in page.splitlines()
             if line.startswith('edge_commands_total{command="ping",result="200"}')]
    assert pings and float(pings[0].split()[-1]) >= 1
    assert 'edge_frames_total{camera="cam-1",result="processed"}' in page


def test_log_lines_are_json_and_share_the_audit_trace_id(running: Running) -> None:
    rid = running.op.call("get_status")["request_id"]
    audit = running.op.wait_event("command.executed", request_id=rid)

    def logged() -> list[dict]:
        lines = running.proc.output().splitlines()
        docs = [json.loads(line) for line in lines if line.startswith("{")]  # native libs print plain text
        return [d for d in docs if d.get("trace_id") == audit["trace_id"]]
    line = wait_for(logged, 30)[0]
    assert line["command"] == "get_status" and line["correlation_id"] == rid and line["level"] == "info"


# --- life cycle -----------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_notify_ready_watchdog_and_graceful_sigterm(tmp_path: Path, mosquitto) -> None:
    broker = mosquitto()
    op = Operator(broker.port)
    notify = NotifySocket(tmp_path / "notify.sock")
    cfg = agent_config(tmp_path, broker.port, [file_camera("cam-1", footage_file("PETS09-S2L1", "avi"))])
    proc, _ = start_agent(tmp_path, cfg, env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"})
    try:
        wait_for(lambda: notify.seen("READY=1"), 90, message="READY=1")
        wait_for(lambda: len(notify.seen("WATCHDOG=1")) >= 3, 30, message="three watchdog pings")
        op.wait_event("agent.started")
        wait_for(lambda: op.call("get_status")["result"]["cameras"]["cam-1"]["frames"] > 0, 90)
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(30) == 0
        stopped = op.wait_event("agent.stopped", timeout=30)
        last_interval = op.events("counting.interval", camera_id="cam-1")
        assert last_interval and last_interval[-1]["seq"] < stopped["seq"]  # cameras flushed first
        offline = op.events("camera.offline", camera_id="cam-1")
        assert offline and offline[-1]["seq"] < stopped["seq"]
        wait_for(lambda: op.statuses and op.statuses[-1]["state"] == "offline", 30)
        assert notify.seen("STOPPING=1")
    finally:
        proc.kill()
        notify.close()
        op.close()


@pytest.mark.timeout(120)
def test_a_camera_that_cannot_start_does_not_stop_the_agent(tmp_path: Path, mosquitto) -> None:
    broker = mosquitto()
    op = Operator(broker.port)
    cfg = agent_config(tmp_path, broker.port, [
        file_camera("cam-ok", footage_file("PETS09-S2L1", "avi")),
        {"id": "cam-missing", "source": str(tmp_path / "no-such.avi"), "fps": 2, "reconnect_max_s": 1}])
    proc, _ = start_agent(tmp_path, cfg)
    try:
        op.wait_event("camera.stream_error", camera_id="cam-missing")
        wait_for(lambda: op.call("get_status")["result"]["cameras"]["cam-ok"]["frames"] > 0, 90)
        assert op.call("get_status")["result"]["cameras"]["cam-missing"]["state"] != "running"
        assert proc.alive
    finally:
        proc.kill()
        op.close()


@pytest.mark.timeout(180)
def test_a_model_that_cannot_load_fails_cameras_with_backoff_until_fixed(tmp_path: Path, mosquitto) -> None:
    """Live model change to a missing file: workers cannot be built, the agent stays up and retries.

    A file path is a local edit (a remote set_config may not change it), applied live on reload."""
    broker = mosquitto()
    op = Operator(broker.port)
    cfg = agent_config(tmp_path, broker.port, [file_camera("cam-1", footage_file("PETS09-S2L1", "avi"))])
    proc, path = start_agent(tmp_path, cfg)

    def edit_model_path(model: Path) -> None:
        cfg["model"]["path"] = str(model)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        op.wait_event("config.changed", version=version_of_file(path))

    try:
        op.wait_event("agent.started")  # published after the agent subscribed to its commands
        wait_for(lambda: op.call("get_status")["result"]["cameras"]["cam-1"]["frames"] > 0, 90)
        edit_model_path(tmp_path / "gone.onnx")
        failure = op.wait_event("camera.stream_error", camera_id="cam-1", stage="worker")
        assert "gone.onnx" in failure["data"]["error"]
        wait_for(lambda: len(op.events("camera.stream_error", camera_id="cam-1", stage="worker")) >= 2, 30,
                 message="a second attempt after the backoff")
        cam = op.call("get_status")["result"]["cameras"]["cam-1"]
        assert cam["state"] == "failed" and "gone.onnx" in cam["last_error"] and proc.alive
        edit_model_path(model_file())
        wait_for(lambda: (c := op.call("get_status")["result"]["cameras"]["cam-1"])["state"] == "running"
                 and c["frames"] > 0, 90)
    finally:
        proc.kill()
        op.close()
