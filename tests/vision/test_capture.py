"""Capture: source parsing, offline frame iteration, the latest-frame reader with its events."""

from __future__ import annotations

import http.server
import socketserver
import threading
import time
from pathlib import Path

import cv2
import pytest

from edge_agent.vision.capture import (
    FrameSampler,
    LatestFrameReader,
    StreamError,
    credentialed_source,
    is_device,
    is_stream,
    iter_file_frames,
    jpeg_within,
    open_capture,
    parse_source,
)
from edge_agent.vision.config import CameraConfig
from edge_testkit.processes import free_port, wait_for


class Events:
    """Collects (type, data) from a reader's thread."""

    def __init__(self):
        self.items: list[tuple[str, dict]] = []
        self._lock = threading.Lock()

    def __call__(self, type_: str, data: dict) -> None:
        with self._lock:
            self.items.append((type_, data))

    def of(self, type_: str) -> list[dict]:
        with self._lock:
            return [d for t, d in self.items if t == type_]


def test_sources_are_told_apart():
    assert parse_source("0") == 0 and is_device(0)
    assert is_device(parse_source("/dev/video2"))
    assert parse_source("file:///tmp/a%20b.mp4") == "/tmp/a b.mp4"
    assert is_stream(parse_source("rtsp://user:pw@cam/stream1"))
    assert is_stream("http://cam/mjpeg") and not is_stream("/data/x.mp4")


def test_a_missing_file_is_a_clear_stream_error(tmp_path):
    with pytest.raises(StreamError, match="no such video file"):
        open_capture(str(tmp_path / "nope.mp4"))


def test_a_file_that_is_not_a_video_is_a_stream_error(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 100)
    with pytest.raises(StreamError, match="cannot open"):
        open_capture(str(junk))


def test_every_frame_or_subsampled(footage):
    video = footage("TUD-Campus")  # 71 frames at 25 fps
    assert [i for i, _ in iter_file_frames(video)] == list(range(71))
    five = [i for i, _ in iter_file_frames(video, fps=5)]
    assert five[:3] == [0, 5, 10] and len(five) == 15


def test_stopping_early_releases_the_decoder(footage):
    frames = iter_file_frames(footage("PETS09-S2L1"), prefetch=2)
    first = [next(frames) for _ in range(3)]
    frames.close()  # runs the generator's cleanup: the decode thread must end
    assert [i for i, _ in first] == [0, 1, 2]
    assert not [t for t in threading.enumerate() if t.name.startswith("decode-PETS")]


@pytest.mark.timeout(60)
def test_reader_plays_a_file_and_reports_its_end(footage):
    events = Events()
    reader = LatestFrameReader(CameraConfig(id="c", source=str(footage("TUD-Campus"))), events)
    reader.start()
    try:
        wait_for(lambda: reader.state == "ended", 30, message=lambda: f"end of file; state {reader.state}")
        assert reader.frames_read == 71
        assert events.of("camera.online")[0]["width"] == 640
        assert events.of("camera.offline") == [{"source": str(footage("TUD-Campus")), "reason": "end of file"}]
        assert reader.wait_newer(0, 1).seq == 71  # the newest frame stays available
    finally:
        reader.stop()


@pytest.mark.parametrize("fps", [25, 12.5, 5, 3, 1.4])
def test_frame_sampler_is_the_offline_and_the_live_rule(footage, fps):
    """A camera at ``fps`` processes the frames that ``count --fps`` processes, whatever the
    machine's timing: the reader picks them on the file's own clock, as the offline iterator does."""
    video = footage("TUD-Campus")  # 71 frames at 25 fps
    offline = [i for i, _ in iter_file_frames(video, fps=fps)]
    reader = LatestFrameReader(CameraConfig(id="c", source=str(video), fps=fps), Events())
    picked: list[int] = []
    publish = reader._publish

    def recording(image, due):  # the reader thread's hand-over, watched
        if due:
            picked.append(reader.frames_read)  # the index of the frame being published
        publish(image, due)

    reader._publish = recording
    reader.start()
    try:
        wait_for(lambda: reader.state == "ended", 30, message="end of file")
    finally:
        reader.stop()
    assert picked == offline and len(offline) == len(sampled(71, 25, fps))


def sampled(n: int, src: float, fps: float | None) -> list[int]:
    """The indices of ``n`` frames at ``src`` fps that FrameSampler keeps at ``fps``."""
    sampler = FrameSampler(fps)
    return [i for i in range(n) if sampler.take(i / src)]


