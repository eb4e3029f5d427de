"""Line crossing and zone occupancy by the DESIGN counting rules, with persisted totals.

A line is a directed segment P1 -> P2 in normalised coordinates. A track crosses it when the
step of its anchor between two consecutive observations intersects the segment; ``in`` goes
from the left-hand side of P1 -> P2 to its right-hand side as seen on screen (y down).

Detector jitter makes a box wobble across a line, most of all on lines that run along a
walking path. The anchor is therefore the mean of a track's last few raw anchors, and a crossing
is only *pending* until the track has been seen on the new
side ``min_frames`` times in a row and has got at least ``margin`` box heights away from the
line there (hysteresis); stepping back across the segment first cancels it (the wobble counted
neither way). A track that ends while a crossing is pending still counts it, so a person who
crosses and leaves the picture at once is never lost.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

import numpy as np

from edge_agent.common.files import atomic_write
from edge_agent.vision.config import LineConfig, ZoneConfig

log = logging.getLogger(__name__)

AnchorKind = Literal["bottom_center", "center", "top_center"]
Direction = Literal["in", "out"]


def anchor_point(xyxy, kind: AnchorKind = "bottom_center") -> tuple[float, float]:
    """The anchor of a box given as an array or, cheaper per call, a list of floats: the one
    definition the line counters, the zone counters and the stage's ID-switch repair share."""
    x1, y1, x2, y2 = xyxy.tolist() if isinstance(xyxy, np.ndarray) else xyxy
    if kind == "bottom_center":  # the default: no other anchor computed on the hot path
        return (x1 + x2) / 2, y2
    return (x1 + x2) / 2, (y1 + y2) / 2 if kind == "center" else y1


class RecentAnchors:
    """A track's last few anchors and their mean, which damps detector jitter (and delays a
    crossing slightly): the one smoothing both the stage and a line counter on its own use."""

    def __init__(self, keep: int):
        self.points: deque[tuple[float, float]] = deque(maxlen=keep)

    def add(self, pt: tuple[float, float]) -> None:
        self.points.append(pt)

    def mean(self, last: int | None = None) -> tuple[float, float]:
        """The mean of the last ``last`` anchors (all kept ones by default). Plain loops: this
        runs per track, line and frame, where generator sums cost more than the arithmetic."""
        pts = self.points if last is None or last >= len(self.points) else list(self.points)[-last:]
        sx = sy = 0.0
        for x, y in pts:
            sx += x
            sy += y
        return sx / len(pts), sy / len(pts)


class Segment:
    """A directed segment in pixels; ``side`` > 0 is its right-hand side on screen (y down)."""

    def __init__(self, p1: tuple[float, float], p2: tuple[float, float]):
        # Plain floats: this runs per track, line and frame, where numpy scalars cost more than math.
        self.p1 = (float(p1[0]), float(p1[1]))
        self.d = (float(p2[0]) - self.p1[0], float(p2[1]) - self.p1[1])
        self.length = float(np.hypot(*self.d))

    @classmethod
    def from_normalised(cls, points: tuple, width: int, height: int) -> "Segment":
        (x1, y1), (x2, y2) = points
        return cls((x1 * width, y1 * height), (x2 * width, y2 * height))

    def cross(self, pt: tuple[float, float]) -> float:
        """z of d x (pt - p1): positive on the right-hand side as seen on screen (y down)."""
        return self.d[0] * (pt[1] - self.p1[1]) - self.d[1] * (pt[0] - self.p1[0])

    def distance(self, pt: tuple[float, float]) -> float:
        """Signed distance from the infinite line, in pixels (positive on the right-hand side)."""
        return self.cross(pt) / self.length

    def side(self, pt: tuple[float, float]) -> int:
        """+1 right-hand side, -1 left-hand side; a point on the line counts as left."""
        return 1 if self.cross(pt) > 0 else -1

    def crossing(self, a: tuple[float, float], b: tuple[float, float]) -> Direction | None:
        """The direction in which the step a -> b crosses the segment, or None."""
        ca, cb = self.cross(a), self.cross(b)
        if (ca > 0) == (cb > 0):
            return None
        f = ca / (ca - cb)  # where the step meets the infinite line
        hx, hy = a[0] + (b[0] - a[0]) * f - self.p1[0], a[1] + (b[1] - a[1]) * f - self.p1[1]
        t = (hx * self.d[0] + hy * self.d[1]) / (self.d[0] ** 2 + self.d[1] ** 2)  # along the segment
        if t < 0.0 or t > 1.0:
            return None
        return "in" if cb > 0 else "out"


