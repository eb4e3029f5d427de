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
    .venv/bin/python scripts/bench_count.py --sweep --cache /tmp/dets --speed --repeat 3   # + both pipelines' fps

The sweep counts on each clip's detections of every frame, computed once (``--cache DIR`` keeps them
between runs, keyed by the model file, its box-changing settings, detect.py and the video; without it
every clip is detected again), and keeps the frames a camera at that rate would process
(``FrameSampler``, the rule of ``count --fps`` and of the live reader), plus PETS09 at ``--fps 5``.
The peer gets the same frames, its ByteTrack told the processing rate. Truth does not depend on the
rate. Line sets: ``tuning`` (DEFAULT_LINES, the ones the counting rules were tuned on), ``held_out``
(HELD_OUT_LINES) and ``fresh`` (FRESH_LINES), never tuned on. With a cache the peer's counts are kept
too (they do not change while our tracker does). Beside ours and the peer, two reference pipelines
(count_floors.py) tell where the error comes from at each rate: ``oracle`` (a perfect tracker: our
detections with the annotated identities, through our line counters) and ``gt_boxes`` (a perfect
detector: the annotated boxes through our whole stage). From another script (scripts/ on the path):

    from bench_count import sweep, print_sweep_table
    result = sweep(Path("/tmp/dets"), factory=my_stage_factory, peer=False)   # see StageFactory
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from count_floors import by_frame, floors
from edge_agent.vision.capture import FrameSampler, iter_file_frames, video_size
from edge_agent.vision.config import LineConfig, ModelConfig
from edge_agent.vision.count import Segment
from edge_agent.vision.detect import Detections, Detector
from edge_agent.vision.offline import count_video, parse_line_arg, processing_fps

SHARED = Path(os.environ.get("EDGE_SHARED_DIR", REPO.parent / "shared"))
CLIPS = {"PETS09-S2L1": "PETS09-S2L1.avi", "TUD-Campus": "TUD-Campus.mp4", "TUD-Stadtmitte": "TUD-Stadtmitte.mp4"}
# Vertical, horizontal, diagonal, short segments and lines along the main walking directions.
DEFAULT_LINES = ["v:0.5,0,0.5,1", "h:0,0.6,1,0.6", "d1:0,0,1,1", "d2:1,0,0,1", "vl:0.25,0.2,0.25,0.9",
                 "vr:0.75,0.3,0.75,1", "hs:0.3,0.45,0.7,0.45", "hl:0.1,0.8,0.9,0.8"]
# Held out: chosen before the low-rate work was measured and never used to tune it. Every
# orientation, short segments, reversed directions (d, g: P2 -> P1 of a vertical/horizontal line).
HELD_OUT_LINES = ["a:0.4,0,0.4,1", "b:0,0.45,1,0.45", "c:0.9,0.1,0.1,0.9", "d:0.6,0.9,0.6,0.35",
                  "e:0.05,0.7,0.55,0.7", "f:0.3,0.2,0.8,0.6", "g:1,0.75,0,0.75", "k:0.65,0.1,0.65,0.6"]
# Held out as well, chosen on 2026-12-04 before any count on them was seen, after HELD_OUT_LINES had
# been looked at while tuning; none on or next to a line above of the same orientation.
# Vertical (p, q reversed, t short), horizontal (r, s reversed, u short), diagonals both ways and steep
# or shallow (w, x reversed, y, z short), off-centre.
FRESH_LINES = ["p:0.15,0,0.15,1", "q:0.88,0.85,0.88,0.15", "r:0,0.25,1,0.25", "s:0.95,0.9,0.4,0.9",
               "t:0.33,0.5,0.33,0.7", "u:0.55,0.38,0.8,0.38", "w:0,0.35,1,0.75", "x:0.7,1,0.45,0",
               "y:0.2,0.95,0.5,0.55", "z:0.6,0.1,0.95,0.45"]
