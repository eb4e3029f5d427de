"""What people see of a camera: its latest processed frame with the counting overlay.

The processing thread only hands over references (no drawing, no encoding, a few attribute
writes per frame). A snapshot or an MJPEG viewer draws and encodes when it asks, once per
processed frame however many watch (the last JPEG is kept by frame number), so a camera
nobody watches costs nothing here.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from typing import Any, Callable

import cv2
import numpy as np

from edge_agent.common import metrics
from edge_agent.vision.annotate import annotate
from edge_agent.vision.capture import Frame
from edge_agent.vision.config import CameraConfig
from edge_agent.vision.track import TrackedObject

JPEG_QUALITY = 80
# MJPEG frames wider than this are scaled down: a browser tile needs no more, and encoding is the cost.
STREAM_MAX_WIDTH = 1280
# Frame numbers across every view of the process, so a viewer that moves to a camera's new
# worker (after a config change) still sees strictly newer numbers. next() on count is atomic.
_numbers = itertools.count(1)


@dataclass(frozen=True)
class _Processed:
    number: int
    image: np.ndarray
    tracks: list[TrackedObject]
    occupancy: dict[str, int]


class LiveView:
    """One camera worker's latest processed frame; JPEGs of it, annotated or plain, on demand."""

    def __init__(self, camera: CameraConfig, class_names: list[str], counts: Callable[[], dict[str, Any]],
                 latest_raw: Callable[[], Frame | None]):
        self.camera = camera
        self.class_names = class_names
        self._counts = counts  # running totals per line, as LineTotals.as_dict
        self._latest_raw = latest_raw  # the reader's newest frame, processed or not
        self._cond = threading.Condition()
        self._last: _Processed | None = None
        self._streamed: tuple[int, bytes] | None = None  # (number, jpeg) of the last stream frame

    def update(self, image: np.ndarray, tracks: list[TrackedObject], occupancy: dict[str, int]) -> None:
        """A frame was processed (called by the processing thread: references only)."""
        with self._cond:
            self._last = _Processed(next(_numbers), image, tracks, occupancy)
            self._cond.notify_all()

    def annotated(self, processed: _Processed | None = None) -> np.ndarray | None:
        """The last processed frame with lines, zones, tracks and counts drawn; before the first
        one is processed, the newest raw frame with the lines and zones."""
        p = processed or self._last
        if p is None:
            raw = self._latest_raw()
            if raw is None:
                return None
            p = _Processed(0, raw.image, [], {})
        return annotate(p.image, lines=self.camera.lines, zones=self.camera.zones, tracks=p.tracks,
                        class_names=self.class_names, line_counts=self._counts(), occupancy=p.occupancy)

    def snapshot(self, *, raw: bool = False) -> bytes | None:
        """The camera's picture as JPEG at full size: annotated, or the newest raw frame; None before any."""
        if raw:
            frame = self._latest_raw()
            return encode_jpeg(frame.image, self.camera.id) if frame is not None else None
        image = self.annotated()
        return encode_jpeg(image, self.camera.id) if image is not None else None

    def next_stream_jpeg(self, after: int, timeout: float) -> tuple[int, bytes] | None:
        """``(number, jpeg)`` of the first processed frame newer than ``after`` (annotated, at most
        STREAM_MAX_WIDTH wide), waiting up to ``timeout``; None if none came."""
        with self._cond:
            self._cond.wait_for(lambda: self._last is not None and self._last.number > after, timeout)
            p = self._last
            if p is None or p.number <= after:
                return None
            cached = self._streamed
        if cached is not None and cached[0] == p.number:
            return cached
        image = self.annotated(p)
        assert image is not None  # p is a processed frame
        jpeg = encode_jpeg(fit_width(image, STREAM_MAX_WIDTH), self.camera.id)
        self._streamed = (p.number, jpeg)  # a race only costs a second encoding
        return p.number, jpeg


def fit_width(image: np.ndarray, max_width: int) -> np.ndarray:
    height, width = image.shape[:2]
    if width <= max_width:
        return image
    return cv2.resize(image, (max_width, max(1, height * max_width // width)), interpolation=cv2.INTER_AREA)


def encode_jpeg(image: np.ndarray, camera_id: str) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError(f"camera {camera_id}: JPEG encoding failed")
    metrics.VIEW_JPEGS.labels(camera_id).inc()
    return buf.tobytes()
