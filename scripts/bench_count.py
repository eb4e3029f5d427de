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
    .venv/bin/python scripts/bench_count.py --sweep --cache /tmp/dets    # error at 1, 1/2, 1/3, 1/5 of the
                                                                         # frame rate, all clips, ours and peer

The sweep counts on each clip's detections of every frame, computed once (``--cache DIR`` keeps them
between runs), and keeps the frames a camera at that rate would process (``FrameSampler``, the rule
of ``count --fps`` and of the live reader); the peer gets the same frames, its ByteTrack told the
processing rate. Truth does not depend on the rate. Two line sets: ``tuning`` (DEFAULT_LINES, the
ones the counting rules were tuned on) and ``held_out`` (HELD_OUT_LINES, never tuned on).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import hashlib

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from edge_agent.vision.capture import FrameSampler, iter_file_frames, video_size
from edge_agent.vision.config import LineConfig, ModelConfig
from edge_agent.vision.count import Segment
from edge_agent.vision.detect import Detections, Detector
from edge_agent.vision.offline import count_video, parse_line_arg

SHARED = Path(os.environ.get("EDGE_SHARED_DIR", REPO.parent / "shared"))
CLIPS = {"PETS09-S2L1": "PETS09-S2L1.avi", "TUD-Campus": "TUD-Campus.mp4", "TUD-Stadtmitte": "TUD-Stadtmitte.mp4"}
# Vertical, horizontal, diagonal, short segments and lines along the main walking directions.
DEFAULT_LINES = ["v:0.5,0,0.5,1", "h:0,0.6,1,0.6", "d1:0,0,1,1", "d2:1,0,0,1", "vl:0.25,0.2,0.25,0.9",
                 "vr:0.75,0.3,0.75,1", "hs:0.3,0.45,0.7,0.45", "hl:0.1,0.8,0.9,0.8"]
# Held out: chosen before the low-rate work was measured and never used to tune it. Every
# orientation, short segments, reversed directions (d, g: P2 -> P1 of a vertical/horizontal line).
HELD_OUT_LINES = ["a:0.4,0,0.4,1", "b:0,0.45,1,0.45", "c:0.9,0.1,0.1,0.9", "d:0.6,0.9,0.6,0.35",
                  "e:0.05,0.7,0.55,0.7", "f:0.3,0.2,0.8,0.6", "g:1,0.75,0,0.75", "k:0.65,0.1,0.65,0.6"]
RATES = (1.0, 1 / 2, 1 / 3, 1 / 5)


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


# --- the rate sweep ------------------------------------------------------------------------------

def cached_detections(clip: str, model: ModelConfig, cache: Path | None) -> list[Detections]:
    """Every frame's detections of ``clip``, from ``cache`` when it has them for this model config."""
    key = hashlib.sha256(f"{model.model_dump_json()}{Path(model.path).stat().st_size}".encode()).hexdigest()[:12]
    path = cache / f"{clip}-{key}.npz" if cache else None
    if path is not None and path.is_file():
        z = np.load(path)
        return [Detections(z[f"b{i}"], z[f"s{i}"], z[f"c{i}"], {}) for i in range(int(z["n"]))]
    detector = Detector(model)
    dets = [detector.run(image) for _, image in iter_file_frames(SHARED / "footage" / clip / CLIPS[clip])]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"{k}{i}": v for i, d in enumerate(dets) for k, v in (("b", d.xyxy), ("s", d.scores),
                                                                          ("c", d.class_ids))}
        np.savez(path, n=len(dets), **arrays)
    return dets


def kept_frames(dets: list[Detections], src_fps: float, fps: float) -> list[tuple[int, Detections]]:
    """The frames a camera at ``fps`` processes (the rule of ``count --fps`` and the live reader)."""
    sampler = FrameSampler(fps)
    return [(i, d) for i, d in enumerate(dets) if sampler.take(i / src_fps)]


def ours_on(frames: list[tuple[int, Detections]], lines: list[LineConfig], size: tuple[int, int],
            src_fps: float, fps: float, names: list[str], confidence: float) -> dict:
    from edge_agent.vision.stage import CountingStage

    stage = CountingStage(lines, [], *size, names, fps=fps, confidence=confidence)
    counts = {x.id: {"in": 0, "out": 0} for x in lines}
    crossings = [c for i, d in frames for c in stage.step(d, i, i / src_fps).crossings] + stage.finish()
    for c in crossings:
        counts[c.line][c.direction] += 1
    return counts


