"""A ByteTrack-class multi-object tracker: Kalman motion, two-stage IoU association, and reach.

Written here because the packaged trackers pull heavy dependencies onto an edge box
(``trackers`` needs supervision and full opencv-python, ``boxmot`` needs torch). It follows
the ByteTrack paper (Zhang et al., 2022): high-score boxes are matched first, the leftover
tracks then get a second chance against the low-score boxes (occluded people score low),
unmatched tracks are kept "lost" for a while so that they can come back with their id.
One addition for cameras processed at a few frames a second: boxes and tracks left over by the
IoU stages are matched by the distance of their centres, within how far a track can get
between two processed frames (``reach_heights_s``), new tracks included; at such rates a
walker's box often no longer overlaps the prediction, and IoU alone starts a new track
(or never confirms one) at every frame. For the same reason the motion model's step is measured
in frames of the rate ByteTrack's noise was tuned at (``step_frames``): at a few frames a second
the speed is learnt in as few processed frames as at full rate, and predictions do not lag.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import lap
import numpy as np

# --- Kalman filter on (cx, cy, aspect, height) with constant velocity ------------------------

_STD_POS = 1.0 / 20  # position noise relative to the box height, as in SORT/DeepSORT/ByteTrack
_STD_VEL = 1.0 / 160
_F = np.eye(8)
_F[:4, 4:] = np.eye(4)
_H = np.eye(4, 8)
_Q_SCALE = np.array([_STD_POS, _STD_POS, 0, _STD_POS, _STD_VEL, _STD_VEL, 0, _STD_VEL]) ** 2


def xyxy_to_xyah(b: np.ndarray) -> np.ndarray:
    w, h = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
    return np.stack([b[..., 0] + w / 2, b[..., 1] + h / 2, w / np.maximum(h, 1e-6), h], axis=-1)


def xyah_to_xyxy(m: np.ndarray) -> np.ndarray:
    h = m[..., 3]
    w = m[..., 2] * h
    return np.stack([m[..., 0] - w / 2, m[..., 1] - h / 2, m[..., 0] + w / 2, m[..., 1] + h / 2], axis=-1)


# The frame rate the noise values above were tuned at (ByteTrack on MOT17, mostly 30 fps). The
# state's velocity is per processed frame, so at a lower rate a step spans dt = REFERENCE_FPS / fps
# of those frames; the noise is scaled as for a constant-velocity model driven by white acceleration
# (Bar-Shalom): a walker's speed per step, its prior and its change per step grow with dt. The
# measurement noise is not scaled: a detector's jitter does not depend on the rate.
REFERENCE_FPS = 30.0


def step_frames(frame_rate: float) -> float:
    """How many reference frames one processed frame spans (never less than one: faster cameras
    keep ByteTrack's per-frame noise)."""
    return max(1.0, REFERENCE_FPS / frame_rate)


def kalman_initiate(xyah: np.ndarray, dt: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A track's first state; ``dt``: reference frames per step (``step_frames``)."""
    h = xyah[3]
    v = 10 * _STD_VEL * h * dt  # an unknown speed per step is dt times the unknown speed per frame
    std = np.array([2 * _STD_POS * h, 2 * _STD_POS * h, 1e-2, 2 * _STD_POS * h, v, v, 1e-5, v])
    return np.r_[xyah, np.zeros(4)], np.diag(std ** 2)


def kalman_predict(means: np.ndarray, covs: np.ndarray, dt: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Predict many tracks at once: means (N, 8), covs (N, 8, 8); ``dt`` as in ``kalman_initiate``."""
    h2 = (means[:, 3:4] ** 2) * _Q_SCALE  # (N, 8) process noise variances, relative to height
    # Over dt frames the position wanders dt times the per-frame variance; the speed changes dt
    # times the per-frame variance, and in units per step that is dt**2 more: dt**3 in all.
    h2[:, :4] *= dt
    h2[:, 4:] *= dt ** 3
    h2[:, 2], h2[:, 6] = 1e-4, 1e-10
    covs = _F @ covs @ _F.T
    idx = np.arange(8)
    covs[:, idx, idx] += h2
    return means @ _F.T, covs


def kalman_update(means: np.ndarray, covs: np.ndarray, xyah: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Correct many tracks at once with their measurements xyah (N, 4)."""
    h = means[:, 3]
    idx = np.arange(4)
    s = covs[:, :4, :4].copy()  # H P H^T, as H picks the first four state entries
    s[:, idx, idx] += np.stack([_STD_POS * h, _STD_POS * h, np.full_like(h, 1e-1), _STD_POS * h], axis=1) ** 2
    pht = covs[:, :, :4]
    gain = np.linalg.solve(s, pht.transpose(0, 2, 1)).transpose(0, 2, 1)  # S is symmetric
    innovation = xyah - means[:, :4]
    means = means + (gain @ innovation[:, :, None])[:, :, 0]
    return means, covs - gain @ s @ gain.transpose(0, 2, 1)


# --- association -------------------------------------------------------------------------------

def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes a (N, 4) and b (M, 4), xyxy."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    tl = np.maximum(a[:, None, :2], b[None, :, :2])
    br = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(br - tl, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def centre_distance(tracks: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Distance between the centres of track boxes (N, 4) and boxes (M, 4), in the track's box
    heights, with the height ratio folded in (a box twice as tall is not the same person)."""
    if len(tracks) == 0 or len(boxes) == 0:
        return np.zeros((len(tracks), len(boxes)))
    tc = (tracks[:, None, :2] + tracks[:, None, 2:]) / 2
    bc = (boxes[None, :, :2] + boxes[None, :, 2:]) / 2
    th = np.maximum(tracks[:, 3] - tracks[:, 1], 1.0)[:, None]
    bh = np.maximum(boxes[:, 3] - boxes[:, 1], 1.0)[None, :]
    dist = np.hypot(*np.moveaxis(tc - bc, -1, 0)) / th
    return dist + np.abs(np.log(bh / th))


def assign(cost: np.ndarray, limit: float) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Minimum-cost matching; pairs above ``limit`` stay unmatched."""
    if cost.size == 0:
        return [], list(range(cost.shape[0])), list(range(cost.shape[1]))
    _, rows, cols = lap.lapjv(cost, extend_cost=True, cost_limit=limit)
    matches = [(i, int(j)) for i, j in enumerate(rows) if j >= 0]
    return matches, [i for i, j in enumerate(rows) if j < 0], [j for j, i in enumerate(cols) if i < 0]


class TrackState(Enum):
    NEW = 0
    TRACKED = 1
    LOST = 2
    REMOVED = 3


@dataclass
class Track:
    track_id: int
    mean: np.ndarray
    cov: np.ndarray
    score: float
    class_id: int
    start_frame: int
    last_frame: int
    state: TrackState = TrackState.NEW
    activated: bool = False
    hits: int = 1
    xyxy: np.ndarray | None = None  # the Kalman estimate of the box: smoother than the raw detection

    def __post_init__(self) -> None:
        self.xyxy = xyah_to_xyxy(self.mean[:4])

    def set_state(self, mean: np.ndarray, cov: np.ndarray, box: np.ndarray) -> None:
        self.mean, self.cov, self.xyxy = mean, cov, box


def observe(tracks: list[Track], boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, frame: int) -> None:
    """Kalman-correct the matched tracks with their boxes, all in one batch."""
    if not tracks:
        return
    means, covs = kalman_update(np.array([t.mean for t in tracks]), np.array([t.cov for t in tracks]),
                                xyxy_to_xyah(boxes))
    for t, m, c, b, sc, cl in zip(tracks, means, covs, xyah_to_xyxy(means[:, :4]), scores.tolist(), classes.tolist()):
        t.set_state(m, c, b)
        t.score, t.class_id, t.last_frame = sc, cl, frame
        t.state, t.activated = TrackState.TRACKED, True
        t.hits += 1


@dataclass(frozen=True)
class TrackedObject:
    """What the tracker reports per frame for each confirmed track seen in that frame."""

    track_id: int
    xyxy: np.ndarray
    score: float
    class_id: int


class ByteTracker:
    """Feed it one frame's detections at a time with ``update``; it returns the visible tracks."""

    def __init__(self, *, high_thresh: float = 0.5, low_thresh: float = 0.1, new_track_thresh: float | None = None,
                 match_thresh: float = 0.8, second_match_thresh: float = 0.5, frame_rate: float = 30.0,
                 lost_seconds: float = 1.0, reach_heights_s: float = 0.0):
        self.high_thresh = high_thresh
        self.low_thresh = low_thresh
        self.new_track_thresh = high_thresh + 0.1 if new_track_thresh is None else new_track_thresh
        self.match_thresh = match_thresh
        self.second_match_thresh = second_match_thresh
        self.max_lost_frames = max(3, int(round(frame_rate * lost_seconds)))
        # Stage 3 (motion): a box that overlaps no predicted track may still be the one a track
        # reaches between two processed frames; how far, in its box heights, a track may go.
        self.reach = reach_heights_s / frame_rate
        self.dt = step_frames(frame_rate)  # the motion model's time step, in reference frames
        self.frame = 0
        self.tracked: list[Track] = []
        self.lost: list[Track] = []
        self._next_id = 1

    def _cost(self, tracks: list[Track], boxes: np.ndarray, classes: np.ndarray,
              scores: np.ndarray | None) -> np.ndarray:
        """1 - IoU, fused with the detection score (ByteTrack's fuse_score); other classes never match."""
        if not tracks or len(boxes) == 0:
            return np.zeros((len(tracks), len(boxes)))
        iou = iou_matrix(np.array([t.xyxy for t in tracks]), boxes)
        if scores is not None:
            iou = iou * scores[None, :]
        cost = 1.0 - iou
        cost[np.array([t.class_id for t in tracks])[:, None] != classes[None, :]] = 1.0
        return cost

    def _reach_cost(self, tracks: list[Track], boxes: np.ndarray, classes: np.ndarray) -> np.ndarray:
        if not tracks or len(boxes) == 0:
            return np.zeros((len(tracks), len(boxes)))
        cost = centre_distance(np.array([t.xyxy for t in tracks]), boxes)
        cost[np.array([t.class_id for t in tracks])[:, None] != classes[None, :]] = 1e6  # other classes never
        return cost

    def _predict(self, tracks: list[Track]) -> None:
        if not tracks:
            return
        means = np.array([t.mean for t in tracks])
        # A lost track's height velocity is zeroed so that it does not grow or shrink unseen.
        means[[t.state != TrackState.TRACKED for t in tracks], 7] = 0.0
        means, covs = kalman_predict(means, np.array([t.cov for t in tracks]), self.dt)
        for t, m, c, b in zip(tracks, means, covs, xyah_to_xyxy(means[:, :4])):
            t.set_state(m, c, b)

    def update(self, xyxy: np.ndarray, scores: np.ndarray, class_ids: np.ndarray) -> list[TrackedObject]:
        self.frame += 1
        keep = scores >= self.low_thresh
        xyxy, scores, class_ids = xyxy[keep], scores[keep], class_ids[keep]
        high = scores >= self.high_thresh
        hi_box, hi_score, hi_cls = xyxy[high], scores[high], class_ids[high]
        lo_box, lo_cls = xyxy[~high], class_ids[~high]

        unconfirmed = [t for t in self.tracked if not t.activated]
        pool = [t for t in self.tracked if t.activated] + self.lost
        self._predict(pool)

        # Stage 1: every confirmed or lost track against the high-score boxes.
        matches, rest_t, rest_d = assign(self._cost(pool, hi_box, hi_cls, hi_score), self.match_thresh)
        self._observe_pairs(pool, matches, hi_box, hi_score, hi_cls)

        # Stage 2: tracks still visible last frame against the low-score boxes (occlusion).
        second = [pool[i] for i in rest_t if pool[i].state == TrackState.TRACKED]
        lo_score = scores[~high]
        m2, rest2, _ = assign(self._cost(second, lo_box, lo_cls, None), self.second_match_thresh)
        self._observe_pairs(second, m2, lo_box, lo_score, lo_cls)
        for ti in rest2:
            second[ti].state = TrackState.LOST

        # Stage 3: at a low processing rate people move past their predicted box between frames;
        # what is left is matched by the distance of the centres (in box heights) within reach.
        matched = {id(pool[i]) for i, _ in matches} | {id(second[i]) for i, _ in m2}
        if self.reach > 0 and len(rest_d):
            far = [t for t in pool if id(t) not in matched]
            cost = self._reach_cost(far, hi_box[rest_d], hi_cls[rest_d])
            m_far, _, left = assign(cost, self.reach)
            self._observe_pairs(far, [(ti, rest_d[di]) for ti, di in m_far], hi_box, hi_score, hi_cls)
            rest_d = [rest_d[di] for di in left]

        # Tentative tracks get one frame to be confirmed.
        left_box, left_score, left_cls = hi_box[rest_d], hi_score[rest_d], hi_cls[rest_d]
        if unconfirmed:
            m3, rest3, rest_d3 = assign(self._cost(unconfirmed, left_box, left_cls, left_score), 0.7)
        else:
            m3, rest3, rest_d3 = [], [], list(range(len(left_box)))
        self._observe_pairs(unconfirmed, m3, left_box, left_score, left_cls)
        if self.reach > 0 and rest3 and rest_d3:  # a new track of a walker at a low rate, as in stage 3
            pending = [unconfirmed[ti] for ti in rest3]
            m4, rest4, left4 = assign(self._reach_cost(pending, left_box[rest_d3], left_cls[rest_d3]), self.reach)
            self._observe_pairs(pending, [(ti, rest_d3[di]) for ti, di in m4], left_box, left_score, left_cls)
            rest3 = [rest3[ti] for ti in rest4]
            rest_d3 = [rest_d3[di] for di in left4]
        for ti in rest3:
            unconfirmed[ti].state = TrackState.REMOVED

        new = [self._start(left_box[d], float(left_score[d]), int(left_cls[d]))
               for d in rest_d3 if left_score[d] >= self.new_track_thresh]
        self._housekeep(pool + unconfirmed + new)
        return [TrackedObject(t.track_id, t.xyxy, t.score, t.class_id)
                for t in self.tracked if t.activated and t.last_frame == self.frame]

    def _observe_pairs(self, tracks: list[Track], pairs: list[tuple[int, int]], boxes: np.ndarray,
                       scores: np.ndarray, classes: np.ndarray) -> None:
        if pairs:
            ti, di = (list(x) for x in zip(*pairs))
            observe([tracks[i] for i in ti], boxes[di], scores[di], classes[di], self.frame)

    def _start(self, box: np.ndarray, score: float, class_id: int) -> Track:
        mean, cov = kalman_initiate(xyxy_to_xyah(box), self.dt)
        track = Track(self._next_id, mean, cov, score, class_id, self.frame, self.frame)
        self._next_id += 1
        if self.frame == 1:  # as in ByteTrack: boxes of the very first frame are trusted at once
            track.state, track.activated = TrackState.TRACKED, True
        return track

    def _housekeep(self, tracks: list[Track]) -> None:
        for t in tracks:
            if t.state == TrackState.LOST and self.frame - t.last_frame > self.max_lost_frames:
                t.state = TrackState.REMOVED
        self.tracked = [t for t in tracks if t.state in (TrackState.TRACKED, TrackState.NEW)]
        self.lost = [t for t in tracks if t.state == TrackState.LOST]
        self._drop_duplicates()

    def _drop_duplicates(self) -> None:
        """A lost track overlapping a tracked one almost fully is the same object: keep the older."""
        if not self.tracked or not self.lost:
            return
        iou = iou_matrix(np.array([t.xyxy for t in self.tracked]), np.array([t.xyxy for t in self.lost]))
        drop_tracked, drop_lost = set(), set()
        for i, j in zip(*np.nonzero(iou > 0.85)):
            a, b = self.tracked[i], self.lost[j]
            if a.last_frame - a.start_frame > b.last_frame - b.start_frame:
                drop_lost.add(j)
            else:
                drop_tracked.add(i)
        self.tracked = [t for i, t in enumerate(self.tracked) if i not in drop_tracked]
        self.lost = [t for j, t in enumerate(self.lost) if j not in drop_lost]

    def active_ids(self) -> set[int]:
        """Ids of tracks not yet removed (tracked or lost): the others are gone for good."""
        return {t.track_id for t in self.tracked if t.activated} | {t.track_id for t in self.lost}
