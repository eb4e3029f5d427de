"""The benchmark's reference pipelines (scripts/count_floors.py) on synthetic annotations."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from edge_agent.vision.config import LineConfig
from edge_agent.vision.detect import Detections
from edge_agent.vision.stage import CountingStage

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "count_floors.py"
_spec = importlib.util.spec_from_file_location("count_floors", SCRIPT)
floors_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(floors_module)

W, H, FPS = 1000, 1000, 10.0
NAMES = ["person", "car"]
VERTICAL = LineConfig(id="v", points=[(0.5, 0.0), (0.5, 1.0)])


def walker(tid: int, frames: range, x0: float, dx: float, y: float = 600.0) -> dict:
    """One annotated person walking along x: {tid: [(frame, xyxy)]}, a 40x100 box."""
    return {tid: [(f, np.array([x0 + dx * k - 20, y - 100, x0 + dx * k + 20, y], float))
                  for k, f in enumerate(frames)]}


def detections_of(gt_frames, frames, extra=None, shift: float = 0.0) -> list[tuple[int, Detections]]:
    """Detections that are the annotated boxes moved by ``shift`` px, plus ``extra`` boxes per frame."""
    out = []
    for i in frames:
        boxes = [b + [shift, 0, shift, 0] for _, b in gt_frames.get(i, [])] + list(extra or [])
        n = len(boxes)
        out.append((i, Detections(np.array(boxes, np.float32).reshape(-1, 4), np.full(n, 0.9, np.float32),
                                  np.zeros(n, np.int32), {})))
    return out


def stage_factory(lines, width, height, names, fps, confidence):
    return CountingStage(lines, [], width, height, names, fps=fps, confidence=confidence)


def test_detections_take_the_identity_of_the_person_they_overlap() -> None:
    gt = floors_module.by_frame({**walker(1, range(10), 300, 40), **walker(2, range(10), 800, -40, y=300)})
    far_away = np.array([50.0, 50.0, 90.0, 150.0])  # overlaps nobody: a false positive, left out
    frames = detections_of(gt, range(10), extra=[far_away], shift=3.0)
    found = floors_module.identified(gt, frames, class_id=0)
    assert len(found) == 20
    assert {gid for _, gid, _ in found} == {1, 2}
    assert all(abs(box[0] - far_away[0]) > 1 for _, _, box in found)


def test_a_detection_that_barely_overlaps_is_not_identified() -> None:
    gt = floors_module.by_frame(walker(1, range(3), 300, 0))
    frames = detections_of(gt, range(3), shift=30.0)  # 40 px wide boxes 30 px apart: IoU 0.14
    assert floors_module.identified(gt, frames, class_id=0) == []


def test_perfect_identities_count_each_crossing_once_even_across_a_gap() -> None:
    """Person 1 crosses left to right; their detections are missing around the line (an occlusion
    the tracker would have to bridge); the oracle keeps the identity and counts the crossing once."""
    gt = floors_module.by_frame(walker(1, range(20), 200, 30))
    frames = [(i, d) for i, d in detections_of(gt, range(20)) if not 8 <= i <= 12]
    stage = stage_factory([VERTICAL], W, H, NAMES, FPS, 0.5)
    found = floors_module.identified(gt, frames, 0)
    counts = floors_module.oracle_counts(found, [i for i, _ in frames], stage, FPS, "person")
    assert counts == {"v": {"in": 0, "out": 1}}  # left -> right of a downward line is "out"


def test_the_oracle_reports_boxes_as_the_tracker_does() -> None:
    """A box that jumps for one frame moves the Kalman estimate only part of the way, as a track's."""
    kalman = floors_module.KalmanBoxes(list(range(5)))
    still = np.array([100.0, 100.0, 140.0, 200.0])
    for f in range(4):
        assert np.allclose(kalman.filtered(1, f, still), still, atol=1.0)
    jumped = kalman.filtered(1, 4, still + [30, 0, 30, 0])
    assert 100.0 + 1.0 < jumped[0] < 130.0 - 1.0


def test_floors_report_both_references_at_a_reduced_rate() -> None:
    gt_tracks = {**walker(1, range(0, 40), 200, 15), **walker(2, range(5, 45), 800, -15, y=350)}
    gt = floors_module.by_frame(gt_tracks)
    kept = list(range(0, 45, 3))  # every third frame
    frames = detections_of(gt, kept)

    def ours_on(frames, lines, size, src_fps, fps, names, confidence, factory):
        stage = factory(lines, *size, names, fps, confidence)
        crossings = [c for i, d in frames for c in stage.step(d, i, i / src_fps).crossings] + stage.finish()
        out = {x.id: {"in": 0, "out": 0} for x in lines}
        for c in crossings:
            out[c.line][c.direction] += 1
        return out

    result = floors_module.floors(gt, frames, [VERTICAL], (W, H), FPS, FPS / 3, NAMES, 0.5, stage_factory, ours_on)
    assert result["oracle"] == {"v": {"in": 1, "out": 1}}
    assert result["gt_boxes"] == {"v": {"in": 1, "out": 1}}