def peer_on(frames: list[tuple[int, Detections]], lines: list[LineConfig], size: tuple[int, int],
            fps: float) -> dict | None:
    """supervision ByteTrack (told the processing rate) + LineZone on the same frames."""
    try:
        import supervision as sv
    except ImportError:
        return None
    width, height = size
    tracker = sv.ByteTrack(frame_rate=max(1, int(round(fps))))
    zones = {x.id: sv.LineZone(start=sv.Point(x.points[0][0] * width, x.points[0][1] * height),
                               end=sv.Point(x.points[1][0] * width, x.points[1][1] * height),
                               triggering_anchors=[sv.Position.BOTTOM_CENTER], minimum_crossing_threshold=3)
             for x in lines}
    for _, d in frames:
        tracked = tracker.update_with_detections(sv.Detections(xyxy=d.xyxy, confidence=d.scores, class_id=d.class_ids))
        for zone in zones.values():
            zone.trigger(tracked)
    swap = _peer_direction_is_swapped(sv)
    return {k: ({"in": z.out_count, "out": z.in_count} if swap else {"in": z.in_count, "out": z.out_count})
            for k, z in zones.items()}


def sweep(cache: Path | None, model: ModelConfig, line_sets: dict[str, list[str]], rates=RATES,
          clips=tuple(CLIPS)) -> dict:
    """``{set: {clip: {rate: {"ours", "peer", "truth_total", "ours_error", "peer_error"}}}}`` plus totals."""
    out: dict = {"rates": [round(r, 4) for r in rates], "sets": {}}
    detector_names = Detector(model).names
    for set_name, specs in line_sets.items():
        lines = [parse_line_arg(s) for s in specs]
        per_clip: dict = {}
        for clip in clips:
            width, height, src_fps, _ = video_size(SHARED / "footage" / clip / CLIPS[clip])
            gt = load_gt(clip)
            truth = {x.id: true_counts(gt, x, width, height) for x in lines}
            total = sum(t["in"] + t["out"] for t in truth.values())
            dets = cached_detections(clip, model, cache)
            per_rate = {}
            for r in rates:
                fps = src_fps * r
                frames = kept_frames(dets, src_fps, fps)
                ours = ours_on(frames, lines, (width, height), src_fps, fps, detector_names, model.confidence)
                peer = peer_on(frames, lines, (width, height), fps)
                entry = {"fps": round(fps, 3), "frames": len(frames), "truth_total": total, "ours": ours,
                         "ours_error": sum(error_of(ours[k], truth[k]) for k in truth)}
                if peer is not None:
                    entry.update(peer=peer, peer_error=sum(error_of(peer[k], truth[k]) for k in truth))
                per_rate[str(round(r, 4))] = entry
            per_clip[clip] = {"truth": truth, "rates": per_rate}
        out["sets"][set_name] = {"clips": per_clip, "total_pct": _totals(per_clip, rates)}
    return out


def _totals(per_clip: dict, rates) -> dict:
    """Error % per rate over all clips, ours and peer."""
    out = {}
    for r in rates:
        key = str(round(r, 4))
        entries = [c["rates"][key] for c in per_clip.values()]
        truth = sum(e["truth_total"] for e in entries)
        row = {"ours": round(100 * sum(e["ours_error"] for e in entries) / max(truth, 1), 1)}
        if all("peer_error" in e for e in entries):
            row["peer"] = round(100 * sum(e["peer_error"] for e in entries) / max(truth, 1), 1)
        out[key] = row
    return out


