"""capture -> detect -> track -> count, per camera.

``CountingStage`` turns one frame's detections into tracks, crossings and zone occupancy; it is
the part shared by the daemon's ``CameraWorker`` (live, paced to the camera's fps, events to
the outbox) and by the offline ``edge-agent count`` command (every frame of a file, one JSON).
Threads only: per camera one reader thread (capture.py) and one processing thread (here).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

import numpy as np

from edge_agent.vision.config import LineConfig, ZoneConfig
from edge_agent.vision.count import (
    Crossing,
    LineCounter,
    LineTotals,
    RecentAnchors,
    ZoneCounter,
    anchor_point,
)
from edge_agent.vision.detect import LOW_SCORE_FLOOR, Detections
from edge_agent.vision.track import ByteTracker, TrackedObject, iou_matrix

log = logging.getLogger(__name__)

# How far (in its box heights per second) a track may have moved between two processed frames
# and still take a box that its predicted box does not overlap: a walker covers about one
# height a second; the margin is for the prediction lagging a track that just started or turned.
# At 5 fps and less, steps are long enough that IoU alone loses walkers (docs/performance.md).
REACH_HEIGHTS_S = 3.0
# A new track needs a box this much above model.confidence (ByteTrack uses 0.1): fewer
# short-lived tracks from jitter, which make false crossings on lines along walking paths.
NEW_TRACK_MARGIN = 0.25
# Debounce: a crossing counts once the track was seen this long on the new side, at least
# MIN_CONFIRM_FRAMES frames, but not more than LOW_RATE_SECONDS of frames (at 2 fps three frames
# are 1.5 s, longer than many walkers stay in view after a line) and never fewer than
# LOW_RATE_CONFIRM_FRAMES: one more frame on the new side is what tells a wobble from a crossing.
CONFIRM_SECONDS = 0.2
MIN_CONFIRM_FRAMES = 3
LOW_RATE_SECONDS = 0.5
LOW_RATE_CONFIRM_FRAMES = 2
# Hysteresis: ... and got this many box heights past the line (jitter of the box bottom stays below).
CONFIRM_MARGIN = 0.07
# The anchor is averaged over a track's last observations: damps jitter, delays a crossing slightly
# (at most SMOOTH_FRAMES of them, and no more than LOW_RATE_SECONDS of frames at low rates).
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


def frames_within_low_rate_window(most: int, fps: float) -> int:
    """``most`` frames, or fewer when they would span more than LOW_RATE_SECONDS (at least one)."""
    return max(1, min(most, int(round(fps * LOW_RATE_SECONDS))))


def confirm_frames(fps: float) -> int:
    return max(LOW_RATE_CONFIRM_FRAMES, frames_within_low_rate_window(MIN_CONFIRM_FRAMES, fps),
               int(round(fps * CONFIRM_SECONDS)))


def smooth_frames(fps: float) -> int:
    return frames_within_low_rate_window(SMOOTH_FRAMES, fps)


@dataclass
class StepResult:
    tracks: list[TrackedObject]
    crossings: list[Crossing]
    occupancy: dict[str, int]
    tracking_ms: float = 0.0


@dataclass
class StepTally:
    """What a run of counting steps adds up to: frames, time per stage, crossings per line and
    zone occupancy. The daemon's interval reports and the offline ``count`` both keep one."""

    frames: int = 0
    timing_sum: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # ms per stage
    totals: LineTotals = field(default_factory=LineTotals)
    occupancy_sum: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    occupancy_max: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add_step(self, step: StepResult, timing_ms: dict[str, float]) -> None:
        """One processed frame: its detector timing, the tracking time and the zones' occupancy
        (its crossings go to ``add_crossing``: pending ones also count when tracks end)."""
        self.frames += 1
        for k, v in timing_ms.items():
            self.timing_sum[k] += v
        self.timing_sum["tracking"] += step.tracking_ms
        for z, n in step.occupancy.items():
            self.occupancy_sum[z] += n
            self.occupancy_max[z] = max(self.occupancy_max[z], n)

    def add_crossing(self, c: Crossing) -> None:
        self.totals.add(c)

    def absorb(self, earlier: "StepTally") -> None:
        """Take in an earlier tally (a report that could not be stored) so its counts are not lost."""
        self.frames += earlier.frames
        for k, v in earlier.timing_sum.items():
            self.timing_sum[k] += v
        self.totals.merge(earlier.totals)
        for zone, n in earlier.occupancy_sum.items():
            self.occupancy_sum[zone] += n
        for zone, n in earlier.occupancy_max.items():
            self.occupancy_max[zone] = max(self.occupancy_max[zone], n)

    def zones(self, zone_ids: list[str]) -> dict[str, dict[str, float | int]]:
        """``{zone: {"avg", "max"}}``: occupancy per frame, and its peak."""
        n = max(self.frames, 1)
        return {z: {"avg": round(self.occupancy_sum[z] / n, 3), "max": self.occupancy_max[z]} for z in zone_ids}


class _Trail:
    """A track's recent bottom-centre anchors, with the step of each; it moves to the new id on an ID switch."""

    def __init__(self) -> None:
        keep = max(TRAIL_STEPS, SMOOTH_FRAMES)  # the most any rate smooths over
        self.anchors = RecentAnchors(keep)
        self.steps: deque[int] = deque(maxlen=keep)
        self.step = 0
        self.class_id = -1

    def add(self, step: int, xyxy: np.ndarray, class_id: int) -> None:
        self.anchors.add(anchor_point(xyxy))
        self.steps.append(step)
        self.step, self.class_id = step, class_id

    def predicted_anchor(self, step: int) -> tuple[float, float]:
        """Where the anchor would be at ``step`` at constant velocity, estimated robustly: the
        median speed over the trail's steps, from the median of the anchors each moved on to
        ``step``. A last box that jumped (the track took a neighbour's or a merged box just
        before it was hidden) would otherwise throw the prediction off for the whole gap."""
        pts, steps = list(self.anchors.points), list(self.steps)
        if len(pts) < 2:
            return pts[-1]
        moves = [((b[0] - a[0]) / (sb - sa), (b[1] - a[1]) / (sb - sa))
                 for a, b, sa, sb in zip(pts, pts[1:], steps, steps[1:])]
        vx, vy = np.median(moves, axis=0)
        x, y = np.median([(px + vx * (step - s), py + vy * (step - s)) for (px, py), s in zip(pts, steps)], axis=0)
        return float(x), float(y)


class CountingStage:
    """Tracker + line and zone counters for one camera's picture size."""

    def __init__(self, lines: list[LineConfig], zones: list[ZoneConfig], width: int, height: int,
                 class_names: list[str], *, fps: float, confidence: float):
        self.size = (width, height)
        self.names = class_names
        self.tracker = ByteTracker(high_thresh=confidence, low_thresh=min(LOW_SCORE_FLOOR, confidence),
                                   new_track_thresh=min(confidence + NEW_TRACK_MARGIN, 0.95),
                                   frame_rate=fps, lost_seconds=LOST_SECONDS, reach_heights_s=REACH_HEIGHTS_S)
        frames = confirm_frames(fps)
        self.smooth = smooth_frames(fps)
        self.lines = [LineCounter(line, width, height, min_frames=frames, margin=CONFIRM_MARGIN, smooth=self.smooth)
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
            bottom = anchor_point(t.xyxy)
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
            bottom = self._trails[t.track_id].anchors.mean(self.smooth)  # once for all lines
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

