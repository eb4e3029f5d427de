#!/usr/bin/env python3
"""Counted vs true line crossings on the shared clips, and the fps of the counting pipeline.

Truth comes from the clip's MOTChallenge gt.txt by the DESIGN rule (bottom-centre anchor,
the step between consecutive observations of a track intersects the directed segment;
gt frame N is video frame N-1). ``--peer`` also runs YOLOX-nano + supervision's ByteTrack +
LineZone (bottom-centre, minimum_crossing_threshold 3) on the same detections pipeline, when
supervision is installed. The last line printed is one JSON object.

    .venv/bin/python scripts/bench_count.py                      # PETS09-S2L1, default lines
    .venv/bin/python scripts/bench_count.py --clip TUD-Campus --line a:0,0.6,1,0.6 --peer
    .venv/bin/python scripts/bench_count.py --worker-seconds 60          # RSS of one camera at 5 fps
    .venv/bin/python scripts/bench_count.py --split                      # each stage alone, ms per frame
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from edge_agent.vision.capture import iter_file_frames, video_size
from edge_agent.vision.config import LineConfig, ModelConfig
from edge_agent.vision.count import Segment
from edge_agent.vision.detect import Detector
from edge_agent.vision.offline import count_video, parse_line_arg

SHARED = Path(os.environ.get("EDGE_SHARED_DIR", REPO.parent / "shared"))
CLIPS = {"PETS09-S2L1": "PETS09-S2L1.avi", "TUD-Campus": "TUD-Campus.mp4", "TUD-Stadtmitte": "TUD-Stadtmitte.mp4"}
# Vertical, horizontal, diagonal, short segments and lines along the main walking directions.
DEFAULT_LINES = ["v:0.5,0,0.5,1", "h:0,0.6,1,0.6", "d1:0,0,1,1", "d2:1,0,0,1", "vl:0.25,0.2,0.25,0.9",
                 "vr:0.75,0.3,0.75,1", "hs:0.3,0.45,0.7,0.45", "hl:0.1,0.8,0.9,0.8"]


def load_gt(clip: str) -> dict[int, list[tuple[int, np.ndarray]]]:
    """track id -> [(video frame, xyxy)] sorted by frame."""
    rows = np.loadtxt(SHARED / "footage" / clip / "gt.txt", delimiter=",", ndmin=2)
    tracks: dict[int, list[tuple[int, np.ndarray]]] = defaultdict(list)
    for r in rows[np.lexsort((rows[:, 0], rows[:, 1]))]:
        x, y, w, h = r[2:6]
        tracks[int(r[1])].append((int(r[0]) - 1, np.array([x, y, x + w, y + h])))
    return tracks


def true_counts(tracks: dict, line: LineConfig, width: int, height: int) -> dict[str, int]:
    seg = Segment.from_normalised(line.points, width, height)
    counts = {"in": 0, "out": 0}
    for obs in tracks.values():
        pts = [((b[0] + b[2]) / 2, b[3]) for _, b in obs]
        for a, b in zip(pts, pts[1:]):
            if d := seg.crossing(a, b):
                counts[d] += 1
    return counts


def error_of(counted: dict, truth: dict) -> int:
    return abs(counted["in"] - truth["in"]) + abs(counted["out"] - truth["out"])


def run_ours(video: Path, model: ModelConfig, lines: list[LineConfig], fps: float | None) -> tuple[dict, dict, float]:
    """(counts, count JSON, process CPU ms per frame: all threads, the load-independent cost)."""
    detector = Detector(model)
    cpu = time.process_time()
    report = count_video(video, detector, lines, [], fps=fps)
    cpu_ms = (time.process_time() - cpu) * 1e3 / max(report.frames, 1)
    result = report.as_dict([x.id for x in lines], [])
    return {k: {"in": v["in"], "out": v["out"]} for k, v in result["lines"].items()}, result, cpu_ms


def run_peer(video: Path, model: ModelConfig, lines: list[LineConfig]) -> tuple[dict, float, float] | None:
    """YOLOX-nano + supervision ByteTrack + LineZone; None when supervision is missing."""
    try:
        import supervision as sv
    except ImportError:
        return None
    if not hasattr(sv, "ByteTrack"):  # removed in supervision 0.31; install 0.26 with --no-deps
        raise SystemExit("this supervision has no ByteTrack: pip install --no-deps 'supervision==0.26.1'")
    width, height, src_fps, _ = video_size(video)
    detector = Detector(model)
    tracker = sv.ByteTrack(frame_rate=int(round(src_fps)))
    zones = {x.id: sv.LineZone(start=sv.Point(x.points[0][0] * width, x.points[0][1] * height),
                               end=sv.Point(x.points[1][0] * width, x.points[1][1] * height),
                               triggering_anchors=[sv.Position.BOTTOM_CENTER], minimum_crossing_threshold=3)
             for x in lines}
    swap = _peer_direction_is_swapped(sv)
    start, cpu = time.perf_counter(), time.process_time()
    frames = 0
    for _, image in iter_file_frames(video):
        d = detector.run(image)
        dets = tracker.update_with_detections(sv.Detections(xyxy=d.xyxy, confidence=d.scores, class_id=d.class_ids))
        for zone in zones.values():
            zone.trigger(dets)
        frames += 1
    fps = frames / (time.perf_counter() - start)
    cpu_ms = (time.process_time() - cpu) * 1e3 / max(frames, 1)
    counts = {k: ({"in": z.out_count, "out": z.in_count} if swap else {"in": z.in_count, "out": z.out_count})
              for k, z in zones.items()}
    return counts, fps, cpu_ms


def _peer_direction_is_swapped(sv) -> bool:
    """Supervision's in/out convention, checked on a box crossing the DESIGN example line right->left."""
    zone = sv.LineZone(start=sv.Point(50, 0), end=sv.Point(50, 100), triggering_anchors=[sv.Position.BOTTOM_CENTER],
                       minimum_crossing_threshold=1)
    for x in (80, 70, 30, 20):
        zone.trigger(sv.Detections(xyxy=np.array([[x - 5, 40, x + 5, 60]], float), tracker_id=np.array([1]),
                                   class_id=np.array([0]), confidence=np.array([0.9])))
    return zone.out_count > zone.in_count  # DESIGN: right -> left on a downward line is "in"


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def run_worker(video: Path, model: ModelConfig, lines: list[LineConfig], seconds: float, fps: float) -> dict:
    """One CameraWorker on the clip (looping, paced like a live camera) at ``fps``: memory and rates."""
    import tempfile
    import threading

    from edge_agent.agent.worker import CameraWorker
    from edge_agent.vision.config import CameraConfig

    drafts = []
    lock = threading.Lock()

    def emit(d):
        with lock:
            drafts.append(d.type)

    cam = CameraConfig(id="bench", source=str(video), loop=True, fps=fps, lines=lines)
    with tempfile.TemporaryDirectory() as state:
        worker = CameraWorker(cam, model, emit, device_id="bench", report_interval_s=5, state_dir=Path(state))
        worker.start()
        done = threading.Event()
        done.wait(seconds)  # the run's length is the measurement, nothing to wait for
        status = worker.status()
        worker.stop()
    now, peak = rss_mb()
    return {"seconds": seconds, "target_fps": fps, "rss_mb": round(now, 1), "rss_peak_mb": round(peak, 1),
            "frames": status["frames"], "processed_fps": status["processed_fps"],
            "camera_fps": status["camera_fps"], "skipped": status["skipped"],
            "events": {t: drafts.count(t) for t in sorted(set(drafts))}}


