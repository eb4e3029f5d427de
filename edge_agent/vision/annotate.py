"""The counting overlay: what a camera counts, drawn on its frame.

One renderer for every view (``edge-agent count --annotate``, the agent's snapshot, MJPEG and
page): lines with an arrow to their ``in`` side and their running counts, zones with their
occupancy, tracked boxes with id and class. OpenCV drawing on one copy of the frame; it runs
per frame, so nothing here allocates another full-size image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from edge_agent.vision.config import LineConfig, ZoneConfig
from edge_agent.vision.track import TrackedObject

FONT = cv2.FONT_HERSHEY_SIMPLEX
# BGR. Lines cycle through these from the first, zones from the last; a zone over its max_occupancy turns ALERT.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 215, 255), (255, 191, 0), (60, 220, 60), (255, 0, 255), (0, 140, 255), (255, 255, 0))
ALERT = (0, 0, 255)
TEXT = (255, 255, 255)
LABEL_BG = (32, 32, 32)
ZONE_FILL_ALPHA = 0.18
# The sizes below are for a frame whose short side is REFERENCE_SIDE pixels; they scale with it.
REFERENCE_SIDE = 480


@dataclass(frozen=True)
class _Style:
    """Thickness and font size for one frame size: readable on 640x480 and on 1920x1080 alike."""

    unit: float
    thickness: int
    font_scale: float
    font_thickness: int
    pad: int
    arrow: int  # the direction arrow's length in pixels

    @classmethod
    def for_size(cls, width: int, height: int) -> "_Style":
        unit = max(0.5, min(width, height) / REFERENCE_SIDE)
        return cls(unit=unit, thickness=max(1, round(2 * unit)), font_scale=0.5 * unit,
                   font_thickness=max(1, round(unit)), pad=max(2, round(3 * unit)), arrow=max(12, round(40 * unit)))


def annotate(image: np.ndarray, *, lines: Sequence[LineConfig], zones: Sequence[ZoneConfig],
             tracks: Sequence[TrackedObject], class_names: Sequence[str],
             line_counts: Mapping[str, Mapping[str, Any]], occupancy: Mapping[str, int]) -> np.ndarray:
    """A new BGR image (the input is not modified, same size) with the overlay drawn.

    ``line_counts``: ``{line_id: {"in": n, "out": m, ...}}`` as ``LineTotals.as_dict`` gives it (a
    line missing from it draws as in 0 / out 0); ``occupancy``: ``{zone_id: n}`` of this frame.
    """
    out = image.copy()
    height, width = out.shape[:2]
    style = _Style.for_size(width, height)
    labels: list[_Label] = []
    # Zones first (their fill is underneath), then boxes, then lines; every label on top of all
    # drawing, the lines' last: a box never hides a count.
    for i, zone in enumerate(zones):
        labels.append(_draw_zone(out, zone, occupancy.get(zone.id, 0), PALETTE[-1 - i % len(PALETTE)], style))
    track_labels = [_draw_track(out, t, _class_name(class_names, t.class_id), style) for t in tracks]
    line_labels = [_draw_line(out, line, line_counts.get(line.id, {}), PALETTE[i % len(PALETTE)], style)
                   for i, line in enumerate(lines)]
    for label in (*track_labels, *labels, *line_labels):
        label.draw(out, style)
    return out


def _class_name(names: Sequence[str], class_id: int) -> str:
    return names[class_id] if 0 <= class_id < len(names) else str(class_id)


def _pixels(points: Sequence[tuple[float, float]], width: int, height: int) -> np.ndarray:
    """Normalised (x, y) points as int32 pixels, scaled as the counters scale them (count.py), kept
    on the image so that a line along an edge (x = 1.0) is still drawn."""
    pts = np.rint(np.asarray(points, dtype=float) * [width, height])
    return np.clip(pts, 0, [width - 1, height - 1]).astype(np.int32)


def in_direction(p1: tuple[float, float], p2: tuple[float, float]) -> tuple[float, float]:
    """The unit normal of P1 -> P2 that points to its right-hand side as seen on screen (y down):
    where a track that crosses ``in`` goes (count.py's ``Segment.side`` > 0)."""
    dx, dy = p2[0] - p1[0], p2[1] - p1[1]
    length = float(np.hypot(dx, dy)) or 1.0
    return -dy / length, dx / length


def _draw_line(img: np.ndarray, line: LineConfig, counts: Mapping[str, Any], color: tuple[int, int, int],
               style: _Style) -> _Label:
    height, width = img.shape[:2]
    (x1, y1), (x2, y2) = (tuple(p) for p in _pixels(line.points, width, height).tolist())
    cv2.line(img, (x1, y1), (x2, y2), color, style.thickness, cv2.LINE_AA)
    for end in ((x1, y1), (x2, y2)):
        cv2.circle(img, end, style.thickness + 1, color, -1, cv2.LINE_AA)
    nx, ny = in_direction((x1, y1), (x2, y2))
    mid = ((x1 + x2) / 2, (y1 + y2) / 2)
    tip = (round(mid[0] + nx * style.arrow), round(mid[1] + ny * style.arrow))
    cv2.arrowedLine(img, (round(mid[0]), round(mid[1])), tip, color, style.thickness, cv2.LINE_AA, tipLength=0.35)
    text = f"{line.id}  in {int(counts.get('in', 0))} / out {int(counts.get('out', 0))}"
    # The label sits wholly on the other side of the line from the arrow, so the two never overlap.
    bw, bh, _ = _label_size(text, style)
    away = style.pad + abs(nx) * bw / 2 + abs(ny) * bh / 2
    return _Label(text, (mid[0] - nx * away - bw / 2, mid[1] - ny * away - bh / 2), color)


def _draw_zone(img: np.ndarray, zone: ZoneConfig, count: int, color: tuple[int, int, int], style: _Style) -> _Label:
    height, width = img.shape[:2]
    poly = _pixels(zone.polygon, width, height)
    over = zone.max_occupancy is not None and count > zone.max_occupancy
    if over:
        color = ALERT
    _fill_translucent(img, poly, color)
    cv2.polylines(img, [poly], True, color, style.thickness, cv2.LINE_AA)
    text = f"{zone.id}: {count}" + (f"/{zone.max_occupancy}" if zone.max_occupancy is not None else "")
    if over:
        text += " OVER"
    x, y = poly[:, 0].min(), poly[:, 1].min()
    return _Label(text, (float(x) + style.pad, float(y) + style.pad), color, ALERT if over else LABEL_BG)


def _fill_translucent(img: np.ndarray, poly: np.ndarray, color: tuple[int, int, int]) -> None:
    """Blend the polygon's colour in, within its bounding box only (cheap for a small zone)."""
    x, y, w, h = cv2.boundingRect(poly)
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + w, img.shape[1]), min(y + h, img.shape[0])
    if x1 <= x0 or y1 <= y0:
        return
    roi = img[y0:y1, x0:x1]
    filled = roi.copy()
    cv2.fillPoly(filled, [poly - [x0, y0]], color)
    # Outside the polygon filled == roi, so the blend leaves those pixels as they were.
    roi[:] = cv2.addWeighted(filled, ZONE_FILL_ALPHA, roi, 1 - ZONE_FILL_ALPHA, 0)


