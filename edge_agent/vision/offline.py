"""``edge-agent count VIDEO``: the counting stage over a video file, offline."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from edge_agent.common.config import problem_lines
from edge_agent.vision.capture import (
    StreamError,
    iter_file_frames,
    map_ahead,
    video_size,
)
from edge_agent.vision.config import LineConfig, ModelConfig, ZoneConfig
from edge_agent.vision.count import Crossing
from edge_agent.vision.detect import Detector, ModelFormatError, UnknownClassError
from edge_agent.vision.stage import CountingStage, StepResult, StepTally


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


def count_video(video: str | Path, detector: Detector, lines: list[LineConfig], zones: list[ZoneConfig], *,
                fps: float | None = None, max_frames: int | None = None,
                on_step: Callable[[int, StepResult], None] | None = None) -> CountReport:
    """Count a video file offline with the same stages as the daemon."""
    width, height, src_fps, _ = video_size(video)
    stage = CountingStage(lines, zones, width, height, detector.names,
                          fps=min(fps or src_fps, src_fps), confidence=detector.confidence)
    report = CountReport()
    started = time.perf_counter()
    frames = iter_file_frames(video, fps, transform=detector.prepare)
    for index, dets in map_ahead(frames, detector.run_prepared, name=f"detect-{Path(video).name}"):
        if max_frames is not None and report.frames >= max_frames:
            break
        step = stage.step(dets, index, index / src_fps)
        report.add_step(step, dets.timing_ms)
        for c in step.crossings:
            report.add_crossing(c)
        if on_step is not None:
            on_step(index, step)
    for c in stage.finish():
        report.add_crossing(c)
    report.seconds = time.perf_counter() - started
    return report


def _print_human(result: dict[str, Any]) -> None:
    print(f"{result['frames']} frames in {result['seconds']} s ({result['fps']} fps)")
    for line, c in result["lines"].items():
        print(f"line {line}: in {c['in']}, out {c['out']}")
    for zone, z in result["zones"].items():
        print(f"zone {zone}: occupancy avg {z['avg']}, max {z['max']}")
    t = result["timing"]
    print("per frame: " + ", ".join(f"{k} {v}" for k, v in t.items()))


def count_command(args: argparse.Namespace) -> int:
    """``edge-agent count``: exit 0, or 2 with one clear line on stderr for unusable input."""
    try:
        lines = [parse_line_arg(s) for s in args.line]
        zones = [parse_zone_arg(s) for s in args.zone]
        if not lines and not zones:
            raise UsageError("give at least one --line or --zone")
        ids = [x.id for x in lines] + [z.id for z in zones]
        if len(set(ids)) != len(ids):
            raise UsageError("line and zone ids must be unique")
        if args.fps is not None and args.fps <= 0:
            raise UsageError("--fps must be positive")
        model = ModelConfig(path=Path(args.model), format=args.format,
                            classes=[c.strip() for c in args.classes.split(",") if c.strip()],
                            **({"confidence": args.confidence} if args.confidence is not None else {}),
                            **({"threads": args.threads} if args.threads is not None else {}))
        detector = Detector(model)
        report = count_video(args.video, detector, lines, zones, fps=args.fps)
    except (UsageError, ModelFormatError, UnknownClassError, FileNotFoundError, StreamError) as e:
        print(f"edge-agent count: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:
        print(f"edge-agent count: {problem_lines(e)[0]}", file=sys.stderr)
        return 2
    result = report.as_dict([x.id for x in lines], [z.id for z in zones])
    if args.json:
        print(json.dumps(result))
    else:
        _print_human(result)
    return 0