def test_frame_sampler_picks_every_kth_frame_and_restarts_after_a_gap():
    assert sampled(10, 10, None) == list(range(10))
    assert sampled(10, 10, 5) == [0, 2, 4, 6, 8]
    assert sampled(15, 7, 5) == [0, 2, 3, 5, 6, 7, 9, 10, 12, 13, 14]  # PETS09 at --fps 5
    assert sampled(10, 10, 30) == list(range(10))  # faster than the source: every frame
    sampler = FrameSampler(2)  # a live stream that stops for 3 s and comes back
    assert [sampler.take(t) for t in (0.0, 0.3, 0.5, 0.6, 3.6, 3.8, 4.1)] == [True, False, True, False, True,
                                                                            False, True]


@pytest.mark.timeout(60)
def test_reader_loops_a_file(footage):
    events = Events()
    reader = LatestFrameReader(CameraConfig(id="c", source=str(footage("TUD-Campus")), loop=True), events)
    reader.start()
    try:
        wait_for(lambda: reader.frames_read > 80, 30, message=lambda: f"frames read {reader.frames_read}")
        assert reader.state == "running" and not events.of("camera.offline")
        assert reader.camera_fps() > 0
    finally:
        reader.stop()
    assert reader.state == "stopped"


@pytest.mark.timeout(60)
def test_dead_stream_reports_errors_and_backs_off():
    events = Events()
    url = f"rtsp://127.0.0.1:{free_port()}/nobody-listens"
    cam = CameraConfig(id="c", source=url, reconnect_min_s=0.05, reconnect_max_s=0.2, stall_s=2)
    reader = LatestFrameReader(cam, events)
    reader.start()
    try:
        wait_for(lambda: len(events.of("camera.stream_error")) >= 4, 30, message="four failed attempts")
    finally:
        reader.stop()
    errors = events.of("camera.stream_error")
    assert [e["attempt"] for e in errors[:4]] == [1, 2, 3, 4]
    assert [e["retry_in_s"] for e in errors[:4]] == [0.05, 0.1, 0.2, 0.2]  # doubles up to the cap
    assert not events.of("camera.online")


class MjpegServer:
    """A real HTTP MJPEG camera on loopback: each connection gets ``frames`` JPEGs, then goes
    silent for ``hold_s`` (a stalled stream) and hangs up."""

    def __init__(self, video: Path, frames: int = 10, hold_s: float = 3.0):
        cap = cv2.VideoCapture(str(video))
        self.jpegs = [cv2.imencode(".jpg", cap.read()[1])[1].tobytes() for _ in range(frames)]
        cap.release()
        self.hold_s = hold_s
        self.connections = 0
        self.closing = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.connections += 1
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                for jpeg in server.jpegs:
                    self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                                     % len(jpeg) + jpeg + b"\r\n")
                    self.wfile.flush()
                    if server.closing.wait(0.05):
                        return
                server.closing.wait(server.hold_s)  # the stall

            def log_message(self, *args):
                pass

        self.httpd = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/stream.mjpg"

    def close(self):
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def mjpeg_camera(footage):
    server = MjpegServer(footage("TUD-Campus"))
    yield server
    server.close()


@pytest.mark.timeout(60)
def test_http_stream_stall_is_reported_once_then_reconnects(mjpeg_camera):
    """Frames, then silence: one frame_stall, then the read times out, offline + stream_error,
    and the reader reconnects to the same stream and goes online again."""
    events = Events()
    cam = CameraConfig(id="c", source=mjpeg_camera.url, stall_s=0.4, reconnect_min_s=0.1)
    reader = LatestFrameReader(cam, events)
    reader.start()
    try:
        def second_online():
            reader.check_stall(time.monotonic())  # what the worker's processing loop does
            return len(events.of("camera.online")) >= 2
        wait_for(second_online, 30, interval=0.05, message=lambda: f"reconnect; events {[t for t, _ in events.items]}")
    finally:
        reader.stop()
    kinds = [t for t, _ in events.items]
    first_stall = kinds.index("camera.frame_stall")
    assert kinds[:first_stall].count("camera.frame_stall") == 0 and kinds.index("camera.online") < first_stall
    assert kinds.index("camera.offline") > first_stall  # stall first, then the read gives up
    assert kinds[:kinds.index("camera.offline")].count("camera.frame_stall") == 1  # once per stall
    assert events.of("camera.stream_error")[0]["error"] == "stream stopped delivering frames"
    assert mjpeg_camera.connections >= 2 and reader.frames_read > 10  # all of the first, some of the second