LINE_SETS = {"tuning": DEFAULT_LINES, "held_out": HELD_OUT_LINES, "fresh": FRESH_LINES}
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
    zones = _peer_zones(sv, lines, width, height)
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

# (lines, width, height, class names, processing fps, confidence) -> an object with step() and finish()
StageFactory = Callable[[list[LineConfig], int, int, list[str], float, float], Any]
# Extra sweep points by absolute rate: `count --fps 5` on PETS09 is the case, whatever its file says.
EXTRA_FPS = {"PETS09-S2L1": (5.0,)}


def default_model(threads: int = 2) -> ModelConfig:
    return ModelConfig(path=SHARED / "models" / "yolox_nano.onnx", threads=threads, classes=["person"])


def counting_stage(lines: list[LineConfig], width: int, height: int, names: list[str], fps: float,
                   confidence: float) -> Any:
    """Our counting stage built exactly as ``count_video`` builds it (fps: the processing rate)."""
    from edge_agent.vision.stage import CountingStage

    return CountingStage(lines, [], width, height, names, fps=fps, confidence=confidence)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def cache_key(clip: str, model: ModelConfig) -> str:
    """What the boxes depend on: the model file, the settings that change boxes (not threads or
    providers), the decoder's code (a change to NMS must not reuse stale boxes) and the video."""
    import edge_agent.vision.detect as detect_module

    parts = [_digest(Path(model.path)), model.format, model.input_size, model.confidence, model.nms_iou,
             model.classes, _digest(Path(detect_module.__file__)), _digest(clip_video(clip))]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:12]


def clip_video(clip: str) -> Path:
    return SHARED / "footage" / clip / CLIPS[clip]


def detect_every_frame(clip: str, model: ModelConfig) -> list[Detections]:
    detector = Detector(model)
    return [detector.run(image) for _, image in iter_file_frames(clip_video(clip))]