@dataclass(frozen=True)
class Crossing:
    line: str
    direction: Direction
    class_name: str
    track_id: int
    frame: int  # the frame of the step that crossed (not the frame that confirmed it)
    ts: float


@dataclass
class _TrackOnLine:
    last: tuple[float, float]
    class_name: str
    recent: RecentAnchors  # the last raw anchors, when the line smooths them itself
    pending: Direction | None = None
    pending_frame: int = 0
    pending_ts: float = 0.0
    seen_on_new_side: int = 0
    depth: float = 0.0  # furthest the anchor got past the line since the pending crossing, in box heights


class LineCounter:
    """Debounced crossings of one line by many tracks."""

    def __init__(self, line: LineConfig, width: int, height: int, *, min_frames: int = 3, margin: float = 0.0,
                 smooth: int = 1):
        self.id = line.id
        self.anchor: AnchorKind = line.anchor
        self.classes = set(line.classes) if line.classes else None
        self.segment = Segment.from_normalised(line.points, width, height)
        self.min_frames = max(1, min_frames)
        self.margin = margin
        self.smooth = max(1, smooth)
        self.tracks: dict[int, _TrackOnLine] = {}

    def wants(self, class_name: str) -> bool:
        return self.classes is None or class_name in self.classes

    def observe(self, track_id: int, xyxy, class_name: str, frame: int, ts: float,
                smoothed: tuple[float, float] | None = None) -> Crossing | None:
        """One observation of a track; returns a crossing once it is confirmed.

        ``smoothed``: the track's anchor already averaged over its last ``smooth`` observations,
        when the caller keeps that once for all its lines (the same for every line).
        """
        raw = anchor_point(xyxy, self.anchor) if smoothed is None else smoothed
        box_h = max(xyxy[3] - xyxy[1], 1.0)
        st = self.tracks.get(track_id)
        if st is None:
            self.tracks[track_id] = st = _TrackOnLine(raw, class_name, RecentAnchors(self.smooth))
            st.recent.add(raw)
            return None
        if smoothed is None:
            st.recent.add(raw)
            pt = st.recent.mean()
        else:
            pt = smoothed
        direction = self.segment.crossing(st.last, pt)
        st.last, st.class_name = pt, class_name
        if direction is not None:
            if st.pending is not None and direction != st.pending:
                st.pending = None  # back across before it settled: jitter, counts neither way
            elif st.pending is None:
                st.pending, st.pending_frame, st.pending_ts, st.seen_on_new_side = direction, frame, ts, 1
                st.depth = 0.0
        elif st.pending is not None:
            if self.segment.side(pt) == (1 if st.pending == "in" else -1):
                st.seen_on_new_side += 1
            else:
                st.pending = None  # went back round the end of the segment
        if st.pending is not None:
            past = self.segment.distance(pt) * (1 if st.pending == "in" else -1) / box_h
            st.depth = max(st.depth, past)
        if st.pending is not None and st.seen_on_new_side >= self.min_frames and st.depth >= self.margin:
            return self._confirm(track_id, st)
        return None

    def _confirm(self, track_id: int, st: _TrackOnLine) -> Crossing:
        crossing = Crossing(self.id, st.pending, st.class_name, track_id, st.pending_frame, st.pending_ts)
        st.pending = None
        return crossing

    def hand_over(self, old_id: int, new_id: int) -> None:
        """``new_id`` is ``old_id`` under a new name (an ID switch): it continues its state."""
        if old_id in self.tracks:
            self.tracks[new_id] = self.tracks.pop(old_id)

    def end_track(self, track_id: int) -> Crossing | None:
        """The track is gone: a crossing still pending was real (it left on the new side)."""
        st = self.tracks.pop(track_id, None)
        if st is not None and st.pending is not None:
            return self._confirm(track_id, st)
        return None

    def end_all(self) -> list[Crossing]:
        return [c for tid in list(self.tracks) if (c := self.end_track(tid)) is not None]


