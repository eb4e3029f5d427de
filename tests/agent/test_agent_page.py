"""The agent's HTTP for people, on a running `edge-agent run` counting a real clip: the page,
annotated and raw snapshots, the MJPEG live view, the config the page edits (versioned like
set_config), the browser guards, and hostile requests at all of it (hypothesis).
"""

from __future__ import annotations

import json
import socket
import string
from pathlib import Path
from typing import Iterator

import cv2
import httpx
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_testkit.agent import CameraAgent, start_camera_agent
from edge_testkit.processes import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

LINE = {"id": "v", "points": [[0.5, 0.2], [0.5, 0.95]]}
ZONE = {"id": "left", "polygon": [[0.0, 0.0], [0.4, 0.0], [0.4, 1.0], [0.0, 1.0]], "max_occupancy": 30}


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, model_path: Path, footage) -> Iterator[CameraAgent]:
    tmp = tmp_path_factory.mktemp("agent-page")
    running = start_camera_agent(tmp, footage("PETS09-S2L1"), model_path, lines=[LINE], zones=[ZONE])
    try:
        running.wait_processing(3)
        yield running
    finally:
        running.close()
        print(running.proc.output()[-3000:])


def decode(jpeg: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "not a JPEG"
    return image


def metric(agent: CameraAgent, name: str) -> float:
    return agent.api.metric(name)


def test_the_page_is_one_html_file_with_its_guards(agent: CameraAgent) -> None:
    r = agent.api.http.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert "/api/v1/config" in r.text and "stream.mjpg" in r.text
    # DNS rebinding: a page of another site whose name resolves to 127.0.0.1 carries its own name.
    assert agent.api.http.get("/", headers={"Host": "evil.example"}).status_code == 403
    assert agent.api.http.get("/", headers={"Host": f"localhost:{agent.port}"}).status_code == 200


def test_snapshot_is_annotated_where_the_line_is_and_raw_is_plain(agent: CameraAgent) -> None:
    base = f"/api/v1/cameras/{agent.camera_id}/snapshot.jpg"
    annotated = decode(agent.api.http.get(base).content)
    raw = decode(agent.api.http.get(base + "?raw=1").content)
    assert annotated.shape == raw.shape == (576, 768, 3)  # PETS09-S2L1's size: not downscaled
    diff = np.abs(annotated.astype(int) - raw.astype(int)).max(axis=2)
    h, w = diff.shape
    # Along the configured line the overlay changes the picture; far from every line, zone and
    # label the two frames (taken at most a few frames apart of a fixed camera) look alike.
    on_line = [diff[int(y * (h - 1)), int(0.5 * (w - 1))] for y in np.linspace(0.3, 0.9, 13)]
    assert sum(d > 60 for d in on_line) >= 10, on_line
    assert np.median(diff[:, int(0.7 * w):]) < 20


def test_unknown_camera_is_404_json(agent: CameraAgent) -> None:
    for suffix in ("snapshot.jpg", "stream.mjpg"):
        r = agent.api.http.get(f"/api/v1/cameras/nope/{suffix}")
        assert r.status_code == 404 and "unknown camera" in r.json()["error"]


def read_mjpeg_frames(port: int, path: str, count: int, timeout: float = 30) -> list[bytes]:
    """The first ``count`` JPEG parts of a multipart/x-mixed-replace answer."""
    with httpx.stream("GET", f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("multipart/x-mixed-replace")
        buf, frames = b"", []
        for chunk in r.iter_bytes():
            buf += chunk
            while True:
                head_end = buf.find(b"\r\n\r\n")
                if not buf.startswith(b"--frame") or head_end < 0:
                    break
                length = int(next(line.split(b":")[1] for line in buf[:head_end].split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                if len(buf) < head_end + 4 + length + 2:
                    break
                frames.append(buf[head_end + 4:head_end + 4 + length])
                buf = buf[head_end + 4 + length + 2:]
            if len(frames) >= count:
                return frames
    raise AssertionError(f"the stream ended after {len(frames)} frames")


def test_stream_sends_annotated_frames_and_counts_its_viewers(agent: CameraAgent) -> None:
    frames = read_mjpeg_frames(agent.port, f"/api/v1/cameras/{agent.camera_id}/stream.mjpg", 3)
    assert all(decode(f).shape == (576, 768, 3) for f in frames)
    assert len(set(frames)) == 3  # each part is a newer processed frame
    wait_for(lambda: metric(agent, "edge_view_streams") == 0, 15, message="the stream's viewer gone")


def test_nothing_is_drawn_or_encoded_while_nobody_watches(agent: CameraAgent) -> None:
    before = metric(agent, "edge_view_jpegs_total")
    start = agent.api.status()["cameras"][agent.camera_id]["frames"]
    agent.wait_processing(start + 10)
    assert metric(agent, "edge_view_jpegs_total") == before


def test_status_carries_the_counters_and_occupancy_the_page_shows(agent: CameraAgent) -> None:
    cam = agent.api.status()["cameras"][agent.camera_id]
    assert set(cam["counts"]) == {"v"} and {"in", "out"} <= set(cam["counts"]["v"])
    assert set(cam["occupancy"]) == {"left"}


def current_config(agent: CameraAgent) -> dict:
    r = agent.api.http.get("/api/v1/config")
    assert r.status_code == 200
    return r.json()


def post_config(agent: CameraAgent, body: bytes | dict, **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return agent.api.http.post("/api/v1/config", content=content,
                               headers={"Content-Type": "application/json", **headers})


def test_config_changes_go_through_the_versioned_path(agent: CameraAgent) -> None:
    doc = current_config(agent)
    cameras = doc["config"]["cameras"]
    added = [{**cameras[0], "lines": [*cameras[0]["lines"], {"id": "h", "points": [[0.1, 0.6], [0.9, 0.6]]}]}]
    assert post_config(agent, {"patch": {"cameras": added}, "expected_version": "0" * 16}).status_code == 409
    r = post_config(agent, {"patch": {"mqtt": {"host": "elsewhere"}}, "expected_version": doc["version"]})
    assert r.status_code == 403 and "mqtt.host" in r.json()["error"]
    bad = [{**cameras[0], "lines": [{"id": "x", "points": [[0.1, 0.1]]}]}]
    assert post_config(agent, {"patch": {"cameras": bad}, "expected_version": doc["version"]}).status_code == 422
    assert post_config(agent, b'{"patch": ').status_code == 400
    # A web page the operator has open must not post here.
    r = post_config(agent, {"patch": {"cameras": added}, "expected_version": doc["version"]},
                    Origin="http://evil.example")
    assert r.status_code == 403
    assert current_config(agent)["version"] == doc["version"]  # none of that changed the file

    r = post_config(agent, {"patch": {"cameras": added}, "expected_version": doc["version"]})
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text
    on_disk = yaml.safe_load(agent.config_path.read_text())
    assert [line["id"] for line in on_disk["cameras"][0]["lines"]] == ["v", "h"]
    wait_for(lambda: "h" in agent.api.status()["cameras"][agent.camera_id]["counts"], 30,
             message="the new line in the camera's counters")
    assert agent.api.status()["config_version"] == r.json()["version"]


# --- hostile requests at the people's surface ---------------------------------------------------

_PATH_TEXT = st.text(alphabet=string.ascii_letters + string.digits + "-_.%/?=&", max_size=40)
people_paths = st.one_of(
    st.sampled_from(["/", "/api/v1/config", "/api/v1/cameras/cam-1/snapshot.jpg",
                     "/api/v1/cameras/cam-1/snapshot.jpg?raw=1", "/api/v1/cameras/nope/stream.mjpg",
                     "/api/v1/cameras//snapshot.jpg", "/api/v1/cameras/cam-1/../snapshot.jpg"]),
    _PATH_TEXT.map(lambda s: "/api/v1/cameras/" + s),
    _PATH_TEXT.map(lambda s: "/api/v1/cameras/cam-1/snapshot.jpg?" + s))
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=12),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=3),
                           max_leaves=12)
patches = st.fixed_dictionaries({"patch": st.dictionaries(st.sampled_from(["cameras", "log", "report", "mqtt", "x"]),
                                                          json_values, max_size=2),
                                 "expected_version": st.just("CURRENT") | st.text(max_size=20)})
hosts = st.sampled_from(["127.0.0.1", "localhost", "evil.example", "", "[::1]", "127.0.0.1:1"])
origins = st.none() | st.sampled_from(["null", "http://evil.example", "HOST"])


def raw_exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request on its own connection; the status, headers and up to 64 KB of the body."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(request)
        data = b""
        while len(data) < 65536:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data and b"multipart/x-mixed-replace" in data.split(b"\r\n\r\n")[0]:
                break  # a live stream: its headers are the answer
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def restore(agent: CameraAgent, original: dict) -> None:
    """Put back what a hostile but valid patch changed (cameras, log, report) and wait for the camera."""
    doc = current_config(agent)
    if doc["version"] == original["version"]:
        return
    keep = {k: original["config"].get(k) for k in ("cameras", "log", "report")}
    r = post_config(agent, {"patch": keep, "expected_version": doc["version"]})
    assert r.status_code == 200, r.text
    wait_for(lambda: agent.api.http.get(f"/api/v1/cameras/{agent.camera_id}/snapshot.jpg").status_code == 200,
             60, interval=0.1, message="the camera back after restoring its config")


def test_hostile_requests_at_the_page_config_and_pictures_get_4xx_and_the_agent_keeps_serving(
        agent: CameraAgent) -> None:
    original = current_config(agent)

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
    @given(method=st.sampled_from(["GET", "POST"]), path=people_paths, host=hosts, origin=origins, body=patches)
    def one(method: str, path: str, host: str, origin: str | None, body: dict) -> None:
        if body["expected_version"] == "CURRENT":
            body = {**body, "expected_version": current_config(agent)["version"]}
        payload = json.dumps(body).encode() if method == "POST" else b""
        if method == "POST":
            path = "/api/v1/config"
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close",
                 f"Content-Length: {len(payload)}", "Content-Type: application/json"]
        if origin is not None:
            lines.append("Origin: " + (f"http://{host}" if origin == "HOST" else origin))
        code, headers, answer = raw_exchange(agent.port, ("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        assert code < 500, (code, answer[:300])
        ctype = headers.get("content-type", "")
        assert ctype.split(";")[0] in ("application/json", "image/jpeg", "text/html", "multipart/x-mixed-replace")
        if ctype.startswith("application/json"):
            json.loads(answer)
        restore(agent, original)
        # Whatever was sent, the camera's picture and the status still come.
        assert decode(agent.api.http.get(f"/api/v1/cameras/{agent.camera_id}/snapshot.jpg").content) is not None
        assert agent.api.http.get("/healthz").status_code == 200

    one()
    assert agent.proc.alive