def _save_detections(path: Path, dets: list[Detections]) -> None:
    """One array per field with per-frame counts: an .npz of thousands of tiny arrays loads slowly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")  # written whole, then renamed: a killed run leaves no half cache
    np.savez(tmp, counts=np.array([len(d) for d in dets], np.int64),
             xyxy=np.concatenate([d.xyxy.reshape(-1, 4) for d in dets]).astype(np.float32),
             scores=np.concatenate([d.scores for d in dets]).astype(np.float32),
             class_ids=np.concatenate([d.class_ids for d in dets]).astype(np.int32))
    tmp.replace(path)


def _load_detections(path: Path) -> list[Detections]:
    with np.load(path) as z:
        ends = np.cumsum(z["counts"])
        xyxy, scores, class_ids = z["xyxy"], z["scores"], z["class_ids"]
    starts = ends - np.diff(ends, prepend=0)
    return [Detections(xyxy[a:b], scores[a:b], class_ids[a:b], {}) for a, b in zip(starts, ends)]


def clip_detections(clip: str, model: ModelConfig, cache: Path | None) -> tuple[list[Detections], str, str]:
    """Every frame's detections of ``clip``, where they came from ("cache", "detected", "detected+saved")
    and their cache key ("" without a cache)."""
    if cache is None:
        return detect_every_frame(clip, model), "detected", ""
    key = cache_key(clip, model)
    path = Path(cache) / f"{clip}-{key}.npz"
    if path.is_file():
        return _load_detections(path), "cache", key
    dets = detect_every_frame(clip, model)
    _save_detections(path, dets)
    return dets, "detected+saved", key


def cached_peer(cache: Path | None, detections_key: str, frames: list[tuple[int, Detections]],
                lines: list[LineConfig], size: tuple[int, int], fps: float) -> dict | None:
    """``peer_on``, kept in ``cache`` by everything it depends on: the detections, the frames, the
    lines, supervision's version and this script (which holds the peer's code)."""
    if cache is None:
        return peer_on(frames, lines, size, fps)
    try:
        sv_version = version("supervision")
    except PackageNotFoundError:
        return None
    parts = [detections_key, sv_version, _digest(Path(__file__)), [x.model_dump(mode="json") for x in lines],
             [i for i, _ in frames], size, fps]
    path = Path(cache) / f"peer-{hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    counts = peer_on(frames, lines, size, fps)
    if counts is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(counts))
    return counts


def kept_frames(dets: list[Detections], src_fps: float, fps: float | None) -> list[tuple[int, Detections]]:
    """The frames ``count --fps`` and a camera at ``fps`` process (FrameSampler; None: every frame)."""
    sampler = FrameSampler(fps)
    return [(i, d) for i, d in enumerate(dets) if sampler.take(i / src_fps)]


def _tally(crossings: list, lines: list[LineConfig]) -> dict:
    counts = {x.id: {"in": 0, "out": 0} for x in lines}
    for c in crossings:
        counts[c.line][c.direction] += 1
    return counts


def ours_on(frames: list[tuple[int, Detections]], lines: list[LineConfig], size: tuple[int, int], src_fps: float,
            fps: float, names: list[str], confidence: float, factory: StageFactory = counting_stage) -> dict:
    """Our stage on ``frames``, stepped with the source clock as ``count_video`` steps it."""
    stage = factory(lines, *size, names, fps, confidence)
    crossings = [c for i, d in frames for c in stage.step(d, i, i / src_fps).crossings]
    return _tally(crossings + list(stage.finish()), lines)


def _peer_zones(sv, lines: list[LineConfig], width: int, height: int) -> dict:
    return {x.id: sv.LineZone(start=sv.Point(x.points[0][0] * width, x.points[0][1] * height),
                              end=sv.Point(x.points[1][0] * width, x.points[1][1] * height),
                              triggering_anchors=[sv.Position.BOTTOM_CENTER], minimum_crossing_threshold=3)
            for x in lines}


def peer_on(frames: list[tuple[int, Detections]], lines: list[LineConfig], size: tuple[int, int],
            fps: float) -> dict | None:
    """supervision ByteTrack (told the processing rate) + LineZone, as run_peer, on the same frames."""
    try:
        import supervision as sv
    except ImportError:
        return None
    tracker = sv.ByteTrack(frame_rate=max(1, int(round(fps))))
    zones = _peer_zones(sv, lines, *size)
    for _, d in frames:
        tracked = tracker.update_with_detections(sv.Detections(xyxy=d.xyxy, confidence=d.scores, class_id=d.class_ids))
        for zone in zones.values():
            zone.trigger(tracked)
    swap = _peer_direction_is_swapped(sv)
    return {k: ({"in": z.out_count, "out": z.in_count} if swap else {"in": z.in_count, "out": z.out_count})
            for k, z in zones.items()}


def _pct(error: int, total: int) -> float:
    return round(100 * error / max(total, 1), 1)


def _score(entry: dict, who: str, counts: dict | None, truth: dict, total: int) -> None:
    if counts is None:
        return
    error = sum(error_of(counts[k], truth[k]) for k in truth)
    entry.update({who: counts, f"{who}_error": error, f"{who}_pct": _pct(error, total)})


def rate_key(r: float) -> str:
    """"1.0", "0.5", "0.3333", "0.2": the JSON keys of the rates (1 and 1.0 alike)."""
    return str(round(float(r), 4))


def _points(src_fps: float, rates, extra: tuple[float, ...]) -> list[tuple[str, float | None]]:
    """(key, fps for FrameSampler) of each sweep point; the full rate is count's default (fps None)."""
    points = [(rate_key(r), None if r == 1 else src_fps * r) for r in rates]
    return points + [(f"fps={f:g}", f) for f in extra]