def print_sweep_table(result: dict) -> None:
    for set_name, data in result["sets"].items():
        print(f"{set_name}: error % of true crossings, ours / peer", file=sys.stderr)
        for clip, c in data["clips"].items():
            cells = []
            for key, e in c["rates"].items():
                peer = f"{100 * e['peer_error'] / max(e['truth_total'], 1):5.1f}" if "peer_error" in e else "  -  "
                cells.append(f"1/{1 / float(key):.0f}: {100 * e['ours_error'] / max(e['truth_total'], 1):5.1f} / {peer}")
            print(f"  {clip:15s} ({c['rates']['1.0']['truth_total']:3d} true) " + "  ".join(cells), file=sys.stderr)
        cells = [f"1/{1 / float(k):.0f}: {v['ours']:5.1f} / {v.get('peer', '-')}" for k, v in data["total_pct"].items()]
        print(f"  {'all clips':21s} " + "  ".join(cells), file=sys.stderr)


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
    ap.add_argument("--sweep", action="store_true",
                    help="instead: error at 1, 1/2, 1/3, 1/5 of the frame rate on every clip, ours and the peer")
    ap.add_argument("--cache", type=Path, default=None, help="with --sweep: keep every clip's detections here")
    ap.add_argument("--speed", action="store_true",
                    help="with --sweep: also the full pipelines' fps on --clip, ours and the peer (--repeat runs)")
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
    if args.sweep:
        result = sweep(args.cache, model, {"tuning": DEFAULT_LINES, "held_out": HELD_OUT_LINES})
        pets_v = result["sets"]["tuning"]["clips"]["PETS09-S2L1"]
        result["pets_v"] = {"truth": pets_v["truth"]["v"],
                            **{k: e["ours"]["v"] for k, e in pets_v["rates"].items()}}
        print_sweep_table(result)
        if args.speed:
            result["speed"] = speed(video, model, lines, args.repeat)
            del result["speed"]["result"]
            print(f"speed on {args.clip}: {result['speed']}", file=sys.stderr)
        print(json.dumps(result))
        return 0
    if args.worker_seconds:
        print(json.dumps(run_worker(video, model, lines, args.worker_seconds, args.fps or 5.0)))
        return 0

    out = speed(video, model, lines, args.repeat, fps=args.fps, peer_wanted=args.peer)
    result = out.pop("result")
    out = {"clip": args.clip, "frames": result["frames"], **out, "timing": result["timing"], "truth": truth}
    ours = out["ours"]
    total_truth = sum(t["in"] + t["out"] for t in truth.values())
    out["ours_error"] = sum(error_of(ours[k], truth[k]) for k in truth)
    out["ours_error_pct"] = round(100 * out["ours_error"] / max(total_truth, 1), 1)
    for k in truth:
        print(f"{k:>4} truth in {truth[k]['in']:3d} out {truth[k]['out']:3d} | ours in {ours[k]['in']:3d} "
              f"out {ours[k]['out']:3d}", file=sys.stderr)
    if args.peer and "peer" not in out:
        out["peer"] = "supervision not installed"
    elif args.peer:
        counts = out["peer"]
        out["peer_error"] = sum(error_of(counts[k], truth[k]) for k in truth)
        out["peer_error_pct"] = round(100 * out["peer_error"] / max(total_truth, 1), 1)
        for k in truth:
            print(f"{k:>4} peer in {counts[k]['in']:3d} out {counts[k]['out']:3d}", file=sys.stderr)
    print(json.dumps(out))
    return 0


def speed(video: Path, model: ModelConfig, lines: list[LineConfig], repeat: int, *, fps: float | None = None,
          peer_wanted: bool = True) -> dict:
    """The full pipelines (decode, detect, track, count), ours and the peer alternating so that load
    from other processes hits both alike; fps is the best of ``repeat`` runs."""
    ours_fps, ours_cpu, peer_fps, peer_cpu, peer = [], [], [], [], None
    for _ in range(repeat):
        ours, result, cpu_ms = run_ours(video, model, lines, fps)
        ours_fps.append(result["fps"])
        ours_cpu.append(round(cpu_ms, 2))
        if peer_wanted:
            peer = run_peer(video, model, lines)
            if peer is not None:
                peer_fps.append(round(peer[1], 2))
                peer_cpu.append(round(peer[2], 2))
    out: dict = {"fps": max(ours_fps), "fps_runs": ours_fps, "cpu_ms_per_frame": min(ours_cpu), "ours": ours,
                 "overhead_vs_inference_pct": result["timing"]["overhead_vs_inference_pct"], "result": result}
    if peer is not None:
        out.update(peer=peer[0], peer_fps=max(peer_fps), peer_fps_runs=peer_fps,
                   peer_cpu_ms_per_frame=min(peer_cpu), speed_vs_peer=round(max(ours_fps) / max(peer_fps), 3))
    return out

if __name__ == "__main__":
    sys.exit(main())
