"""Counting rules on synthetic tracks: direction, segment bounds, re-crossings, jitter, zones, totals."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.vision.config import LineConfig, ZoneConfig
from edge_agent.vision.count import (
    CounterStore,
    Crossing,
    LineCounter,
    RecentAnchors,
    Segment,
    ZoneCounter,
    anchor_point,
    points_in_polygon,
)
from edge_agent.vision.stage import (
    CONFIRM_MARGIN,
    SMOOTH_FRAMES,
    StepResult,
    StepTally,
    confirm_frames,
)

W, H = 1000, 1000


def box_at(x: float, y: float, w: float = 40, h: float = 100) -> np.ndarray:
    """A box whose bottom-centre anchor is at (x, y) pixels."""
    return np.array([x - w / 2, y - h, x + w / 2, y])


def line(points, min_frames: int = 3, **kw) -> LineCounter:
    return LineCounter(LineConfig(id="l", points=points, **kw), W, H, min_frames=min_frames)


def run_track(counter: LineCounter, anchors: list[tuple[float, float]], track_id: int = 1, end: bool = True):
    """Feed a track's anchors; returns the directions counted (with the track ending at the end)."""
    out = []
    for i, (x, y) in enumerate(anchors):
        if c := counter.observe(track_id, box_at(x, y), "person", i, i / 10):
            out.append(c.direction)
    if end and (c := counter.end_track(track_id)):
        out.append(c.direction)
    return out


def walk(x0: float, x1: float, y: float, steps: int) -> list[tuple[float, float]]:
    return [(x0 + (x1 - x0) * i / (steps - 1), y) for i in range(steps)]


def test_design_example_right_to_left_is_in():
    """DESIGN: for the vertical line 0.5,0 -> 0.5,1, moving from the right half to the left is `in`."""
    assert run_track(line(((0.5, 0.0), (0.5, 1.0))), walk(800, 200, 500, 10)) == ["in"]
    assert run_track(line(((0.5, 0.0), (0.5, 1.0))), walk(200, 800, 500, 10)) == ["out"]
    # Reversing the segment's direction swaps in and out.
    assert run_track(line(((0.5, 1.0), (0.5, 0.0))), walk(800, 200, 500, 10)) == ["out"]


def test_horizontal_line_left_to_right_segment():
    """P1 -> P2 pointing right (y down): its right-hand side on screen is below, so downwards is `in`."""
    seg = Segment((0, 500), (1000, 500))
    assert seg.crossing((300, 400), (300, 600)) == "in"
    assert seg.crossing((300, 600), (300, 400)) == "out"


def test_crossing_beyond_the_segment_end_does_not_count():
    counter = line(((0.5, 0.0), (0.5, 0.4)))  # only the top 40 % of the frame
    assert run_track(counter, walk(800, 200, 600, 10)) == []
    assert run_track(counter, walk(800, 200, 300, 10), track_id=2) == ["in"]


def test_step_that_jumps_over_the_segment_counts():
    """Consecutive observations far apart (a detector gap) still cross once."""
    counter = line(((0.5, 0.0), (0.5, 1.0)), min_frames=2)
    assert run_track(counter, [(900, 500), (910, 500), (100, 500), (90, 500)]) == ["in"]


def test_re_crossings_count_every_time():
    counter = line(((0.5, 0.0), (0.5, 1.0)))
    path = walk(800, 200, 500, 8) + walk(200, 800, 500, 8) + walk(800, 200, 500, 8)
    assert run_track(counter, path) == ["in", "out", "in"]


def production_line(points) -> LineCounter:
    """A counter with the debounce settings the pipeline uses at 10 fps."""
    return LineCounter(LineConfig(id="l", points=points), W, H, min_frames=confirm_frames(10), margin=CONFIRM_MARGIN,
                       smooth=SMOOTH_FRAMES)


def test_jitter_along_the_line_counts_nothing():
    """Walking along the line, the box bottom wobbling across it by less than the hysteresis margin."""
    counter = production_line(((0.0, 0.5), (1.0, 0.5)))
    rng = np.random.default_rng(1)
    amplitude = 0.9 * CONFIRM_MARGIN * 100  # box height 100
    path = [(50 + 10 * i, 500 + rng.choice([-1, 1]) * rng.uniform(0.2, 1.0) * amplitude) for i in range(90)]
    raw = sum(1 for a, b in zip(path, path[1:]) if counter.segment.crossing(a, b))
    assert raw > 20  # the raw rule would count dozens of crossings
    assert run_track(counter, path, end=False) == []


def test_larger_wobble_shorter_than_the_confirmation_counts_nothing():
    """Bigger excursions across the line that come back before confirm_frames frames."""
    counter = production_line(((0.0, 0.5), (1.0, 0.5)))
    n = confirm_frames(10) - 1
    offsets = ([-8] * 4 + [8] * n) * 8 + [-8] * 4
    path = [(50 + 10 * i, 500 + dy) for i, dy in enumerate(offsets)]
    assert run_track(counter, path, end=False) == []