def sweep(cache_dir: Path | None, line_sets: dict[str, list[str]] | None = None, rates=RATES,
          clips=tuple(CLIPS), *, model: ModelConfig | None = None, extra_fps: dict | None = None,
          factory: StageFactory = counting_stage, peer: bool = True, with_floors: bool = True) -> dict:
    """Counting error of ours (``factory``'s stage) and the peer at each rate, per line set and clip.

    ``{"sets": {set: {"clips": {clip: {"truth", "truth_total", "rates": {key: entry}}}, "total_pct"}}}``;
    keys are ``rate_key(r)`` and ``fps=N`` for ``extra_fps`` (default: PETS09 at 5 fps); an entry has
    fps, frames, ours, ours_error, ours_pct (and the same for peer, and for the reference pipelines
    ``oracle`` and ``gt_boxes`` of count_floors.py). ``peer=False`` skips the peer, ``with_floors=False``
    the references."""
    model = model or default_model()
    line_sets = line_sets or LINE_SETS
    extra_fps = EXTRA_FPS if extra_fps is None else extra_fps
    parsed = {name: [parse_line_arg(s) for s in specs] for name, specs in line_sets.items()}
    names = list(Detector(model).names)
    out: dict = {"rates": [round(float(r), 4) for r in rates], "clips": {}, "seconds": {"detections": 0.0, "ours": 0.0,
                 "peer": 0.0}, "sets": {name: {"clips": {}} for name in line_sets}}
    for clip in clips:
        width, height, src_fps, _ = video_size(clip_video(clip))
        started = time.perf_counter()
        dets, source, dets_key = clip_detections(clip, model, cache_dir)
        out["seconds"]["detections"] += time.perf_counter() - started
        gt = load_gt(clip)
        gt_frames = by_frame(gt)
        points = _points(src_fps, rates, tuple(extra_fps.get(clip, ())))
        frames = {key: kept_frames(dets, src_fps, fps) for key, fps in points}
        out["clips"][clip] = {"src_fps": src_fps, "frames": len(dets), "detections": source,
                              "kept": {key: [i for i, _ in f[:12]] for key, f in frames.items()}}
        for name, lines in parsed.items():
            truth = {x.id: true_counts(gt, x, width, height) for x in lines}  # at the full rate, for every rate
            total = sum(t["in"] + t["out"] for t in truth.values())
            per_rate = {}
            for key, fps in points:
                rate_fps = processing_fps(src_fps, fps)
                entry = {"fps": round(rate_fps, 3), "frames": len(frames[key])}
                t0 = time.perf_counter()
                ours = ours_on(frames[key], lines, (width, height), src_fps, rate_fps, names, model.confidence, factory)
                t1 = time.perf_counter()
                theirs = cached_peer(cache_dir, dets_key, frames[key], lines, (width, height), rate_fps) \
                    if peer else None
                out["seconds"]["ours"] += t1 - t0
                out["seconds"]["peer"] += time.perf_counter() - t1
                _score(entry, "ours", ours, truth, total)
                _score(entry, "peer", theirs, truth, total)
                if with_floors:
                    refs = floors(gt_frames, frames[key], lines, (width, height), src_fps, rate_fps, names,
                                  model.confidence, factory, ours_on)
                    for who, counts in refs.items():
                        _score(entry, who, counts, truth, total)
                per_rate[key] = entry
            out["sets"][name]["clips"][clip] = {"truth": truth, "truth_total": total, "rates": per_rate}
    for name in line_sets:
        out["sets"][name]["total_pct"] = _totals(out["sets"][name]["clips"], rates)
    out["seconds"] = {k: round(v, 2) for k, v in out["seconds"].items()}
    return out


def _totals(per_clip: dict, rates) -> dict:
    """Error % per rate over all clips (summed errors over summed truth): ours, the peer and the
    reference pipelines, each where every clip has it."""
    out = {}
    for r in rates:
        entries = [c["rates"][rate_key(r)] for c in per_clip.values()]
        truth = sum(c["truth_total"] for c in per_clip.values())
        out[rate_key(r)] = {who: _pct(sum(e[f"{who}_error"] for e in entries), truth)
                            for who in ("ours", "peer", "oracle", "gt_boxes")
                            if all(f"{who}_error" in e for e in entries)}
    return out


