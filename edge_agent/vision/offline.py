"""``edge-agent count VIDEO``: the counting stage over a video file, offline."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable

import cv2
import numpy as np
from pydantic import ValidationError
from tqdm import tqdm

from edge_agent.common.config import problem_lines
from edge_agent.vision.annotate import annotate
from edge_agent.vision.capture import (
    FrameSampler,
    StreamError,
    iter_file_frames,
    map_ahead,
    video_size,
)
from edge_agent.vision.config import LineConfig, ModelConfig, ZoneConfig
from edge_agent.vision.count import Crossing
from edge_agent.vision.detect import Detector, ModelFormatError, UnknownClassError
from edge_agent.vision.stage import CountingStage, StepResult, StepTally

# --annotate: the container by file extension and the codec OpenCV's bundled FFmpeg writes into it.
VIDEO_CODECS = {".mp4": "mp4v", ".avi": "MJPG", ".mkv": "mp4v"}


class UsageError(ValueError):
    """A command-line argument that cannot be used; the message says which and why."""


def _numbers(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{what}: not numbers") from None


def parse_line_arg(text: str) -> LineConfig:
    """``ID:x1,y1,x2,y2`` in normalised coordinates."""
    ident, sep, rest = text.partition(":")
    nums = _numbers(rest, f"--line {text!r}") if sep else []
    if not sep or len(nums) != 4:
        raise UsageError(f"--line {text!r}: expected ID:x1,y1,x2,y2 (normalised 0..1)")
    try:
        return LineConfig(id=ident, points=((nums[0], nums[1]), (nums[2], nums[3])))
    except ValidationError as e:
        raise UsageError(f"--line {text!r}: {e.errors()[0]['msg']}") from None


def parse_zone_arg(text: str) -> ZoneConfig:
    """``ID:x,y;x,y;x,y…`` in normalised coordinates."""
    ident, sep, rest = text.partition(":")
    if not sep:
        raise UsageError(f"--zone {text!r}: expected ID:x,y;x,y;x,y…")
    points = [_numbers(p, f"--zone {text!r}") for p in rest.split(";") if p.strip()]
    if any(len(p) != 2 for p in points):
        raise UsageError(f"--zone {text!r}: every point is x,y")
    try:
        return ZoneConfig(id=ident, polygon=[(p[0], p[1]) for p in points])
    except ValidationError as e:
        raise UsageError(f"--zone {text!r}: {problem_lines(e)[0]}") from None


@dataclass
class CountReport(StepTally):
    """A whole video's tally, with its wall time and every crossing in order."""

    seconds: float = 0.0
    crossings: list[Crossing] = field(default_factory=list)

    def add_crossing(self, c: Crossing) -> None:
        super().add_crossing(c)
        self.crossings.append(c)

    def as_dict(self, line_ids: list[str], zone_ids: list[str]) -> dict[str, Any]:
        n = max(self.frames, 1)
        timing = {f"{k}_ms": round(v / n, 3) for k, v in self.timing_sum.items()}
        overhead = sum(self.timing_sum[k] for k in ("preprocess", "postprocess", "tracking"))
        timing["overhead_vs_inference_pct"] = round(100 * overhead / max(self.timing_sum["inference"], 1e-9), 2)
        return {"frames": self.frames, "seconds": round(self.seconds, 3),
                "fps": round(self.frames / self.seconds, 2) if self.seconds else 0.0,
                "lines": self.totals.as_dict(line_ids), "zones": self.zones(zone_ids), "timing": timing}


# on_frame(image, step, tally so far) of count_video
FrameSink = Callable[[np.ndarray, StepResult, CountReport], None]