def _draw_track(img: np.ndarray, t: TrackedObject, class_name: str, style: _Style) -> _Label:
    x1, y1, x2, y2 = (int(round(v)) for v in np.asarray(t.xyxy, dtype=float).tolist())
    color = _track_color(t.track_id)
    cv2.rectangle(img, (x1, y1), (x2, y2), color, style.thickness)
    text = f"#{t.track_id} {class_name}"
    return _Label(text, (float(x1), float(y1) - _label_size(text, style)[1]), color)  # above the box


def _track_color(track_id: int) -> tuple[int, int, int]:
    """A stable, bright colour per track id (golden-ratio hue steps keep neighbours apart)."""
    hue = int((track_id * 0.618034 % 1.0) * 179)
    bgr = cv2.cvtColor(np.uint8([[[hue, 200, 255]]]), cv2.COLOR_HSV2BGR)[0, 0]
    return int(bgr[0]), int(bgr[1]), int(bgr[2])


def _label_size(text: str, style: _Style) -> tuple[int, int, int]:
    """Width and height of a label's box, and the text's baseline height above the box's bottom."""
    (tw, th), base = cv2.getTextSize(text, FONT, style.font_scale, style.font_thickness)
    return tw + 2 * style.pad, th + base + 2 * style.pad, base + style.pad


@dataclass(frozen=True)
class _Label:
    """Text on a filled box edged in ``color``; ``at`` is the box's top-left corner."""

    text: str
    at: tuple[float, float]
    color: tuple[int, int, int]
    background: tuple[int, int, int] = LABEL_BG

    def draw(self, img: np.ndarray, style: _Style) -> None:
        """Drawn where asked, moved inside the image where it would leave it."""
        bw, bh, baseline = _label_size(self.text, style)
        height, width = img.shape[:2]
        x = int(min(max(self.at[0], 0), max(width - bw, 0)))
        y = int(min(max(self.at[1], 0), max(height - bh, 0)))
        cv2.rectangle(img, (x, y), (x + bw - 1, y + bh - 1), self.background, -1)
        cv2.rectangle(img, (x, y), (x + bw - 1, y + bh - 1), self.color, 1)
        cv2.putText(img, self.text, (x + style.pad, y + bh - baseline), FONT, style.font_scale, TEXT,
                    style.font_thickness, cv2.LINE_AA)