def test_jitter_around_a_real_crossing_counts_once():
    counter = line(((0.5, 0.0), (0.5, 1.0)))
    xs = [700, 600, 520, 495, 505, 490, 506, 480, 400, 300, 200]  # wobbles at the line, then goes on
    assert run_track(counter, [(x, 500) for x in xs]) == ["in"]


def test_crossing_then_leaving_at_once_is_not_lost():
    """The track ends one frame after the crossing (left the picture): it still counts."""
    counter = line(((0.5, 0.0), (0.5, 1.0)), min_frames=5)
    assert run_track(counter, [(600, 500), (550, 500), (450, 500)]) == ["in"]


def test_going_round_the_segment_end_cancels_a_pending_crossing():
    counter = line(((0.5, 0.3), (0.5, 0.7)))
    # crosses the segment at y=500, then comes back below its end (y=800), where there is no segment
    path = [(600, 500), (450, 500), (450, 800), (600, 800)]
    assert run_track(counter, path) == []


def test_class_filter_and_per_class_direction():
    counter = LineCounter(LineConfig(id="door", points=((0.5, 0), (0.5, 1)), classes=["car"]), W, H)
    assert not counter.wants("person")
    assert counter.wants("car")


@settings(max_examples=60, deadline=None)
@given(x0=st.floats(0, 1000), y0=st.floats(0, 1000), x1=st.floats(0, 1000), y1=st.floats(0, 1000),
       steps=st.integers(6, 30))
def test_smooth_straight_walks_count_like_the_raw_rule(x0, y0, x1, y1, steps):
    """Without jitter the debounced counter agrees with the plain DESIGN rule, step by step."""
    counter = line(((0.2, 0.1), (0.7, 0.9)), min_frames=2)
    path = [(x0 + (x1 - x0) * i / (steps - 1), y0 + (y1 - y0) * i / (steps - 1)) for i in range(steps)]
    raw = [d for a, b in zip(path, path[1:]) if (d := counter.segment.crossing(a, b))]
    assert run_track(counter, path) == raw


def test_zone_occupancy_counts_anchors_inside_the_polygon():
    zone = ZoneCounter(ZoneConfig(id="z", polygon=[(0.1, 0.1), (0.5, 0.1), (0.5, 0.5), (0.1, 0.5)]), W, H)
    boxes = [(box_at(300, 300), "person"), (box_at(700, 300), "person"), (box_at(200, 450), "person"),
             (box_at(300, 600), "person")]
    assert zone.occupancy(boxes) == 2
    concave = np.array([[0, 0], [10, 0], [10, 10], [5, 2], [0, 10]], float)
    assert points_in_polygon(np.array([[5, 1], [5, 5], [1, 5]], float), concave).tolist() == [True, False, True]


def test_totals_survive_a_restart(tmp_path):
    store = CounterStore(tmp_path / "counts.json")
    counter = line(((0.5, 0.0), (0.5, 1.0)), min_frames=1)
    for c in [counter.observe(1, box_at(x, 500), "person", i, 0.0) for i, x in enumerate([900, 100])]:
        if c:
            store.totals.add(c)
    store.save()
    again = CounterStore(tmp_path / "counts.json")
    assert again.totals.as_dict(["l"])["l"] == {"in": 1, "out": 0, "by_class": {"person": {"in": 1, "out": 0}}}
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed into place


def test_a_corrupt_counter_file_is_kept_aside_and_counting_starts_at_zero(tmp_path, caplog):
    path = tmp_path / "counts.json"
    path.write_text('{"lines": {"l": {"in": {"person": 4')  # cut short by a crash
    with caplog.at_level(logging.ERROR):
        store = CounterStore(path)
    assert store.totals.as_dict(["l"])["l"]["in"] == 0
    assert (tmp_path / "counts.json.corrupt").read_text().startswith('{"lines"')  # evidence kept
    assert "unreadable" in caplog.text
    store.save()
    assert json.loads(path.read_text())["version"] == 1


@pytest.mark.parametrize("bad", ["x", "l:1,2,3", "l:a,b,c,d", "l:0.5,0,0.5,0", "l:0,0,2,1"])
def test_bad_line_arguments_are_refused_with_a_reason(bad):
    from edge_agent.vision.offline import UsageError, parse_line_arg

    with pytest.raises(UsageError, match="--line"):
        parse_line_arg(bad)


def test_production_settings_count_a_walk_across_that_ends_right_after_the_line():
    """Averaging delays the crossing; a track that ends two frames past the line still counts."""
    counter = production_line(((0.5, 0.0), (0.5, 1.0)))
    assert run_track(counter, [(x, 500) for x in (700, 660, 620, 580, 540, 470, 430)]) == ["in"]