def count_video(video: str | Path, detector: Detector, lines: list[LineConfig], zones: list[ZoneConfig], *,
                fps: float | None = None, max_frames: int | None = None,
                on_step: Callable[[int, StepResult], None] | None = None,
                on_frame: FrameSink | None = None) -> CountReport:
    """Count a video file offline with the same stages as the daemon.

    ``on_frame(image, step, report)`` gets each processed frame's picture with its step and the
    tally so far; only then are the pictures kept past preprocessing.
    """
    width, height, src_fps, _ = video_size(video)
    stage = CountingStage(lines, zones, width, height, detector.names,
                          fps=processing_fps(src_fps, fps), confidence=detector.confidence)
    keep_images = on_frame is not None

    def prepare(image: np.ndarray) -> tuple[np.ndarray | None, Any]:
        return (image if keep_images else None), detector.prepare(image)

    def detect(item: tuple[np.ndarray | None, Any]) -> tuple[np.ndarray | None, Any]:
        return item[0], detector.run_prepared(item[1])

    report = CountReport()
    started = time.perf_counter()
    frames = iter_file_frames(video, fps, transform=prepare)
    for index, (image, dets) in map_ahead(frames, detect, name=f"detect-{Path(video).name}"):
        if max_frames is not None and report.frames >= max_frames:
            break
        step = stage.step(dets, index, index / src_fps)
        report.add_step(step, dets.timing_ms)
        for c in step.crossings:
            report.add_crossing(c)
        if on_frame is not None:
            on_frame(image, step, report)
        if on_step is not None:
            on_step(index, step)
    for c in stage.finish():
        report.add_crossing(c)
    report.seconds = time.perf_counter() - started
    return report


def processing_fps(src_fps: float, fps: float | None) -> float:
    """The rate frames are processed at: the source's, or ``--fps`` when lower."""
    return min(fps or src_fps, src_fps)


def processed_frame_count(frame_count: int, src_fps: float, fps: float | None) -> int:
    """How many of a file's ``frame_count`` frames ``iter_file_frames`` yields at ``fps`` (by the
    same FrameSampler, without decoding anything)."""
    sampler = FrameSampler(fps)
    return sum(sampler.take(i / src_fps) for i in range(max(frame_count, 0)))


class AnnotatedVideo:
    """``--annotate OUT``: every processed frame with the counting overlay, at the processing rate."""

    def __init__(self, path: Path, width: int, height: int, fps: float, lines: Sequence[LineConfig],
                 zones: Sequence[ZoneConfig], class_names: Sequence[str]):
        self.lines, self.zones, self.class_names = list(lines), list(zones), list(class_names)
        self.line_ids = [x.id for x in self.lines]
        codec = VIDEO_CODECS[path.suffix.lower()]  # checked by annotate_path
        self.writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, (width, height))
        if not self.writer.isOpened():
            raise UsageError(f"--annotate {path}: cannot write a video there (does the directory exist?)")

    def __call__(self, image: np.ndarray, step: StepResult, report: CountReport) -> None:
        self.writer.write(annotate(image, lines=self.lines, zones=self.zones, tracks=step.tracks,
                                   class_names=self.class_names, line_counts=report.totals.as_dict(self.line_ids),
                                   occupancy=step.occupancy))

    def close(self) -> None:
        self.writer.release()


def annotate_path(text: str) -> Path:
    path = Path(text)
    if path.suffix.lower() not in VIDEO_CODECS:
        raise UsageError(f"--annotate {text}: the file name must end in {', '.join(VIDEO_CODECS)}")
    return path


def open_events(text: str) -> IO[str]:
    """``--events OUT``, opened before processing so that a bad path fails first."""
    try:
        return open(text, "w", encoding="utf-8")
    except OSError as e:
        raise UsageError(f"--events {text}: cannot write: {e.strerror or e}") from None


def event_rows(crossings: Sequence[Crossing]) -> list[dict[str, Any]]:
    """One row per crossing in the video's order: ``t`` is seconds into the video (frame / fps)."""
    ordered = sorted(crossings, key=lambda c: c.frame)  # stable: same-frame crossings keep their order
    return [{"line": c.line, "direction": c.direction, "class": c.class_name, "track_id": c.track_id,
             "frame": c.frame, "t": round(c.ts, 3)} for c in ordered]


