"""Video capture with OpenCV: files, RTSP/HTTP streams and V4L2 devices.

``LatestFrameReader`` runs one thread per camera that reads as fast as the source delivers and
keeps only the newest frame, so a slow consumer skips frames instead of falling behind. It
reconnects with exponential backoff and reports what happens to the stream as events.
``iter_file_frames`` is the offline path of ``edge-agent count``: every frame, in order.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import quote, unquote, urlparse, urlsplit, urlunsplit

import cv2
import numpy as np

from edge_agent.common.backoff import Backoff
from edge_agent.common.config import env_secret
from edge_agent.common.logs import mask_userinfo
from edge_agent.vision.config import STREAM_SCHEMES, CameraConfig

log = logging.getLogger(__name__)

EventSink = Callable[[str, dict], None]


class StreamError(RuntimeError):
    """A source that cannot be opened or read."""


def parse_source(source: str) -> int | str:
    """A device index, a ``/dev/video*`` path, a stream URL or a local file path."""
    s = source.strip()
    if s.isdigit():
        return int(s)
    if s.startswith("file://"):
        return unquote(urlparse(s).path)
    return s


def is_stream(source: int | str) -> bool:
    return isinstance(source, str) and urlparse(source).scheme.lower() in STREAM_SCHEMES


def is_device(source: int | str) -> bool:
    return isinstance(source, int) or str(source).startswith("/dev/video")


def is_file(source: int | str) -> bool:
    return not is_stream(source) and not is_device(source)


def credentialed_source(camera: CameraConfig) -> int | str:
    """What to open: the source with ``username`` and the password from ``password_env`` put into
    the URL. Only here, at open time, so the credentials never sit in config, events or logs."""
    source = parse_source(camera.source)
    if not camera.username or not isinstance(source, str):
        return source
    password = env_secret(camera.password_env)
    if camera.password_env and password is None:
        raise StreamError(f"camera password variable {camera.password_env} is not set")
    userinfo = quote(camera.username, safe="")
    if password is not None:
        userinfo += ":" + quote(password, safe="")
    parts = urlsplit(source)
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{parts.netloc}"))


def open_capture(source: int | str, *, timeout_s: float = 10.0) -> cv2.VideoCapture:
    """An opened capture or StreamError saying why not (without the source's credentials)."""
    shown = mask_userinfo(str(source))
    if is_file(source) and not Path(source).is_file():
        raise StreamError(f"no such video file: {shown}")
    try:
        if is_device(source):
            cap = cv2.VideoCapture(source, cv2.CAP_V4L2)
        elif is_stream(source):
            # Bounded open and read so that a dead stream surfaces as an error, not a hung thread.
            ms = int(timeout_s * 1000)
            cap = cv2.VideoCapture(source, cv2.CAP_FFMPEG,
                                   [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms])
        else:
            cap = cv2.VideoCapture(str(source))
    except cv2.error as e:  # OpenCV's text may quote the URL it was given
        raise StreamError(f"cannot open video source {shown}: {mask_userinfo(str(e))}") from e
    if not cap.isOpened():
        cap.release()
        raise StreamError(f"cannot open video source {shown}")
    return cap


def jpeg_within(jpeg: bytes, max_bytes: int, *, min_side: int = 32) -> bytes | None:
    """The JPEG as it is when it fits ``max_bytes``, else re-encoded at lower quality and then at
    smaller sizes until it does; None when even a ``min_side`` pixel image would not fit."""
    if len(jpeg) <= max_bytes:
        return jpeg
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    while image is not None and min(image.shape[:2]) >= min_side:
        for quality in (70, 40):
            ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
            if ok and len(buf) <= max_bytes:
                return buf.tobytes()
        height, width = image.shape[:2]
        image = cv2.resize(image, (max(1, width * 2 // 3), max(1, height * 2 // 3)), interpolation=cv2.INTER_AREA)
    return None


def source_fps(cap: cv2.VideoCapture, default: float = 25.0) -> float:
    fps = cap.get(cv2.CAP_PROP_FPS)
    return float(fps) if fps and 0 < fps < 1000 else default


_END = object()


def map_ahead(items: Iterator[tuple[int, Any]], fn: Callable[[Any], Any], *, depth: int = 2,
              name: str = "map-ahead") -> Iterator[tuple[int, Any]]:
    """``(index, fn(item))`` for ``(index, item)`` in order, iterated and computed in a helper thread
    at most ``depth`` items ahead. OpenCV, numpy and onnxruntime release the GIL, so decoding and
    inference overlap the caller's work. An error in the helper thread is raised here."""
    out: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for index, item in items:
                if stop.is_set():
                    break
                out.put((index, fn(item)))
        except BaseException as e:  # handed to the consumer, which raises it
            out.put(e)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # a generator is closed by the thread that iterates it
            out.put(_END)

    worker = threading.Thread(target=work, name=name, daemon=True)
    worker.start()
    try:
        while (got := out.get()) is not _END:
            if isinstance(got, BaseException):
                raise got
            yield got
    finally:
        stop.set()
        while worker.is_alive():  # unblock a worker waiting on a full queue
            try:
                out.get_nowait()
            except queue.Empty:
                worker.join(0.05)


class FrameSampler:
    """Which frames to process at ``fps``: the first frame at or after each tick of a 1/fps clock
    that starts with the first frame. The one rule for ``count --fps N`` (frame times are index /
    source fps) and for a camera at ``fps: N`` (frame times on the stream's clock), so that the
    offline count reproduces what the live camera processes. ``fps`` None: every frame."""

    def __init__(self, fps: float | None):
        self.period = 1.0 / fps if fps else 0.0
        self._next: float | None = None

    def take(self, t: float) -> bool:
        """Whether the frame at time ``t`` (seconds, non-decreasing) is to be processed."""
        if self._next is not None and t < self._next - 1e-9:
            return False
        # After a gap longer than a period (a reconnect) the clock restarts at this frame.
        self._next = t + self.period if self._next is None or t - self._next >= self.period else \
            self._next + self.period
        return True


def _decoded_frames(cap: cv2.VideoCapture, fps: float | None, src_fps: float) -> Iterator[tuple[int, np.ndarray]]:
    """(index, image) of the frames FrameSampler keeps at ``fps``; the others are grabbed, not decoded."""
    sampler = FrameSampler(fps)
    index = 0
    try:
        while True:
            if not sampler.take(index / src_fps):
                if not cap.grab():
                    return
                index += 1
                continue
            ok, image = cap.read()
            if not ok:
                return
            yield index, image
            index += 1
    finally:
        cap.release()


def iter_file_frames(path: str | Path, fps: float | None = None, *, prefetch: int = 4,
                     transform: Callable[[np.ndarray], Any] | None = None) -> Iterator[tuple[int, Any]]:
    """(frame index, BGR image) of a video file: every frame, or subsampled to ``fps``.

    Decoding (and ``transform``, e.g. the detector's preprocessing, whose result then replaces
    the image) runs in a helper thread: OpenCV and numpy release the GIL, so it overlaps inference.
    """
    cap = open_capture(str(path))
    yield from map_ahead(_decoded_frames(cap, fps, source_fps(cap)), transform or (lambda image: image), depth=prefetch,
                         name=f"decode-{Path(path).name}")


def video_size(path: str | Path) -> tuple[int, int, float, int]:
    """(width, height, fps, frame count) of a video file."""
    cap = open_capture(str(path))
    try:
        return (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                source_fps(cap), int(cap.get(cv2.CAP_PROP_FRAME_COUNT)))
    finally:
        cap.release()


@dataclass(frozen=True)
class Frame:
    image: np.ndarray
    seq: int  # counts every frame read since start, so gaps are skipped frames
    monotonic: float


class RateMeter:
    """Events per second over a sliding window."""

    def __init__(self, window_s: float = 5.0):
        self.window_s = window_s
        self._times: list[float] = []

    def tick(self, now: float) -> None:
        self._times.append(now)
        cut = now - self.window_s
        if self._times[0] < cut:
            self._times = [t for t in self._times if t >= cut]

    def rate(self, now: float) -> float:
        recent = [t for t in self._times if t >= now - self.window_s]
        if len(recent) < 2:
            return 0.0
        span = max(now - recent[0], recent[-1] - recent[0])
        return (len(recent) - 1) / span if span > 0 else 0.0


class LatestFrameReader:
    """One camera's reader thread: newest frame only, reconnects, stream events.

    Events go to ``on_event(type, data)``: ``camera.online``, ``camera.offline``,
    ``camera.stream_error`` (from here) and ``camera.frame_stall`` (from ``check_stall``).
    """

    def __init__(self, camera: CameraConfig, on_event: EventSink):
        self.camera = camera
        self.source = parse_source(camera.source)
        self.on_event = on_event
        self.state = "stopped"
        self.frames_read = 0
        self.errors = 0
        self.last_frame_at = 0.0
        self.last_attempt_at = time.monotonic()
        self._latest: Frame | None = None  # the newest frame read (snapshots, stall checks)
        self._latest_due: Frame | None = None  # the newest frame the sampler picked for processing
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._meter = RateMeter()
        self._stall_reported = False
        self._down_since: float | None = None
        self._backoff = Backoff(camera.reconnect_min_s, camera.reconnect_max_s)

    # --- control -------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self.state = "connecting"
        self._down_since = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"capture-{self.camera.id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self.state = "stopped"

    # --- consumer side ---------------------------------------------------------------------
    def latest(self) -> Frame | None:
        """The newest frame read, whether or not it is one to process."""
        return self._latest

    def wait_newer(self, after_seq: int, timeout: float) -> Frame | None:
        """The newest frame to process (picked at the camera's ``fps`` by FrameSampler, as ``count
        --fps`` picks them) with seq > after_seq, waiting up to ``timeout``; None if none came."""
        with self._cond:
            self._cond.wait_for(lambda: self._stop.is_set() or (self._latest_due is not None
                                                                and self._latest_due.seq > after_seq), timeout)
            frame = self._latest_due
        return frame if frame is not None and frame.seq > after_seq else None

    def camera_fps(self) -> float:
        return self._meter.rate(time.monotonic())

    def down_for(self, now: float) -> float:
        """Seconds since the camera last delivered frames (0 while it does)."""
        return 0.0 if self._down_since is None else now - self._down_since

    def check_stall(self, now: float) -> None:
        """A running camera that delivered nothing for ``stall_s``: one frame_stall per stall."""
        if self.state != "running" or self.last_frame_at == 0.0:
            return
        age = now - self.last_frame_at
        if age >= self.camera.stall_s and not self._stall_reported:
            self._stall_reported = True
            self.state = "stalled"
            self._down_since = self.last_frame_at
            self._event("camera.frame_stall", {"source": self.safe_source(), "seconds_without_frame": round(age, 3)})

    # --- reader thread ---------------------------------------------------------------------
    def safe_source(self) -> str:
        """The source without credentials (rtsp://user:pass@host -> rtsp://***@host)."""
        return mask_userinfo(str(self.source))

    def _event(self, type_: str, data: dict) -> None:
        """Events go to Kafka: no text in them may carry a URL's credentials (OpenCV errors quote it)."""
        self.on_event(type_, {k: mask_userinfo(v) if isinstance(v, str) else v for k, v in data.items()})

    def _run(self) -> None:
        self._backoff.reset()
        while not self._stop.is_set():
            self.last_attempt_at = time.monotonic()
            try:
                # Reads time out after twice stall_s: frame_stall is reported first, then reconnect.
                cap = open_capture(credentialed_source(self.camera), timeout_s=2 * self.camera.stall_s)
            except StreamError as e:
                self._failed(str(e))
                continue
            try:
                ended = self._read_until_failure(cap)
            except Exception as e:  # noqa: BLE001 - a decoder surprise must not end the reader for good
                log.exception("camera %s: reading failed", self.camera.id)
                self._failed(f"reading failed: {type(e).__name__}: {e}")
                continue
            finally:
                cap.release()
            if ended:
                return
            if self.frames_read:  # the source worked: a new outage starts the backoff afresh
                self._backoff.reset()
            if not self._stop.is_set():
                self._failed("stream stopped delivering frames")

    def _failed(self, reason: str) -> None:
        """Report a failed attempt and wait out the backoff (it doubles with every failure)."""
        delay = self._backoff.next_delay()
        self.errors += 1
        was_online = self.state in ("running", "stalled")
        self.state = "connecting"
        if self._down_since is None:
            self._down_since = time.monotonic()
        if was_online:
            self._event("camera.offline", {"source": self.safe_source(), "reason": reason})
        self._event("camera.stream_error", {"source": self.safe_source(), "error": reason,
                                              "attempt": self.errors, "retry_in_s": round(delay, 3)})
        log.warning("camera %s: %s; retrying in %.1f s", self.camera.id, reason, delay)
        self._stop.wait(delay)

    def _read_until_failure(self, cap: cv2.VideoCapture) -> bool:
        """Read frames until the source fails (False) or a file ends without loop (True)."""
        pace = 1.0 / source_fps(cap) if is_file(self.source) else 0.0
        started = time.monotonic()
        n_since_open = 0
        sampler = FrameSampler(self.camera.fps)
        while not self._stop.is_set():
            ok, image = cap.read()
            if not ok and is_file(self.source) and self.camera.loop and n_since_open > 0:
                cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                ok, image = cap.read()
            if not ok:
                if is_file(self.source) and not self.camera.loop and n_since_open > 0:
                    self.state = "ended"
                    self._event("camera.offline", {"source": self.safe_source(), "reason": "end of file"})
                    return True
                return False
            # A file's frames are timed by its own clock, as in `count`; a stream's as they arrive.
            due = sampler.take(n_since_open * pace if pace else time.monotonic() - started)
            n_since_open += 1
            self._publish(image, due)
            if pace:  # a file plays at its own frame rate, like a live camera would
                self._stop.wait(max(0.0, started + n_since_open * pace - time.monotonic()))
        return True

    def _publish(self, image: np.ndarray, due: bool) -> None:
        now = time.monotonic()
        if self.state != "running":
            back = self.state == "stalled"
            self.state = "running"
            self._down_since = None
            if not back:
                self._event("camera.online", {"source": self.safe_source(),
                                                "width": int(image.shape[1]), "height": int(image.shape[0])})
        self._stall_reported = False
        self.frames_read += 1
        self.last_frame_at = self.last_attempt_at = now
        self._meter.tick(now)
        with self._cond:
            self._latest = Frame(image, self.frames_read, now)
            if due:
                self._latest_due = self._latest
                self._cond.notify_all()
