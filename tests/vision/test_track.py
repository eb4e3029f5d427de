"""The ByteTrack-style tracker on synthetic motion: identities through crossings and occlusion."""

from __future__ import annotations

import numpy as np

from edge_agent.vision.track import (
    ByteTracker,
    iou_matrix,
    kalman_initiate,
    kalman_predict,
    step_frames,
    xyah_to_xyxy,
    xyxy_to_xyah,
)


def box(cx: float, cy: float, w: float = 30, h: float = 80) -> list[float]:
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def feed(tracker: ByteTracker, boxes: list[list[float]], scores: list[float], classes: list[int] | None = None):
    classes = classes if classes is not None else [0] * len(boxes)
    return tracker.update(np.array(boxes, float).reshape(-1, 4), np.array(scores, float), np.array(classes))


def ids_by_x(tracks) -> dict[int, float]:
    return {t.track_id: float((t.xyxy[0] + t.xyxy[2]) / 2) for t in tracks}


def test_boxes_and_kalman_state_round_trip():
    b = np.array([10.0, 20.0, 40.0, 100.0])
    assert np.allclose(xyah_to_xyxy(xyxy_to_xyah(b)), b)
    mean, cov = kalman_initiate(xyxy_to_xyah(b))
    means, covs = kalman_predict(mean[None], cov[None])
    assert np.allclose(means[0, :4], mean[:4])  # no velocity yet: stays put
    assert np.all(np.diag(covs[0]) > np.diag(cov))  # but grows less certain


def test_iou_matrix():
    a = np.array([[0, 0, 10, 10], [100, 100, 110, 110]], float)
    b = np.array([[5, 0, 15, 10]], float)
    assert np.allclose(iou_matrix(a, b), [[50 / 150], [0]])


def test_two_people_crossing_paths_keep_their_ids():
    tracker = ByteTracker(high_thresh=0.5, frame_rate=10)
    first = None
    for i in range(40):
        a, b = 100 + 10 * i, 500 - 10 * i  # they meet around frame 20
        tracks = feed(tracker, [box(a, 200), box(b, 230)], [0.9, 0.85])
        if i == 2:
            first = {tid: x < 300 for tid, x in ids_by_x(tracks).items()}
    last = ids_by_x(tracks)
    assert set(last) == set(first)
    for tid, started_left in first.items():
        assert (last[tid] > 300) == started_left  # the one that started left ended right


def test_occlusion_gap_keeps_the_id_and_the_motion():
    """Missing for 6 frames while walking: the Kalman prediction brings the same id back."""
    tracker = ByteTracker(high_thresh=0.5, frame_rate=10, lost_seconds=1.0)
    ids = set()
    for i in range(30):
        if 10 <= i < 16:
            tracks = feed(tracker, [], [])
            assert tracks == []  # nothing observed, nothing reported
            continue
        tracks = feed(tracker, [box(100 + 8 * i, 300)], [0.9])
        ids |= {t.track_id for t in tracks}
    assert len(ids) == 1


def test_low_score_boxes_continue_a_track_in_the_second_stage():
    """Partly occluded, the detector scores the person low: the track goes on, no new id."""
    tracker = ByteTracker(high_thresh=0.5, frame_rate=10)
    seen = []
    for i in range(20):
        score = 0.2 if 8 <= i < 14 else 0.9
        seen.append([t.track_id for t in feed(tracker, [box(100 + 5 * i, 300)], [score])])
    assert all(s == [1] for s in seen[1:])


def test_a_low_score_box_alone_never_starts_a_track():
    tracker = ByteTracker(high_thresh=0.5, frame_rate=10)
    for _ in range(5):
        assert feed(tracker, [box(100, 100)], [0.3]) == []


def test_a_one_frame_false_positive_is_never_reported():
    tracker = ByteTracker(high_thresh=0.5, frame_rate=10)
    feed(tracker, [box(100, 100)], [0.9])  # frame 1: trusted at once
    reported = set()
    for i in range(10):
        extra = [box(400, 400)] if i == 3 else []
        reported |= {t.track_id for t in feed(tracker, [box(100 + i, 100)] + extra, [0.9] + [0.9] * len(extra))}
    assert reported == {1}


def test_a_track_gone_longer_than_the_buffer_is_removed():
    tracker = ByteTracker(high_thresh=0.5, frame_rate=10, lost_seconds=0.5)
    feed(tracker, [box(100, 100)], [0.9])
    assert tracker.active_ids() == {1}
    for _ in range(7):
        feed(tracker, [], [])
    assert tracker.active_ids() == set()
    assert [t.track_id for t in feed(tracker, [box(100, 100)], [0.9]) + feed(tracker, [box(100, 100)], [0.9])] == [2]