def test_production_settings_ignore_a_standing_person_wobbling_on_the_line():
    """Someone standing on the line for 10 s, the box bottom jittering by 1.5 % of its height
    (the averaging and the margin absorb that; larger slow drifts can still count, see hs in bench_count)."""
    counter = production_line(((0.0, 0.5), (1.0, 0.5)))
    rng = np.random.default_rng(7)
    path = [(400 + rng.normal(0, 2), 500 + rng.normal(0, 1.5)) for _ in range(100)]
    assert sum(1 for a, b in zip(path, path[1:]) if counter.segment.crossing(a, b)) > 30  # raw rule: dozens
    assert run_track(counter, path, end=False) == []


# --- the shared definitions: anchors, smoothing, tallies ---------------------------------------

def test_anchor_points_of_a_box_as_array_or_list() -> None:
    box = [10.0, 20.0, 30.0, 60.0]
    assert anchor_point(np.array(box)) == anchor_point(box) == (20.0, 60.0)
    assert anchor_point(box, "center") == (20.0, 40.0) and anchor_point(box, "top_center") == (20.0, 20.0)


def test_recent_anchors_average_the_last_ones_kept() -> None:
    recent = RecentAnchors(keep=3)
    for x in (0.0, 3.0, 6.0, 9.0):
        recent.add((x, 2 * x))
    assert recent.mean() == (6.0, 12.0)  # 3, 6, 9: the first fell out
    assert recent.mean(last=2) == (7.5, 15.0) and recent.mean(last=10) == (6.0, 12.0)


def test_a_tally_absorbs_an_earlier_one_without_losing_counts() -> None:
    def tally(occupancy: int, crossings: int) -> StepTally:
        t = StepTally()
        t.add_step(StepResult([], [], {"z": occupancy}, tracking_ms=1.0), {"inference": 10.0})
        for i in range(crossings):
            t.add_crossing(Crossing("l", "in", "person", i, 0, 0.0))
        return t

    later, earlier = tally(occupancy=1, crossings=1), tally(occupancy=5, crossings=2)
    later.absorb(earlier)
    assert later.frames == 2 and later.timing_sum == {"inference": 20.0, "tracking": 2.0}
    assert later.totals.as_dict(["l"])["l"]["in"] == 3
    assert later.zones(["z"]) == {"z": {"avg": 3.0, "max": 5}}
    assert StepTally().zones(["z"]) == {"z": {"avg": 0.0, "max": 0}}


# --- counting at a low processing rate (frames in between are never seen) ------------------------

def stage_at(fps: float, lines: list[LineConfig]):
    from edge_agent.vision.detect import Detections
    from edge_agent.vision.stage import CountingStage

    stage = CountingStage(lines, [], W, H, ["person"], fps=fps, confidence=0.3)

    def step(anchors: list[tuple[float, float]], frame: int) -> list:
        boxes = np.array([box_at(x, y) for x, y in anchors], dtype=np.float32).reshape(-1, 4)
        dets = Detections(boxes, np.full(len(boxes), 0.9, np.float32), np.zeros(len(boxes), np.int64), {})
        return stage.step(dets, frame, frame / fps).crossings

    return stage, step


VERTICAL = LineConfig(id="v", points=((0.5, 0.1), (0.5, 0.9)))


@pytest.mark.parametrize("fps", [1.4, 2.5, 5.0])
def test_a_walker_crossing_between_two_processed_frames_counts_once(fps: float) -> None:
    """A brisk walker (1.2 box heights a second) seen at ``fps``: at 1.4 fps each processed frame
    finds them 0.86 box heights further on, past their last box; the crossing happens between
    two processed frames; they walk on and leave the picture."""
    stage, step = stage_at(fps, [VERTICAL])
    stride = int(100 * 1.2 / fps)
    crossings = [c for i, x in enumerate(range(150, 960, stride)) for c in step([(x, 600)], i)]
    crossings += stage.finish()
    assert [(c.line, c.direction) for c in crossings] == [("v", "out")]  # left to right of a downward line


def test_two_walkers_crossing_each_other_at_the_line_at_a_low_rate_count_one_each_way() -> None:
    stage, step = stage_at(2.0, [VERTICAL])
    crossings = []
    for i in range(12):
        crossings += step([(150 + 70 * i, 600), (850 - 70 * i, 680)], i)
    crossings += stage.finish()
    assert sorted(c.direction for c in crossings) == ["in", "out"]


def test_someone_lingering_on_the_line_at_a_low_rate_counts_once_per_real_crossing() -> None:
    """Standing on the line for 20 processed frames, the box bottom wobbling across it, then
    walking on: one crossing, not one per wobble."""
    stage, step = stage_at(2.0, [VERTICAL])
    rng = np.random.default_rng(3)
    path = [(150 + 70 * i, 600) for i in range(5)]  # walks up to the line
    path += [(500 + rng.normal(0, 3), 600 + rng.normal(0, 2)) for _ in range(20)]  # lingers on it
    path += [(500 + 70 * i, 600) for i in range(1, 7)]  # walks on, right
    crossings = [c for i, p in enumerate(path) for c in step([p], i)] + stage.finish()
    assert [c.direction for c in crossings] == ["out"]
