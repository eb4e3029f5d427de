"""The counting overlay on synthetic frames: where lines, their `in` arrows, zones and boxes are drawn."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.vision.annotate import ALERT, PALETTE, annotate
from edge_agent.vision.config import LineConfig, ZoneConfig
from edge_agent.vision.count import Segment
from edge_agent.vision.track import TrackedObject

GREY = 90


def frame(width: int = 640, height: int = 480) -> np.ndarray:
    return np.full((height, width, 3), GREY, np.uint8)


def draw(image: np.ndarray, *, lines=(), zones=(), tracks=(), line_counts=None, occupancy=None) -> np.ndarray:
    return annotate(image, lines=list(lines), zones=list(zones), tracks=list(tracks), class_names=["person", "car"],
                    line_counts=line_counts or {}, occupancy=occupancy or {})


def changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per pixel: does it differ between the two images?"""
    return np.abs(a.astype(int) - b.astype(int)).max(axis=2) > 0


def close_to(pixel: np.ndarray, color: tuple[int, int, int], tol: int = 60) -> bool:
    return int(np.abs(pixel.astype(int) - np.array(color)).max()) <= tol


def test_a_new_image_of_the_same_shape_and_the_input_untouched() -> None:
    image = frame()
    before = image.copy()
    out = draw(image, lines=[LineConfig(id="v", points=((0.5, 0.1), (0.5, 0.9)))],
               zones=[ZoneConfig(id="z", polygon=[(0.1, 0.1), (0.4, 0.1), (0.4, 0.4)])],
               tracks=[TrackedObject(3, np.array([100, 100, 200, 300], np.float32), 0.9, 0)])
    assert out.shape == image.shape and out.dtype == np.uint8 and out is not image
    assert np.array_equal(image, before)
    assert changed(out, image).any()


@pytest.mark.parametrize("size", [(640, 480), (1920, 1080)])
@pytest.mark.parametrize("points", [((0.5, 0.1), (0.5, 0.9)), ((0.1, 0.3), (0.9, 0.7)), ((0.8, 0.5), (0.2, 0.5))])
def test_the_line_is_drawn_where_the_config_puts_it(points, size) -> None:
    width, height = size
    image = frame(width, height)
    out = draw(image, lines=[LineConfig(id="door", points=points)])
    diff = changed(out, image)
    (x1, y1), (x2, y2) = points
    for k in (0.05, 0.2, 0.3, 0.7, 0.8, 0.95):  # away from the middle, where the arrow and label are
        x, y = round((x1 + (x2 - x1) * k) * width), round((y1 + (y2 - y1) * k) * height)
        assert diff[y, x], (k, x, y)
    assert not diff[round(0.02 * height), round(0.02 * width)]  # nothing drawn far from it


@pytest.mark.parametrize("points", [
    ((0.5, 0.2), (0.5, 0.8)),  # downwards: `in` is to the screen's left
    ((0.5, 0.8), (0.5, 0.2)),  # upwards: to the right
    ((0.2, 0.5), (0.8, 0.5)),  # rightwards: downwards
    ((0.8, 0.5), (0.2, 0.5)),  # leftwards: upwards
])
def test_the_arrow_points_to_the_side_a_track_crossing_in_goes_to(points) -> None:
    width, height = 640, 480
    image = frame(width, height)
    out = draw(image, lines=[LineConfig(id="l", points=points)])
    seg = Segment.from_normalised(points, width, height)  # the counters' geometry, not the renderer's
    (x1, y1), (x2, y2) = ((x * width, y * height) for x, y in points)
    mid = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
    normal = np.array([y2 - y1, x1 - x2]) / np.hypot(x2 - x1, y2 - y1)  # one of the two perpendiculars
    a, b = mid + normal * 18, mid - normal * 18
    in_side, out_side = (a, b) if seg.side(tuple(a)) > 0 else (b, a)
    assert seg.side(tuple(in_side)) == 1  # where a track that counted `in` now is
    px_in = out[round(in_side[1]), round(in_side[0])]
    px_out = out[round(out_side[1]), round(out_side[0])]
    assert close_to(px_in, PALETTE[0]), px_in  # the arrow's shaft, in the line's colour
    assert not close_to(px_out, PALETTE[0]), px_out  # no arrow mirrored on the other side


def test_a_line_missing_from_the_counts_draws_as_zero_and_counts_change_the_label() -> None:
    image, line = frame(), LineConfig(id="v", points=((0.5, 0.1), (0.5, 0.9)))
    missing = draw(image, lines=[line], line_counts={})
    zeros = draw(image, lines=[line], line_counts={"v": {"in": 0, "out": 0, "by_class": {}}})
    counted = draw(image, lines=[line], line_counts={"v": {"in": 17, "out": 13, "by_class": {}}})
    assert np.array_equal(missing, zeros)
    assert changed(zeros, counted).any()


def test_boxes_are_drawn_where_the_tracks_are() -> None:
    image = frame()
    x1, y1, x2, y2 = 300, 200, 400, 420
    out = draw(image, tracks=[TrackedObject(7, np.array([x1, y1, x2, y2], np.float32), 0.8, 1)])
    diff = changed(out, image)
    for x, y in ((x1, 300), (x2, 300), (350, y2), (350, y1)):  # the four edges
        assert diff[y, x], (x, y)
    assert not diff[310, 350]  # the box is not filled
    assert diff[y1 - 8, x1 + 10]  # the "#7 car" label sits above it
    assert not diff[100, 100] and not diff[y2 + 30, x2 + 30]


def test_a_zone_is_outlined_tinted_and_turns_red_over_its_maximum() -> None:
    image = frame()
    zone = ZoneConfig(id="queue", polygon=[(0.25, 0.25), (0.75, 0.25), (0.75, 0.75), (0.25, 0.75)], max_occupancy=2)
    under = draw(image, zones=[zone], occupancy={"queue": 2})
    over = draw(image, zones=[zone], occupancy={"queue": 3})
    assert changed(under, image)[240, 160]  # the left edge (x = 0.25 * 640)
    assert changed(under, image)[300, 320]  # translucent fill inside
    assert not changed(under, image)[60, 60]  # nothing outside
    assert close_to(over[360, 160], ALERT) and not close_to(under[360, 160], ALERT)


def test_thickness_and_text_grow_with_the_picture() -> None:
    line = LineConfig(id="v", points=((0.5, 0.0), (0.5, 1.0)))

    def line_width(width: int, height: int) -> int:
        image = frame(width, height)
        return int(changed(draw(image, lines=[line]), image)[height // 5].sum())  # a row away from the label

    assert line_width(1920, 1080) > line_width(640, 480) >= 2


def test_shapes_at_and_past_the_edges_are_drawn_without_error() -> None:
    image = frame(320, 240)
    out = draw(image, lines=[LineConfig(id="edge", points=((1.0, 0.0), (1.0, 1.0)))],
               zones=[ZoneConfig(id="all", polygon=[(0, 0), (1, 0), (1, 1), (0, 1)])],
               tracks=[TrackedObject(1, np.array([-40, -30, 60, 500], np.float32), 0.9, 0),
                       TrackedObject(2, np.array([300, 200, 330, 260], np.float32), 0.9, 5)])  # unknown class id
    assert out.shape == image.shape
    assert changed(out, image)[60, 319]  # the line along the right edge is on the last column
