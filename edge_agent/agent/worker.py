"""One camera on the agent: reader, counting stage, interval reports, events."""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edge_agent.agent.liveview import LiveView
from edge_agent.agent.outbox import refusal_reason
from edge_agent.common import metrics
from edge_agent.common.envelope import Draft, iso_utc
from edge_agent.common.logs import clip
from edge_agent.vision.capture import LatestFrameReader, RateMeter
from edge_agent.vision.config import CameraConfig, ModelConfig
from edge_agent.vision.count import CounterStore, Crossing
from edge_agent.vision.detect import Detector
from edge_agent.vision.stage import OCCUPANCY_CLEAR_FRAMES, CountingStage, StepTally

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class _Interval(StepTally):
    """What one counting.interval reports; reset after each report."""

    started_wall: float
    started: float
    skipped: int = 0  # frames the camera delivered that processing had no time for

    def absorb(self, earlier: "_Interval") -> None:
        """Take in a report that could not be stored, so that the next one still carries its counts."""
        super().absorb(earlier)
        self.started_wall, self.started = earlier.started_wall, earlier.started
        self.skipped += earlier.skipped


class CameraWorker:
    """One camera in the daemon: a reader thread and a processing thread; events go to ``emit``."""

    def __init__(self, camera: CameraConfig, model: ModelConfig, emit: Callable[[Draft], Any], *,
                 device_id: str, report_interval_s: float, state_dir: Path, detector: Detector | None = None):
        self.camera = camera
        self.model = model
        self.emit = emit
        self.device_id = device_id
        self.report_interval_s = report_interval_s
        self.detector = detector or Detector(model)
        self.store = CounterStore(Path(state_dir) / f"counts-{camera.id}.json")
        self.reader = LatestFrameReader(camera, self._on_camera_event)
        self.view = LiveView(camera, self.detector.names, self._line_counts, self.reader.latest)
        self._stage: CountingStage | None = None
        self._lock = threading.Lock()  # guards the interval and the totals (report vs. processing)
        self._interval = _Interval(started_wall=time.time(), started=time.monotonic())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._beat = time.monotonic()
        self._frames = 0
        self._skipped = 0
        self._meter = RateMeter()
        self._last_counts_saved = 0.0
        self._dirty = False
        self._over: dict[str, bool] = defaultdict(bool)
        self._under_frames: dict[str, int] = defaultdict(int)
        self._down_alerted = False
        self._last_error: str | None = None
        self._occupancy: dict[str, int] = {z.id: 0 for z in camera.zones}  # of the last processed frame

    # --- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._beat = time.monotonic()
        self.reader.start()
        self._thread = threading.Thread(target=self._run, name=f"camera-{self.camera.id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop both threads, count what is pending, emit the last interval and save the totals."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        was_online = self.reader.state in ("running", "stalled")
        self.reader.stop(timeout)
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._stage is not None:
            self._record_crossings(self._stage.finish())
        if was_online:
            self._emit("camera.events", "camera.offline", {"source": self.reader.safe_source(), "reason": "stopped"})
        self.flush_report()

    def alive(self) -> bool:
        """Whether the processing thread runs (the supervisor rebuilds a worker whose thread died)."""
        return self._thread is not None and self._thread.is_alive()

    def heartbeat(self) -> float:
        """Monotonic time the processing loop last went round (it wakes at least twice a second)."""
        return self._beat

    # --- observers -------------------------------------------------------------------------
    def status(self) -> dict:
        now = time.monotonic()
        state = "stopped" if self._stop.is_set() or self._thread is None else self.reader.state
        if state == "ended":
            state = "stopped"
        counts = self._line_counts()
        return {"id": self.camera.id, "state": state,
                "camera_fps": round(self.reader.camera_fps(), 2), "processed_fps": round(self._meter.rate(now), 2),
                "skipped": self._skipped, "frames": self._frames,
                "last_frame_age_s": round(now - self.reader.last_frame_at, 3) if self.reader.last_frame_at else None,
                "counts": counts, "occupancy": dict(self._occupancy)}

    def _line_counts(self) -> dict:
        """Running totals of every configured line (zero counts too), as LineTotals.as_dict."""
        with self._lock:
            return self.store.totals.as_dict([line.id for line in self.camera.lines])

    # --- events ----------------------------------------------------------------------------
    def _emit(self, stream: str, type_: str, data: dict) -> bool:
        """Hand an event to the outbox; False when it could not be stored (logged and counted).

        A full or failing outbox must not stop the camera: counting goes on, and the counts
        stay in the camera's totals for the next interval report.
        """
        try:
            self.emit(Draft(stream=stream, type=type_, data=data, camera_id=self.camera.id))
            return True
        except Exception as e:  # OutboxFull, a full disk and friends
            reason = refusal_reason(e)
            metrics.OUTBOX_DROPPED.labels(stream=stream, reason=reason).inc()
            log.error("camera %s: could not store %s (%s): %s", self.camera.id, type_, reason,
                      clip(f"{type(e).__name__}: {e}"), extra={"camera_id": self.camera.id})
            return False

    def _on_camera_event(self, type_: str, data: dict) -> None:
        if type_ == "camera.stream_error":
            self._last_error = data.get("error")
            metrics.FRAMES.labels(self.camera.id, "error").inc()
        if type_ == "camera.online":
            self._down_alerted = False
        self._emit("camera.events", type_, data)

    def _check_camera_down(self, now: float) -> None:
        down = self.reader.down_for(now)
        if down >= self.camera.down_after_s and not self._down_alerted and self.reader.state != "ended":
            self._down_alerted = True
            self._emit("notifications", "alert.camera_down",
                       {"source": self.reader.safe_source(), "down_for_s": round(down, 1),
                        "last_error": self._last_error})

    # --- processing thread -----------------------------------------------------------------
    def _run(self) -> None:
        last_seq = 0
        next_report = time.monotonic() + self.report_interval_s
        while not self._stop.is_set():
            now = self._beat = time.monotonic()
            self.reader.check_stall(now)
            self._check_camera_down(now)
            if now >= next_report:
                self.flush_report()
                next_report = now + self.report_interval_s
            # The reader picks the frames to process at the camera's fps (the rule `count --fps`
            # uses); when processing falls behind, the newest picked frame replaces older ones.
            frame = self.reader.wait_newer(last_seq, timeout=0.5)
            if frame is None:
                continue
            skipped = frame.seq - last_seq - 1 if last_seq else 0
            last_seq = frame.seq
            try:
                self._process(frame.image, skipped)
            except Exception:  # one bad frame must not end the camera
                log.exception("camera %s: frame %d failed", self.camera.id, frame.seq)
                metrics.FRAMES.labels(self.camera.id, "error").inc()

    def _stage_for(self, image: np.ndarray) -> CountingStage:
        h, w = image.shape[:2]
        if self._stage is None or self._stage.size != (w, h):
            if self._stage is not None:  # resolution changed after a reconnect: tracks restart
                self._record_crossings(self._stage.finish())
            self._stage = CountingStage(self.camera.lines, self.camera.zones, w, h, self.detector.names,
                                        fps=self.camera.fps, confidence=self.model.confidence)
        return self._stage

    def _process(self, image: np.ndarray, skipped: int) -> None:
        stage = self._stage_for(image)
        dets = self.detector.run(image)
        self._frames += 1
        step = stage.step(dets, self._frames, time.time())
        now = time.monotonic()
        self._meter.tick(now)
        self._skipped += skipped
        metrics.FRAMES.labels(self.camera.id, "processed").inc()
        if skipped:
            metrics.FRAMES.labels(self.camera.id, "skipped").inc(skipped)
        metrics.INFERENCE_SECONDS.observe(dets.timing_ms["inference"] / 1e3)
        metrics.CAMERA_FPS.labels(self.camera.id).set(self._meter.rate(now))
        with self._lock:
            self._interval.add_step(step, dets.timing_ms)
            self._interval.skipped += skipped
        self._record_crossings(step.crossings)
        self._occupancy = step.occupancy
        self.view.update(image, step.tracks, step.occupancy)
        self._check_occupancy(step.occupancy)
        if self._dirty and now - self._last_counts_saved >= 1.0:
            self._save_counts(now)

    def _record_crossings(self, crossings: list[Crossing]) -> None:
        for c in crossings:
            with self._lock:
                self._interval.add_crossing(c)
                self.store.totals.add(c)
                self._dirty = True
            metrics.CROSSINGS.labels(self.camera.id, c.line, c.direction, c.class_name).inc()
            self._emit("ai.inference.results", "counting.crossing",
                       {"line": c.line, "direction": c.direction, "class": c.class_name,
                        "track_id": c.track_id, "ts": iso_utc(c.ts)})

    def _save_counts(self, now: float) -> None:
        with self._lock:
            try:
                self.store.save()
                self._dirty = False
            except OSError as e:
                log.error("camera %s: cannot save counters to %s: %s", self.camera.id, self.store.path, e)
        self._last_counts_saved = now

    def _check_occupancy(self, occupancy: dict[str, int]) -> None:
        """One alert per excursion above max_occupancy."""
        for zone in self.camera.zones:
            if zone.max_occupancy is None:
                continue
            n = occupancy.get(zone.id, 0)
            if n > zone.max_occupancy:
                self._under_frames[zone.id] = 0
                if not self._over[zone.id]:
                    self._over[zone.id] = True
                    self._emit("notifications", "alert.occupancy",
                               {"zone": zone.id, "occupancy": n, "max_occupancy": zone.max_occupancy,
                                "ts": iso_utc(time.time())})
            elif self._over[zone.id]:
                self._under_frames[zone.id] += 1
                if self._under_frames[zone.id] >= OCCUPANCY_CLEAR_FRAMES:
                    self._over[zone.id] = False

    def flush_report(self) -> None:
        """Emit a counting.interval for the time since the last one (nothing when it is empty)."""
        now_wall, now = time.time(), time.monotonic()
        with self._lock:
            iv = self._interval
            if iv.frames == 0 and not iv.totals.lines and now - iv.started < 1.0:
                return
            self._interval = _Interval(started_wall=now_wall, started=now)
            cumulative = self.store.totals.as_dict([line.id for line in self.camera.lines])
        elapsed = max(now - iv.started, 1e-9)
        interval_counts = iv.totals.as_dict([line.id for line in self.camera.lines])
        data = {"from": iso_utc(iv.started_wall), "to": iso_utc(now_wall), "interval_s": round(elapsed, 3),
                "frames": iv.frames, "skipped": iv.skipped, "fps": round(iv.frames / elapsed, 2),
                "camera_fps": round(self.reader.camera_fps(), 2),
                "inference_ms": round(iv.timing_sum["inference"] / iv.frames, 2) if iv.frames else None,
                "lines": {lid: {**interval_counts[lid], "cumulative": cumulative[lid]} for lid in interval_counts},
                "zones": iv.zones([z.id for z in self.camera.zones])}
        if not self._emit("ai.inference.results", "counting.interval", data):
            with self._lock:
                self._interval.absorb(iv)
        self._save_counts(now)