def points_in_polygon(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd rule, vectorised over points (N, 2) for one polygon (M, 2)."""
    if len(points) == 0:
        return np.zeros(0, dtype=bool)
    x, y = points[:, 0:1], points[:, 1:2]
    xa, ya = polygon[:, 0], polygon[:, 1]
    xb, yb = np.roll(xa, -1), np.roll(ya, -1)
    straddles = (ya > y) != (yb > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at_y = xa + (y - ya) * (xb - xa) / (yb - ya)
    return np.count_nonzero(straddles & (x < x_at_y), axis=1) % 2 == 1


class ZoneCounter:
    """Occupancy of one polygon: tracked anchors inside it, per frame."""

    def __init__(self, zone: ZoneConfig, width: int, height: int):
        self.id = zone.id
        self.anchor: AnchorKind = zone.anchor
        self.classes = set(zone.classes) if zone.classes else None
        self.max_occupancy = zone.max_occupancy
        self.polygon = np.array(zone.polygon, dtype=float) * [width, height]

    def occupancy(self, boxes: Iterable[tuple[np.ndarray, str]]) -> int:
        pts = [anchor_point(b, self.anchor) for b, cls in boxes if self.classes is None or cls in self.classes]
        return int(points_in_polygon(np.array(pts, dtype=float).reshape(-1, 2), self.polygon).sum())


# --- totals ----------------------------------------------------------------------------------

def _nested() -> defaultdict:
    return defaultdict(lambda: {"in": defaultdict(int), "out": defaultdict(int)})


class LineTotals:
    """Counts per line, direction and class."""

    def __init__(self, data: dict | None = None):
        self.lines: defaultdict = _nested()
        for line, dirs in (data or {}).items():
            for direction in ("in", "out"):
                for cls, n in dirs.get(direction, {}).items():
                    self.lines[line][direction][cls] = int(n)

    def add(self, c: Crossing) -> None:
        self.lines[c.line][c.direction][c.class_name] += 1

    def merge(self, other: "LineTotals") -> None:
        """Add ``other``'s counts to these."""
        for line, dirs in other.lines.items():
            for direction, classes in dirs.items():
                for cls, n in classes.items():
                    self.lines[line][direction][cls] += n

    def as_dict(self, line_ids: Iterable[str] = ()) -> dict:
        """``{line: {"in", "out", "by_class": {cls: {"in", "out"}}}}``; listed lines appear even at zero."""
        out = {}
        for line in list(dict.fromkeys([*line_ids, *self.lines])):
            dirs = self.lines[line]
            classes = sorted(set(dirs["in"]) | set(dirs["out"]))
            out[line] = {"in": sum(dirs["in"].values()), "out": sum(dirs["out"].values()),
                         "by_class": {c: {"in": dirs["in"].get(c, 0), "out": dirs["out"].get(c, 0)}
                                      for c in classes}}
        return out

    def raw(self) -> dict:
        return {line: {d: dict(v) for d, v in dirs.items()} for line, dirs in self.lines.items()}


class CounterStore:
    """Cumulative totals of one camera in a small JSON file, replaced atomically on save."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.totals = LineTotals(self._load())

    def _load(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return data.get("lines", {}) if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            # Keep the unreadable file for a human instead of overwriting the evidence.
            bad = self.path.with_suffix(self.path.suffix + ".corrupt")
            os.replace(self.path, bad)
            log.error("counter file %s unreadable (%s); kept as %s, starting at zero",
                                              self.path, e, bad)
            return {}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps({"version": 1, "lines": self.totals.raw()}).encode())
