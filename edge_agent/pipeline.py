"""capture -> detect -> track -> count, per camera.

``CountingStage`` turns one frame's detections into tracks, crossings and zone occupancy; it is
the part shared by the daemon's ``CameraWorker`` (live, paced to the camera's fps, events to
the outbox) and by the offline ``edge-agent count`` command (every frame of a file, one JSON).
Threads only: per camera one reader thread (capture.py) and one processing thread (here).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
from pydantic import ValidationError

from . import metrics
from .capture import LatestFrameReader, RateMeter, StreamError, iter_file_frames, map_ahead, video_size
from .config import CameraConfig, LineConfig, ModelConfig, ZoneConfig
from .count import CounterStore, Crossing, LineCounter, LineTotals, ZoneCounter
from .detect import LOW_SCORE_FLOOR, Detections, Detector, ModelFormatError, UnknownClassError
from .envelope import Draft, iso_utc
from .logs import clip
from .outbox import refusal_reason
from .track import ByteTracker, TrackedObject, iou_matrix

log = logging.getLogger(__name__)

# A new track needs a box this much above model.confidence (ByteTrack uses 0.1): fewer
# short-lived tracks from jitter, which make false crossings on lines along walking paths.
NEW_TRACK_MARGIN = 0.25
# Debounce: a crossing counts once the track was seen this long on the new side.
CONFIRM_SECONDS = 0.2
MIN_CONFIRM_FRAMES = 3
# Hysteresis: ... and got this many box heights past the line (jitter of the box bottom stays below).
CONFIRM_MARGIN = 0.07
# The anchor is averaged over a track's last observations: damps jitter, delays a crossing slightly.
SMOOTH_FRAMES = 3
# A track unseen this long is gone (its id will not come back).
LOST_SECONDS = 1.0
# ID switch repair: a new track that starts this close (in box heights) to where a track that
# vanished within HANDOVER_SECONDS would be by now, at its last speed, continues that track's line
# state: a person hidden by others at the line for a second comes back across it and counts once.
HANDOVER_DISTANCE = 0.75
HANDOVER_SECONDS = 1.5
# Anchors kept per track to estimate its speed for the hand-over (a few, so a turn does not mislead).
TRAIL_STEPS = 5
# A new track overlapping a visible one more than this is a second box on that person, not the
# hidden one come back (it would take over a walker's state and lose the walker's crossing).
HANDOVER_MAX_IOU = 0.2
# An occupancy excursion ends after this many frames at or under the limit (no flapping alerts).
OCCUPANCY_CLEAR_FRAMES = 3


def confirm_frames(fps: float) -> int:
    return max(MIN_CONFIRM_FRAMES, int(round(fps * CONFIRM_SECONDS)))


@dataclass
class StepResult:
    tracks: list[TrackedObject]
    crossings: list[Crossing]
    occupancy: dict[str, int]
    tracking_ms: float = 0.0


class _Trail:
    """A track's recent bottom-centre anchors; it moves to the new id on an ID switch."""

    def __init__(self) -> None:
        self.points: deque[tuple[int, float, float]] = deque(maxlen=max(TRAIL_STEPS, SMOOTH_FRAMES))  # (step, x, y)
        self.step = 0
        self.class_id = -1

    def add(self, step: int, xyxy: np.ndarray, class_id: int) -> None:
        x1, _, x2, y2 = xyxy.tolist()
        self.points.append((step, (x1 + x2) / 2, y2))
        self.step, self.class_id = step, class_id

    def mean_anchor(self, last: int) -> tuple[float, float]:
        """The mean of the last ``last`` anchors: damps detector jitter for the line counters."""
        pts = list(self.points)[-last:]
        return sum(p[1] for p in pts) / len(pts), sum(p[2] for p in pts) / len(pts)

    def predicted_anchor(self, step: int) -> tuple[float, float]:
        """The last anchor moved on at the mean speed over the trail (constant velocity)."""
        s1, x1, y1 = self.points[-1]
        s0, x0, y0 = self.points[0]
        if s1 == s0:
            return x1, y1
        k = (step - s1) / (s1 - s0)
        return x1 + (x1 - x0) * k, y1 + (y1 - y0) * k