def progress_bar(total: int | None, *, enabled: bool) -> tqdm:
    """Frames done / total, rate and ETA on stderr; a no-op when not ``enabled``."""
    return tqdm(total=total or None, unit="frame", desc="counting", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True, leave=False)


def _print_human(result: dict[str, Any], classes: Sequence[str]) -> None:
    print(f"{result['frames']} frames in {result['seconds']} s ({result['fps']} fps)")
    for line, c in result["lines"].items():
        by_class = c["by_class"]
        names = list(dict.fromkeys([*classes, *by_class]))  # every requested class, zero counts too

        def per_class(direction: str) -> str:
            return ", ".join(f"{n} {by_class.get(n, {}).get(direction, 0)}" for n in names)

        print(f"line {line}: in {c['in']} ({per_class('in')}), out {c['out']} ({per_class('out')})")
    for zone, z in result["zones"].items():
        print(f"zone {zone}: occupancy avg {z['avg']}, max {z['max']}")
    t = result["timing"]
    print("per frame: " + ", ".join(f"{k} {v}" for k, v in t.items()))


def _model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(path=Path(args.model), format=args.format,
                       classes=[c.strip() for c in args.classes.split(",") if c.strip()],
                       **({"confidence": args.confidence} if args.confidence is not None else {}),
                       **({"threads": args.threads} if args.threads is not None else {}))


def _parse_regions(args: argparse.Namespace) -> tuple[list[LineConfig], list[ZoneConfig]]:
    lines = [parse_line_arg(s) for s in args.line]
    zones = [parse_zone_arg(s) for s in args.zone]
    if not lines and not zones:
        raise UsageError("give at least one --line or --zone")
    ids = [x.id for x in lines] + [z.id for z in zones]
    if len(set(ids)) != len(ids):
        raise UsageError("line and zone ids must be unique")
    if args.fps is not None and args.fps <= 0:
        raise UsageError("--fps must be positive")
    return lines, zones


def _run(args: argparse.Namespace, lines: list[LineConfig], zones: list[ZoneConfig], model: ModelConfig,
         closing: list[Callable[[], None]]) -> CountReport:
    """Open the outputs (any that cannot be written fails before processing), then count."""
    annotate_to = annotate_path(args.annotate) if args.annotate else None
    detector = Detector(model)
    width, height, src_fps, frame_count = video_size(args.video)
    events = open_events(args.events) if args.events else None
    if events is not None:
        closing.append(events.close)
    writer = None
    if annotate_to is not None:
        writer = AnnotatedVideo(annotate_to, width, height, processing_fps(src_fps, args.fps), lines, zones,
                                detector.names)
        closing.append(writer.close)
    bar = progress_bar(processed_frame_count(frame_count, src_fps, args.fps),
                       enabled=not args.json and sys.stderr.isatty())
    closing.append(bar.close)
    report = count_video(args.video, detector, lines, zones, fps=args.fps,
                         on_step=lambda _index, _step: bar.update(), on_frame=writer)
    if events is not None:
        events.writelines(json.dumps(row) + "\n" for row in event_rows(report.crossings))
    return report


def count_command(args: argparse.Namespace) -> int:
    """``edge-agent count``: exit 0, or 2 with one clear line on stderr for unusable input."""
    closing: list[Callable[[], None]] = []
    try:
        lines, zones = _parse_regions(args)
        model = _model_config(args)
        report = _run(args, lines, zones, model, closing)
    except (UsageError, ModelFormatError, UnknownClassError, FileNotFoundError, StreamError) as e:
        print(f"edge-agent count: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:
        print(f"edge-agent count: {problem_lines(e)[0]}", file=sys.stderr)
        return 2
    finally:
        for close in reversed(closing):
            close()
    result = report.as_dict([x.id for x in lines], [z.id for z in zones])
    if args.json:
        print(json.dumps(result))
    else:
        _print_human(result, model.classes)
    return 0