def test_classes_do_not_swap_identities():
    tracker = ByteTracker(high_thresh=0.5, frame_rate=10)
    feed(tracker, [box(100, 100), box(105, 100)], [0.9, 0.9], [0, 2])
    for i in range(5):
        tracks = feed(tracker, [box(105 + i, 100), box(100 + i, 100)], [0.9, 0.9], [2, 0])
    assert {(t.track_id, t.class_id) for t in tracks} == {(1, 0), (2, 2)}


def test_a_walker_seen_at_a_low_rate_keeps_one_id():
    """At 2 processed frames a second a walker moves past its own box between frames: IoU alone
    never confirms the track (every box is a new one); the reach stage follows it."""
    boxes = [box(100 + 45 * i, 300, w=30, h=80) for i in range(8)]  # 45 px per step, boxes 30 wide
    with_reach = ByteTracker(frame_rate=2, reach_heights_s=3.0)  # 1.5 box heights per step
    ids = [{t.track_id for t in feed(with_reach, [b], [0.9])} for b in boxes]
    assert ids[0] == {1} and all(i == {1} for i in ids[1:])
    iou_only = ByteTracker(frame_rate=2)
    assert [feed(iou_only, [b], [0.9]) for b in boxes][1:] == [[]] * 7  # never confirmed


def test_reach_does_not_take_a_box_beyond_it_or_of_another_size():
    tracker = ByteTracker(frame_rate=2, reach_heights_s=3.0)  # 1.5 heights = 120 px at h=80
    feed(tracker, [box(100, 300)], [0.9])
    assert feed(tracker, [box(300, 300)], [0.9]) == []  # 200 px away: a new track, not confirmed
    tracker = ByteTracker(frame_rate=2, reach_heights_s=3.0)
    feed(tracker, [box(100, 300)], [0.9])
    assert feed(tracker, [box(150, 300, w=80, h=240)], [0.9]) == []  # three times as tall: someone else


def speed_estimates(tracker: ByteTracker, fps: float, jitter: float = 0.0, speed: float = 1.0,
                    steps: int = 6) -> list[float]:
    """Feed one walker (``speed`` box heights a second, boxes 80 high, alternating ``jitter`` px) and
    return the track's Kalman x speed after each frame, in box heights a second."""
    per_step = 80 * speed / fps
    out = []
    for i in range(steps):
        feed(tracker, [box(100 + per_step * i + (jitter if i % 2 else -jitter), 300)], [0.9])
        out.append(float(tracker.tracked[0].mean[4]) * fps / 80)
    return out


def test_the_motion_model_step_is_measured_in_reference_frames():
    assert step_frames(60) == step_frames(30) == 1.0  # fast cameras keep ByteTrack's per-frame model
    assert step_frames(5) == 6.0
    mean, cov = kalman_initiate(np.array([100.0, 200.0, 0.4, 80.0]))
    assert np.allclose(kalman_predict(mean[None], cov[None], 1.0)[1], kalman_predict(mean[None], cov[None])[1])
    slow_mean, slow_cov = kalman_initiate(np.array([100.0, 200.0, 0.4, 80.0]), 6.0)
    assert np.isclose(slow_cov[4, 4], cov[4, 4] * 36)  # the unknown speed per step is six times larger
    motion = [0, 1, 3, 4, 5, 7]  # centre, height and their speeds (the aspect's noise is fixed)
    assert np.all(np.diag(kalman_predict(slow_mean[None], slow_cov[None], 6.0)[1][0])[motion]
                  > np.diag(kalman_predict(mean[None], cov[None])[1][0])[motion])


def test_at_a_low_rate_the_speed_is_learnt_in_as_few_frames_as_at_full_rate():
    """Per-frame noise at 5 fps left the prediction at half a walker's speed after three frames
    (people passing at a line swapped ids); scaled with the step it is learnt within 10 %."""
    assert speed_estimates(ByteTracker(frame_rate=5), 5)[2] > 0.9
    per_frame = ByteTracker(frame_rate=5)
    per_frame.dt = 1.0  # the model as it was: noise tuned for 30 fps, applied per processed frame
    assert speed_estimates(per_frame, 5)[2] < 0.6
    full = speed_estimates(ByteTracker(frame_rate=30), 30)
    assert 0.4 < full[2] < 0.6  # at 30 fps nothing changes: ByteTrack's convergence


def test_detector_jitter_does_not_make_a_standing_person_walk_at_a_low_rate():
    """The measurement noise is not scaled with the step: box jitter of its size (1/20 of the height)
    must not turn into a speed the prediction would follow (a walker does about 1 height a second)."""
    for fps in (5, 2):
        estimates = speed_estimates(ByteTracker(frame_rate=fps), fps, jitter=4.0, speed=0.0, steps=20)
        assert max(abs(v) for v in estimates[5:]) < 0.25