class CountingStage:
    """Tracker + line and zone counters for one camera's picture size."""

    def __init__(self, lines: list[LineConfig], zones: list[ZoneConfig], width: int, height: int,
                 class_names: list[str], *, fps: float, confidence: float):
        self.size = (width, height)
        self.names = class_names
        self.tracker = ByteTracker(high_thresh=confidence, low_thresh=min(LOW_SCORE_FLOOR, confidence),
                                   new_track_thresh=min(confidence + NEW_TRACK_MARGIN, 0.95),
                                   frame_rate=fps, lost_seconds=LOST_SECONDS)
        frames = confirm_frames(fps)
        self.lines = [LineCounter(line, width, height, min_frames=frames, margin=CONFIRM_MARGIN, smooth=SMOOTH_FRAMES)
                      for line in lines]
        self.zones = [ZoneCounter(zone, width, height) for zone in zones]
        self._alive: set[int] = set()
        self._steps = 0
        self._trails: dict[int, _Trail] = {}  # id -> where its anchor has been lately
        self._max_id = 0
        self._handover_steps = max(1, int(round(fps * HANDOVER_SECONDS)))

    def _hand_over_switched_ids(self, tracks: list[TrackedObject]) -> None:
        """A brand-new id near where another id vanished lately is the same object (an ID switch).

        "Near" is measured from where the vanished track would be now had it kept walking at
        its last speed: a person hidden for a few frames by people standing at a line comes
        back further on, possibly across the line, and must still count once.
        """
        new = [t for t in tracks if t.track_id > self._max_id]
        if not new:
            return
        seen_now = {t.track_id for t in tracks}
        orphans = {tid: trail for tid, trail in self._trails.items()
                   if tid not in seen_now and self._steps - trail.step <= self._handover_steps}
        for t in new:
            if self._overlaps_another(t, tracks):
                continue  # a second box on someone still visible, not a hidden person come back
            bottom = ((float(t.xyxy[0]) + float(t.xyxy[2])) / 2, float(t.xyxy[3]))
            best, best_d = None, HANDOVER_DISTANCE * float(t.xyxy[3] - t.xyxy[1])
            for tid, trail in orphans.items():
                if trail.class_id != t.class_id:
                    continue
                px, py = trail.predicted_anchor(self._steps)
                d = float(np.hypot(bottom[0] - px, bottom[1] - py))
                if d <= best_d:
                    best, best_d = tid, d
            if best is not None:
                self._trails[t.track_id] = self._trails.pop(best)
                del orphans[best]
                for line in self.lines:
                    line.hand_over(best, t.track_id)

    @staticmethod
    def _overlaps_another(t: TrackedObject, tracks: list[TrackedObject]) -> bool:
        others = [o.xyxy for o in tracks if o.track_id != t.track_id]
        return bool(others) and float(iou_matrix(t.xyxy[None], np.array(others)).max()) > HANDOVER_MAX_IOU

    def _remember(self, tracks: list[TrackedObject]) -> None:
        for t in tracks:
            trail = self._trails.get(t.track_id)
            if trail is None:
                trail = self._trails[t.track_id] = _Trail()
            trail.add(self._steps, t.xyxy, t.class_id)
            self._max_id = max(self._max_id, t.track_id)
        cutoff = self._steps - self._handover_steps
        if len(self._trails) > 64 or self._steps % 32 == 0:
            self._trails = {k: v for k, v in self._trails.items() if v.step >= cutoff}

    def step(self, dets: Detections, frame: int, ts: float) -> StepResult:
        t0 = time.thread_time()  # CPU time, like the detector's pre/postprocessing
        self._steps += 1
        tracks = self.tracker.update(dets.xyxy, dets.scores, dets.class_ids)
        self._hand_over_switched_ids(tracks)
        self._remember(tracks)
        crossings: list[Crossing] = []
        for t in tracks:
            name = self.names[t.class_id]
            box = t.xyxy.tolist()  # plain floats: the per-line arithmetic is scalar
            bottom = self._trails[t.track_id].mean_anchor(SMOOTH_FRAMES)  # once for all lines
            for line in self.lines:
                pt = bottom if line.anchor == "bottom_center" else None
                if line.wants(name) and (c := line.observe(t.track_id, box, name, frame, ts, pt)):
                    crossings.append(c)
        alive = self.tracker.active_ids()
        for gone in self._alive - alive:
            crossings.extend(c for line in self.lines if (c := line.end_track(gone)))
        self._alive = alive
        boxes = [(t.xyxy, self.names[t.class_id]) for t in tracks]
        occupancy = {z.id: z.occupancy(boxes) for z in self.zones}
        return StepResult(tracks, crossings, occupancy, (time.thread_time() - t0) * 1e3)

    def finish(self) -> list[Crossing]:
        """End of the video: every track ends, pending crossings count."""
        return [c for line in self.lines for c in line.end_all()]