def line_at_every_rate(result: dict, set_name: str, clip: str, line: str) -> dict | None:
    """One line's truth and in/out at every sweep point, ours and peer (PETS09 ``v`` in the issue)."""
    data = result["sets"].get(set_name, {}).get("clips", {}).get(clip)
    if data is None or line not in data["truth"]:
        return None
    return {"set": set_name, "clip": clip, "line": line, "truth": data["truth"][line],
            **{key: {who: e[who][line] for who in ("ours", "peer") if who in e} for key, e in data["rates"].items()}}


def _label(key: str) -> str:
    return key if key.startswith("fps=") else f"1/{1 / float(key):.0f}"


def _cell(e: dict) -> str:
    return f"{e['ours_pct']:5.1f} / {e['peer_pct'] if 'peer_pct' in e else '-':>5}"


def print_sweep_table(result: dict) -> None:
    """Error % of the true crossings, ours / peer: clip x rate for each line set, then line v."""
    err = sys.stderr
    for set_name, data in result["sets"].items():
        print(f"{set_name}: error % of true crossings, ours / peer", file=err)
        for clip, c in data["clips"].items():
            cells = "  ".join(f"{_label(k)}: {_cell(e)}" for k, e in c["rates"].items())
            print(f"  {clip:15s} ({c['truth_total']:3d} true, {result['clips'][clip]['src_fps']:g} fps)  {cells}",
                  file=err)
        cells = "  ".join(f"{_label(k)}: {v['ours']:5.1f} / {v.get('peer', '-'):>5}"
                          for k, v in data["total_pct"].items())
        print(f"  {'all clips':31s}  {cells}", file=err)
        for who, label in (("oracle", "perfect tracker"), ("gt_boxes", "perfect detector")):
            if all(who in v for v in data["total_pct"].values()):
                cells = "  ".join(f"{_label(k)}: {v[who]:5.1f}" for k, v in data["total_pct"].items())
                print(f"  {'  all clips, ' + label:31s}  {cells}", file=err)
    v = result.get("pets_v")
    if v:
        t = v["truth"]
        cells = "  ".join(f"{_label(k)}: {e['ours']['in']}/{e['ours']['out']}"
                          + (f" (peer {e['peer']['in']}/{e['peer']['out']})" if "peer" in e else "")
                          for k, e in v.items() if k not in ("set", "clip", "line", "truth"))
        print(f"PETS09 v, truth {t['in']}/{t['out']}, in/out:  {cells}", file=err)
    print(f"seconds: {result['seconds']}", file=err)


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


def run_sweep(cache: Path | None, model: ModelConfig, video: Path, lines: list[LineConfig], repeat: int,
              with_speed: bool) -> dict:
    """``--sweep``: the table on stderr; with ``--speed`` also the full pipelines' fps on ``video``."""
    started = time.perf_counter()
    result = sweep(cache, LINE_SETS, model=model)
    result["seconds"]["sweep"] = round(time.perf_counter() - started, 2)
    result["pets_v"] = line_at_every_rate(result, "tuning", "PETS09-S2L1", "v")
    print_sweep_table(result)
    if with_speed:
        s = result["speed"] = speed(video, model, lines, repeat)
        s["timing"] = s.pop("result")["timing"]  # count_video's ms per frame of each stage, of our last run
        print(f"speed on {video.name}, best of {repeat}: ours {s['fps']} fps, peer {s.get('peer_fps', '-')} fps, "
              f"ours/peer {s.get('speed_vs_peer', '-')}; pre+post+tracking {s['overhead_vs_inference_pct']} % "
              "of inference", file=sys.stderr)
    return result


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
        print(json.dumps(run_sweep(args.cache, model, video, lines, args.repeat, args.speed)))
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