def test_credentials_never_reach_events():
    reader = LatestFrameReader(CameraConfig(id="c", source="rtsp://admin:secret@10.0.0.1/s"), Events())
    assert reader.safe_source() == "rtsp://***@10.0.0.1/s"


def test_credentials_from_the_environment_go_into_the_url_only_when_opening(monkeypatch):
    monkeypatch.setenv("EDGE_TEST_CAM_PW", "p@ss:w/rd")
    cam = CameraConfig(id="c", source="rtsp://10.0.0.1:554/s?x=1", username="ad min", password_env="EDGE_TEST_CAM_PW")
    assert credentialed_source(cam) == "rtsp://ad%20min:p%40ss%3Aw%2Frd@10.0.0.1:554/s?x=1"
    assert credentialed_source(cam.model_copy(update={"password_env": None})) == "rtsp://ad%20min@10.0.0.1:554/s?x=1"
    assert credentialed_source(CameraConfig(id="c", source="3")) == 3
    monkeypatch.delenv("EDGE_TEST_CAM_PW")
    with pytest.raises(StreamError, match="EDGE_TEST_CAM_PW is not set"):
        credentialed_source(cam)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("camera", [
    {"source": "rtsp://admin:hunter2@127.0.0.1:{port}/s"},
    {"source": "rtsp://127.0.0.1:{port}/s", "username": "admin", "password_env": "EDGE_TEST_CAM_PW"},
])
def test_a_failing_stream_with_credentials_reports_errors_without_them(monkeypatch, caplog, camera):
    """A stream that refuses: every event and log line of its failures names the host, never the password."""
    monkeypatch.setenv("EDGE_TEST_CAM_PW", "hunter2")
    events = Events()
    cam = CameraConfig(id="c", reconnect_min_s=0.05, reconnect_max_s=0.1,
                       **{**camera, "source": camera["source"].format(port=free_port())})
    reader = LatestFrameReader(cam, events)
    with caplog.at_level("DEBUG"):
        reader.start()
        try:
            wait_for(lambda: len(events.of("camera.stream_error")) >= 2, 30, message="two failed attempts")
        finally:
            reader.stop()
    assert "hunter2" not in repr(events.items) and "hunter2" not in caplog.text
    assert "127.0.0.1" in events.of("camera.stream_error")[0]["error"]


def test_open_capture_errors_do_not_quote_credentials(tmp_path):
    with pytest.raises(StreamError) as e:
        open_capture(f"http://user:hunter2@127.0.0.1:{free_port()}/x.mjpg", timeout_s=2)
    assert "hunter2" not in str(e.value) and "http://***@127.0.0.1" in str(e.value)


def test_jpeg_within_reencodes_smaller_until_it_fits():
    import numpy as np

    image = np.random.default_rng(7).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    assert jpeg_within(jpeg, len(jpeg)) is jpeg  # fits: untouched
    smaller = jpeg_within(jpeg, 30_000)
    assert smaller is not None and len(smaller) <= 30_000
    decoded = cv2.imdecode(np.frombuffer(smaller, np.uint8), cv2.IMREAD_COLOR)
    assert decoded is not None and decoded.shape[1] < 640
    assert jpeg_within(jpeg, 100) is None  # not even a thumbnail fits
    assert jpeg_within(b"not a jpeg" * 100, 10) is None


def test_missing_file_becomes_a_stream_error_event(tmp_path: Path):
    events = Events()
    cam = CameraConfig(id="c", source=f"file://{tmp_path}/later.mp4", reconnect_min_s=0.05)
    reader = LatestFrameReader(cam, events)
    reader.start()
    try:
        wait_for(lambda: events.of("camera.stream_error"), 10, message="stream_error")
    finally:
        reader.stop()
    assert "no such video file" in events.of("camera.stream_error")[0]["error"]


@pytest.mark.timeout(60)
def test_an_unexpected_error_while_reading_is_reported_and_the_reader_goes_on(footage):
    events = Events()
    cam = CameraConfig(id="c", source=str(footage("TUD-Campus")), loop=True, reconnect_min_s=0.05)
    reader = LatestFrameReader(cam, events)
    publish, calls = reader._publish, []

    def fails_once(image, due):  # a bug or a decoder surprise on the third frame
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("decoder surprise")
        publish(image, due)

    reader._publish = fails_once
    reader.start()
    try:
        wait_for(lambda: reader.frames_read > 10, 30, message=lambda: f"frames read {reader.frames_read}")
    finally:
        reader.stop()
    assert [e["error"] for e in events.of("camera.stream_error")] == ["reading failed: RuntimeError: decoder surprise"]