# --- edge-agent count ------------------------------------------------------------------------

class UsageError(ValueError):
    """A command-line argument that cannot be used; the message says which and why."""


def _numbers(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{what}: not numbers") from None


def parse_line_arg(text: str) -> LineConfig:
    """``ID:x1,y1,x2,y2`` in normalised coordinates."""
    ident, sep, rest = text.partition(":")
    nums = _numbers(rest, f"--line {text!r}") if sep else []
    if not sep or len(nums) != 4:
        raise UsageError(f"--line {text!r}: expected ID:x1,y1,x2,y2 (normalised 0..1)")
    try:
        return LineConfig(id=ident, points=((nums[0], nums[1]), (nums[2], nums[3])))
    except ValidationError as e:
        raise UsageError(f"--line {text!r}: {e.errors()[0]['msg']}") from None


def parse_zone_arg(text: str) -> ZoneConfig:
    """``ID:x,y;x,y;x,y…`` in normalised coordinates."""
    ident, sep, rest = text.partition(":")
    if not sep:
        raise UsageError(f"--zone {text!r}: expected ID:x,y;x,y;x,y…")
    points = [_numbers(p, f"--zone {text!r}") for p in rest.split(";") if p.strip()]
    if any(len(p) != 2 for p in points):
        raise UsageError(f"--zone {text!r}: every point is x,y")
    try:
        return ZoneConfig(id=ident, polygon=[(p[0], p[1]) for p in points])
    except ValidationError as e:
        raise UsageError(f"--zone {text!r}: {e.errors()[0]['loc']} {e.errors()[0]['msg']}") from None


@dataclass
class CountReport:
    frames: int = 0
    seconds: float = 0.0
    totals: LineTotals = field(default_factory=LineTotals)
    occupancy_sum: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    occupancy_max: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    timing_sum: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    crossings: list[Crossing] = field(default_factory=list)

    def as_dict(self, line_ids: list[str], zone_ids: list[str]) -> dict[str, Any]:
        n = max(self.frames, 1)
        timing = {f"{k}_ms": round(v / n, 3) for k, v in self.timing_sum.items()}
        overhead = sum(self.timing_sum[k] for k in ("preprocess", "postprocess", "tracking"))
        timing["overhead_vs_inference_pct"] = round(100 * overhead / max(self.timing_sum["inference"], 1e-9), 2)
        return {"frames": self.frames, "seconds": round(self.seconds, 3),
                "fps": round(self.frames / self.seconds, 2) if self.seconds else 0.0,
                "lines": self.totals.as_dict(line_ids),
                "zones": {z: {"avg": round(self.occupancy_sum[z] / n, 3), "max": self.occupancy_max[z]}
                          for z in zone_ids},
                "timing": timing}


def count_video(video: str | Path, detector: Detector, lines: list[LineConfig], zones: list[ZoneConfig], *,
                fps: float | None = None, max_frames: int | None = None,
                on_step: Callable[[int, StepResult], None] | None = None) -> CountReport:
    """Count a video file offline with the same stages as the daemon."""
    width, height, src_fps, _ = video_size(video)
    stage = CountingStage(lines, zones, width, height, detector.names,
                          fps=min(fps or src_fps, src_fps), confidence=detector.confidence)
    report = CountReport()
    started = time.perf_counter()
    frames = iter_file_frames(video, fps, transform=detector.prepare)
    for index, dets in map_ahead(frames, detector.run_prepared, name=f"detect-{Path(video).name}"):
        if max_frames is not None and report.frames >= max_frames:
            break
        step = stage.step(dets, index, index / src_fps)
        _add_step(report, dets, step)
        if on_step is not None:
            on_step(index, step)
    for c in stage.finish():
        report.totals.add(c)
        report.crossings.append(c)
    report.seconds = time.perf_counter() - started
    return report


def _add_step(report: CountReport, dets: Detections, step: StepResult) -> None:
    report.frames += 1
    for k, v in dets.timing_ms.items():
        report.timing_sum[k] += v
    report.timing_sum["tracking"] += step.tracking_ms
    for c in step.crossings:
        report.totals.add(c)
        report.crossings.append(c)
    for z, n in step.occupancy.items():
        report.occupancy_sum[z] += n
        report.occupancy_max[z] = max(report.occupancy_max[z], n)


def _print_human(result: dict[str, Any]) -> None:
    print(f"{result['frames']} frames in {result['seconds']} s ({result['fps']} fps)")
    for line, c in result["lines"].items():
        print(f"line {line}: in {c['in']}, out {c['out']}")
    for zone, z in result["zones"].items():
        print(f"zone {zone}: occupancy avg {z['avg']}, max {z['max']}")
    t = result["timing"]
    print("per frame: " + ", ".join(f"{k} {v}" for k, v in t.items()))


def count_command(args: argparse.Namespace) -> int:
    """``edge-agent count``: exit 0, or 2 with one clear line on stderr for unusable input."""
    try:
        lines = [parse_line_arg(s) for s in args.line]
        zones = [parse_zone_arg(s) for s in args.zone]
        if not lines and not zones:
            raise UsageError("give at least one --line or --zone")
        ids = [x.id for x in lines] + [z.id for z in zones]
        if len(set(ids)) != len(ids):
            raise UsageError("line and zone ids must be unique")
        if args.fps is not None and args.fps <= 0:
            raise UsageError("--fps must be positive")
        model = ModelConfig(path=Path(args.model), format=args.format,
                            classes=[c.strip() for c in args.classes.split(",") if c.strip()],
                            **({"confidence": args.confidence} if args.confidence is not None else {}),
                            **({"threads": args.threads} if args.threads is not None else {}))
        detector = Detector(model)
        report = count_video(args.video, detector, lines, zones, fps=args.fps)
    except (UsageError, ModelFormatError, UnknownClassError, FileNotFoundError, StreamError) as e:
        print(f"edge-agent count: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:
        err = e.errors()[0]
        print(f"edge-agent count: {'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        return 2
    result = report.as_dict([x.id for x in lines], [z.id for z in zones])
    if args.json:
        print(json.dumps(result))
    else:
        _print_human(result)
    return 0


# --- the daemon's per-camera worker ------------------------------------------------------------

@dataclass
class _Interval:
    """What one counting.interval reports; reset after each report."""

    started_wall: float
    started: float
    frames: int = 0
    skipped: int = 0
    inference_ms: float = 0.0
    totals: LineTotals = field(default_factory=LineTotals)
    occupancy_sum: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    occupancy_max: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def absorb(self, earlier: "_Interval") -> None:
        """Take in a report that could not be stored, so that the next one still carries its counts."""
        self.started_wall, self.started = earlier.started_wall, earlier.started
        self.frames += earlier.frames
        self.skipped += earlier.skipped
        self.inference_ms += earlier.inference_ms
        for line, dirs in earlier.totals.lines.items():
            for direction, classes in dirs.items():
                for cls, n in classes.items():
                    self.totals.lines[line][direction][cls] += n
        for zone, n in earlier.occupancy_sum.items():
            self.occupancy_sum[zone] += n
        for zone, n in earlier.occupancy_max.items():
            self.occupancy_max[zone] = max(self.occupancy_max[zone], n)


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
        self._stage: CountingStage | None = None
        self._lock = threading.Lock()  # guards the interval and the totals (report vs. processing)
        self._interval = _Interval(time.time(), time.monotonic())
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
        with self._lock:
            counts = self.store.totals.as_dict([line.id for line in self.camera.lines])
        return {"id": self.camera.id, "state": state,
                "camera_fps": round(self.reader.camera_fps(), 2), "processed_fps": round(self._meter.rate(now), 2),
                "skipped": self._skipped, "frames": self._frames,
                "last_frame_age_s": round(now - self.reader.last_frame_at, 3) if self.reader.last_frame_at else None,
                "counts": counts}

    def latest_jpeg(self) -> bytes | None:
        frame = self.reader.latest()
        if frame is None:
            return None
        ok, buf = cv2.imencode(".jpg", frame.image, [cv2.IMWRITE_JPEG_QUALITY, 85])
        return buf.tobytes() if ok else None

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
        next_due = time.monotonic()
        next_report = time.monotonic() + self.report_interval_s
        period = 1.0 / self.camera.fps
        while not self._stop.is_set():
            now = self._beat = time.monotonic()
            self.reader.check_stall(now)
            self._check_camera_down(now)
            if now >= next_report:
                self.flush_report()
                next_report = now + self.report_interval_s
            if now < next_due:  # pace to the camera's fps; newer frames replace older ones meanwhile
                self._stop.wait(min(next_due - now, 0.5))
                continue
            frame = self.reader.wait_newer(last_seq, timeout=0.5)
            if frame is None:
                continue
            skipped = frame.seq - last_seq - 1 if last_seq else 0
            last_seq = frame.seq
            next_due = max(next_due + period, time.monotonic() - period)
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
            iv = self._interval
            iv.frames += 1
            iv.skipped += skipped
            iv.inference_ms += dets.timing_ms["inference"]
            for z, n in step.occupancy.items():
                iv.occupancy_sum[z] += n
                iv.occupancy_max[z] = max(iv.occupancy_max[z], n)
        self._record_crossings(step.crossings)
        self._check_occupancy(step.occupancy)
        if self._dirty and now - self._last_counts_saved >= 1.0:
            self._save_counts(now)

    def _record_crossings(self, crossings: list[Crossing]) -> None:
        for c in crossings:
            with self._lock:
                self._interval.totals.add(c)
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
            self._interval = _Interval(now_wall, now)
            cumulative = self.store.totals.as_dict([line.id for line in self.camera.lines])
        elapsed = max(now - iv.started, 1e-9)
        interval_counts = iv.totals.as_dict([line.id for line in self.camera.lines])
        data = {"from": iso_utc(iv.started_wall), "to": iso_utc(now_wall), "interval_s": round(elapsed, 3),
                "frames": iv.frames, "skipped": iv.skipped, "fps": round(iv.frames / elapsed, 2),
                "camera_fps": round(self.reader.camera_fps(), 2),
                "inference_ms": round(iv.inference_ms / iv.frames, 2) if iv.frames else None,
                "lines": {lid: {**interval_counts[lid], "cumulative": cumulative[lid]} for lid in interval_counts},
                "zones": {z.id: {"avg": round(iv.occupancy_sum[z.id] / iv.frames, 3) if iv.frames else 0.0,
                                 "max": iv.occupancy_max[z.id]} for z in self.camera.zones}}
        if not self._emit("ai.inference.results", "counting.interval", data):
            with self._lock:
                self._interval.absorb(iv)
        self._save_counts(now)
