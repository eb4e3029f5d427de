"""Where counting error comes from: two reference pipelines for ``bench_count.py --sweep``.

Both count on exactly the frames the sweep keeps at a rate, with our line counters' rules (smoothing,
debounce, hysteresis), so their error beside ours tells which part to work on:

- ``oracle``: our detections, each given the identity of the annotated person it overlaps (IoU >= 0.5,
  one-to-one per frame), smoothed by our tracker's Kalman filter per identity and fed to our line
  counters: our pipeline with association made perfect, i.e. what a perfect tracker would count
  with this detector. Detections that overlap no annotated person are left out (false positives
  and people the annotation lacks), and a person keeps their line state across any gap, which no
  online tracker can know: it is a floor, not a reachable target.
- ``gt_boxes``: the annotated boxes themselves as detections (score 1) through our whole stage,
  tracker included. What our tracker and counter make of a perfect detector.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

from edge_agent.vision.config import LineConfig
from edge_agent.vision.count import RecentAnchors, anchor_point
from edge_agent.vision.detect import Detections
from edge_agent.vision.track import (
    assign,
    iou_matrix,
    kalman_initiate,
    kalman_predict,
    kalman_update,
    xyah_to_xyxy,
    xyxy_to_xyah,
)

# A detection stands for an annotated person when they overlap this much (MOTChallenge's own threshold).
MATCH_IOU = 0.5

GtFrames = dict[int, list[tuple[int, np.ndarray]]]  # video frame -> [(gt id, xyxy)]


def by_frame(gt_tracks: dict[int, list[tuple[int, np.ndarray]]]) -> GtFrames:
    """``load_gt``'s track id -> [(frame, xyxy)] turned into frame -> [(track id, xyxy)]."""
    frames: GtFrames = defaultdict(list)
    for tid, observations in gt_tracks.items():
        for frame, box in observations:
            frames[frame].append((tid, box))
    return frames


def gt_box_frames(gt: GtFrames, kept: list[int], class_id: int) -> list[tuple[int, Detections]]:
    """The annotated boxes of the kept frames as detections of ``class_id`` with score 1."""
    out = []
    for i in kept:
        boxes = np.array([b for _, b in gt.get(i, [])], np.float32).reshape(-1, 4)
        n = len(boxes)
        out.append((i, Detections(boxes, np.ones(n, np.float32), np.full(n, class_id, np.int32), {})))
    return out


def identified(gt: GtFrames, frames: list[tuple[int, Detections]], class_id: int
               ) -> list[tuple[int, int, np.ndarray]]:
    """(frame, gt id, detection box) for every detection of ``class_id`` matched to an annotated person."""
    out = []
    for i, dets in frames:
        people = gt.get(i, [])
        mine = np.flatnonzero(dets.class_ids == class_id)
        if not people or not len(mine):
            continue
        iou = iou_matrix(np.array([b for _, b in people]), dets.xyxy[mine])
        pairs, _, _ = assign(1.0 - iou, 1.0 - MATCH_IOU)
        out.extend((i, people[p][0], dets.xyxy[mine[d]]) for p, d in pairs if iou[p, d] >= MATCH_IOU)
    return out


class KalmanBoxes:
    """Each identity's box as our tracker reports a track's: its Kalman estimate after the
    observation, predicted once per processed frame in between (the tracker's own filter)."""

    def __init__(self, kept: list[int], dt: float = 1.0):
        self.step_of = {frame: k for k, frame in enumerate(kept)}
        self.dt = dt  # the tracker's time step (track.step_frames of the processing rate)
        self.state: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}  # id -> mean, cov, step

    def filtered(self, gid: int, frame: int, box: np.ndarray) -> np.ndarray:
        step = self.step_of[frame]
        if gid not in self.state:
            mean, cov = kalman_initiate(xyxy_to_xyah(box), self.dt)
        else:
            mean, cov, last = self.state[gid]
            means, covs = mean[None], cov[None]
            for _ in range(step - last):
                means, covs = kalman_predict(means, covs, self.dt)
            means, covs = kalman_update(means, covs, xyxy_to_xyah(box)[None])
            mean, cov = means[0], covs[0]
        self.state[gid] = (mean, cov, step)
        return xyah_to_xyxy(mean[:4])


def oracle_counts(observations: list[tuple[int, int, np.ndarray]], kept: list[int], stage: Any, src_fps: float,
                  class_name: str) -> dict[str, dict[str, int]]:
    """Counts of ``stage``'s line counters (built for the rate at hand) fed with identified detections
    of the processed frames ``kept``, each identity's box filtered and its anchor smoothed as the
    stage does a track's."""
    counts = {line.id: {"in": 0, "out": 0} for line in stage.lines}
    recent: dict[int, RecentAnchors] = {}
    kalman = KalmanBoxes(kept, stage.tracker.dt)
    for frame, gid, raw in observations:
        box = kalman.filtered(gid, frame, raw)
        anchors = recent.setdefault(gid, RecentAnchors(stage.smooth))
        anchors.add(anchor_point(box))
        for line in stage.lines:
            smoothed = anchors.mean() if line.anchor == "bottom_center" else None
            if c := line.observe(gid, box.tolist(), class_name, frame, frame / src_fps, smoothed):
                counts[c.line][c.direction] += 1
    for line in stage.lines:
        for c in line.end_all():
            counts[c.line][c.direction] += 1
    return counts


def floors(gt: GtFrames, frames: list[tuple[int, Detections]], lines: list[LineConfig], size: tuple[int, int],
           src_fps: float, fps: float, names: list[str], confidence: float, factory: Callable[..., Any],
           ours_on: Callable[..., dict]) -> dict[str, dict]:
    """``{"oracle": counts, "gt_boxes": counts}`` at one rate (``ours_on``: bench_count's runner)."""
    person = names.index("person")
    stage = factory(lines, *size, names, fps, confidence)
    kept = [i for i, _ in frames]
    oracle = oracle_counts(identified(gt, frames, person), kept, stage, src_fps, "person")
    boxes = gt_box_frames(gt, kept, person)
    return {"oracle": oracle, "gt_boxes": ours_on(boxes, lines, size, src_fps, fps, names, confidence, factory)}