def stage_split(video: Path, model: ModelConfig, lines: list[LineConfig], frames: int = 300) -> dict:
    """Each stage timed alone, one after the other in one thread (no overlap, so no contention
    between our own threads): median wall ms and mean CPU ms per frame (CPU time may be counted
    in scheduler ticks, so only its mean means something), and pre+post+tracking as % of inference."""
    import statistics

    from edge_agent.vision.stage import CountingStage

    detector = Detector(model)
    width, height, src_fps, _ = video_size(video)
    stage = CountingStage(lines, [], width, height, detector.names, fps=src_fps, confidence=model.confidence)
    times: dict[str, list[float]] = defaultdict(list)
    for index, image in iter_file_frames(video):
        if index >= frames:
            break
        t0, c0 = time.perf_counter(), time.thread_time()
        blob, box = detector.preprocess(image)
        t1, c1 = time.perf_counter(), time.thread_time()
        raw = detector.infer(blob)
        t2, c2 = time.perf_counter(), time.thread_time()
        dets = detector.decode(raw, box, image.shape[:2])
        t3, c3 = time.perf_counter(), time.thread_time()
        stage.step(dets, index, index / src_fps)
        t4, c4 = time.perf_counter(), time.thread_time()
        for name, a, b, ca, cb in (("preprocess", t0, t1, c0, c1), ("inference", t1, t2, c1, c2),
                                   ("postprocess", t2, t3, c2, c3), ("tracking", t3, t4, c3, c4)):
            times[name].append((b - a) * 1e3)
            times[name + "_cpu"].append((cb - ca) * 1e3)
    # Wall time counts waiting for a core when other processes load the box; CPU time does not
    # (inference is wall either way: its work runs in onnxruntime's own threads).
    med = {k: round(statistics.mean(v) if k.endswith("_cpu") else statistics.median(v), 3) for k, v in times.items()}
    ours = ("preprocess", "postprocess", "tracking")
    med["overhead_vs_inference_pct"] = round(100 * sum(med[k] for k in ours) / med["inference"], 2)
    med["overhead_cpu_vs_inference_pct"] = round(100 * sum(med[k + "_cpu"] for k in ours) / med["inference"], 2)
    del med["inference_cpu"]
    return med


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clip", default="PETS09-S2L1", choices=sorted(CLIPS))
    ap.add_argument("--line", action="append", help="ID:x1,y1,x2,y2 (default: a set of 8 lines)")
    ap.add_argument("--model", default=str(SHARED / "models" / "yolox_nano.onnx"))
    ap.add_argument("--fps", type=float, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peer", action="store_true", help="also run supervision ByteTrack + LineZone")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each pipeline, alternating; fps is the best")
    ap.add_argument("--split", action="store_true", help="instead: time each stage alone (median ms per frame)")
    ap.add_argument("--worker-seconds", type=float, default=0,
                    help="instead: run one CameraWorker this long at --fps (default 5) and report its RSS")
    args = ap.parse_args()

    video = SHARED / "footage" / args.clip / CLIPS[args.clip]
    lines = [parse_line_arg(s) for s in (args.line or DEFAULT_LINES)]
    width, height, _, _ = video_size(video)
    gt = load_gt(args.clip)
    truth = {x.id: true_counts(gt, x, width, height) for x in lines}
    model = ModelConfig(path=Path(args.model), threads=args.threads, classes=["person"])
    if args.split:
        print(json.dumps({"clip": args.clip, "split_ms": stage_split(video, model, lines)}))
        return 0
    if args.worker_seconds:
        print(json.dumps(run_worker(video, model, lines, args.worker_seconds, args.fps or 5.0)))
        return 0

    # Ours and the peer alternate, so that load from other processes hits both alike.
    ours_fps, ours_cpu, peer_fps, peer_cpu, peer = [], [], [], [], None
    for _ in range(args.repeat):
        ours, result, cpu_ms = run_ours(video, model, lines, args.fps)
        ours_fps.append(result["fps"])
        ours_cpu.append(round(cpu_ms, 2))
        if args.peer:
            peer = run_peer(video, model, lines)
            if peer is not None:
                peer_fps.append(round(peer[1], 2))
                peer_cpu.append(round(peer[2], 2))
    out = {"clip": args.clip, "frames": result["frames"], "fps": max(ours_fps), "fps_runs": ours_fps,
           "cpu_ms_per_frame": min(ours_cpu), "timing": result["timing"], "truth": truth, "ours": ours}
    total_truth = sum(t["in"] + t["out"] for t in truth.values())
    out["ours_error"] = sum(error_of(ours[k], truth[k]) for k in truth)
    out["ours_error_pct"] = round(100 * out["ours_error"] / max(total_truth, 1), 1)
    for k in truth:
        print(f"{k:>4} truth in {truth[k]['in']:3d} out {truth[k]['out']:3d} | ours in {ours[k]['in']:3d} "
              f"out {ours[k]['out']:3d}", file=sys.stderr)
    if args.peer and peer is None:
        out["peer"] = "supervision not installed"
    elif args.peer:
        counts = peer[0]
        out.update(peer=counts, peer_fps=max(peer_fps), peer_fps_runs=peer_fps, peer_cpu_ms_per_frame=min(peer_cpu),
                   peer_error=sum(error_of(counts[k], truth[k]) for k in truth))
        out["peer_error_pct"] = round(100 * out["peer_error"] / max(total_truth, 1), 1)
        for k in truth:
            print(f"{k:>4} peer in {counts[k]['in']:3d} out {counts[k]['out']:3d}", file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
