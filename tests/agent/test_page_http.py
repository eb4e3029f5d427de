"""The people's side of the agent's HTTP (page.py) in-process, with a stand-in for the daemon:
the browser guards, routing, and live streams that end with the server. The same surface
on a real agent counting real footage is tests/agent/test_agent_page.py.
"""

from __future__ import annotations

import socket
import threading
from email.message import Message
from typing import Any

import httpx
import pytest

from edge_agent.agent.config import OutboxConfig
from edge_agent.agent.http import AgentHttp
from edge_agent.agent.liveconfig import VersionConflict
from edge_agent.agent.outbox import Outbox
from edge_agent.agent.page import camera_route, foreign_host, foreign_origin, wants_raw
from edge_agent.agent.supervisor import UnknownCamera
from edge_testkit.processes import wait_for


def headers(**values: str) -> Message:
    m = Message()
    for k, v in values.items():
        m[k.replace("_", "-")] = v
    return m


@pytest.mark.parametrize("host, origin, refused", [
    ("127.0.0.1:9108", None, False),  # curl, scripts: no Origin
    ("127.0.0.1:9108", "http://127.0.0.1:9108", False),  # the page itself
    ("localhost:9108", "http://LOCALHOST:9108", False),
    ("127.0.0.1:9108", "http://evil.example", True),  # another site's page posting to loopback
    ("127.0.0.1:9108", "null", True),  # sandboxed frames, file:// pages
    ("127.0.0.1:9108", "http://127.0.0.1:9109", True),
])
def test_an_origin_other_than_the_agent_itself_is_refused(host: str, origin: str | None, refused: bool) -> None:
    h = headers(Host=host, **({"Origin": origin} if origin else {}))
    assert (foreign_origin(h) is not None) == refused


@pytest.mark.parametrize("host, refused", [
    ("127.0.0.1:9108", False), ("[::1]:9108", False), ("localhost", False), ("10.1.2.3:9108", False),
    (f"{socket.gethostname()}:9108", False),
    ("evil.example:9108", True), ("", True), ("127.0.0.1.evil.example", True),
])
def test_only_names_of_this_machine_are_served_the_page(host: str, refused: bool) -> None:
    assert (foreign_host(headers(Host=host)) is not None) == refused


def test_camera_paths_and_the_raw_flag() -> None:
    assert camera_route("/api/v1/cameras/cam-1/snapshot.jpg") == ("cam-1", "snapshot.jpg")
    assert camera_route("/api/v1/cameras/cam.2_x/stream.mjpg") == ("cam.2_x", "stream.mjpg")
    for path in ("/api/v1/cameras//snapshot.jpg", "/api/v1/cameras/a/b/snapshot.jpg",
                 "/api/v1/cameras/a/snapshot.png", "/api/v1/cameras/%2e%2e/snapshot.jpg"):
        assert camera_route(path) is None
    assert wants_raw("raw=1") and wants_raw("raw=true") and not wants_raw("raw=0") and not wants_raw("")


class FakeControl:
    """The daemon's side of the page: one camera whose frames are numbered bytes."""

    def __init__(self) -> None:
        self.version = "v1"
        self.frames = 0

    def config_document(self) -> tuple[str, dict[str, Any]]:
        return self.version, {"cameras": [{"id": "cam-1", "source": "rtsp://u:secret@cam/1"}],
                              "mqtt": {"password_env": "X"}}

    def set_config(self, patch: dict, expected_version: str, *, correlation_id: str | None) -> dict:
        if expected_version != self.version:
            raise VersionConflict(expected_version, self.version)
        self.version = "v2"
        return {"version": "v2", "changed": sorted(patch), "restart_required": []}

    def snapshot(self, camera_id: str, *, raw: bool = False) -> bytes | None:
        if camera_id != "cam-1":
            raise UnknownCamera(camera_id)
        return b"\xff\xd8raw" if raw else b"\xff\xd8annotated"

    def next_stream_jpeg(self, camera_id: str, after: int, timeout: float) -> tuple[int, bytes] | None:
        if camera_id != "cam-1":
            raise UnknownCamera(camera_id)
        self.frames += 1
        return after + 1, b"\xff\xd8frame%d" % (after + 1)


@pytest.fixture
def page(tmp_path):
    box = Outbox(OutboxConfig(path=tmp_path / "outbox"), "gw-1")
    control = FakeControl()
    http = AgentHttp("127.0.0.1", 0, box, lambda: {"cameras": {}}, control=control)
    http.start()
    client = httpx.Client(base_url=f"http://127.0.0.1:{http.port}", timeout=10)
    yield http, client, control
    client.close()
    http.stop()
    box.close()


def test_config_is_redacted_and_patched_with_its_version(page) -> None:
    _, client, _ = page
    doc = client.get("/api/v1/config").json()
    assert doc["version"] == "v1" and "secret" not in str(doc)
    stale = client.post("/api/v1/config", json={"patch": {"report": {"interval_s": 5}}, "expected_version": "v0"})
    assert stale.status_code == 409 and "stale" in stale.json()["error"]
    ok = client.post("/api/v1/config", json={"patch": {"report": {"interval_s": 5}}, "expected_version": "v1"})
    assert ok.status_code == 200 and ok.json()["version"] == "v2"
    bad = client.post("/api/v1/config", json={"patch": [], "expected_version": "v2"})
    assert bad.status_code == 400 and bad.json()["error"].startswith("patch")


def test_snapshots_annotated_or_raw(page) -> None:
    _, client, _ = page
    assert client.get("/api/v1/cameras/cam-1/snapshot.jpg").content == b"\xff\xd8annotated"
    r = client.get("/api/v1/cameras/cam-1/snapshot.jpg?raw=1")
    assert r.content == b"\xff\xd8raw" and r.headers["content-type"] == "image/jpeg"


def test_without_a_daemon_behind_it_the_page_paths_are_404(tmp_path) -> None:
    box = Outbox(OutboxConfig(path=tmp_path / "outbox"), "gw-1")
    http = AgentHttp("127.0.0.1", 0, box, lambda: {})
    http.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{http.port}", timeout=10) as client:
            assert client.get("/").status_code == 404
            assert client.post("/api/v1/config", json={}).status_code == 404
    finally:
        http.stop()
        box.close()


def test_a_live_stream_ends_when_the_agent_stops(page) -> None:
    http, _, control = page
    parts: list[bytes] = []
    ended = threading.Event()

    def watch() -> None:
        with httpx.stream("GET", f"http://127.0.0.1:{http.port}/api/v1/cameras/cam-1/stream.mjpg",
                          timeout=30) as r:
            assert r.headers["content-type"] == "multipart/x-mixed-replace; boundary=frame"
            for chunk in r.iter_bytes():
                parts.append(chunk)
        ended.set()

    threading.Thread(target=watch, daemon=True).start()
    wait_for(lambda: b"frame2" in b"".join(parts), 10, message="two frames of the stream")
    http.stop()
    assert ended.wait(10), "the stream kept the connection after the agent stopped"
    assert b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: 8\r\n\r\n\xff\xd8frame1\r\n" in b"".join(parts)
