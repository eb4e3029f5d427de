"""``edge-agent count`` for people at a terminal: --annotate, --events, the progress bar, help,
--version and the human summary; the real runs use the real model on real footage."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import cv2
import numpy as np
import pytest

import edge_agent
from edge_agent.cli import build_parser
from edge_agent.vision.capture import iter_file_frames, video_size
from edge_agent.vision.count import Crossing
from edge_agent.vision.offline import event_rows, processed_frame_count

REPO = Path(__file__).resolve().parents[2]
EDGE_AGENT = [sys.executable, "-m", "edge_agent"]
LINE = "v:0.5,0,0.5,1"  # TUD-Campus: people walk across the middle (gt: 1 in, 4 out)


def count(*args: str, cwd: Path = REPO, timeout: float = 110) -> subprocess.CompletedProcess[str]:
    """The command with stdout and stderr captured (so stderr is not a TTY)."""
    return subprocess.run([*EDGE_AGENT, "count", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def count_on_a_terminal(*args: str, timeout: float = 110) -> tuple[int, str, str]:
    """The command with stderr on a pseudo-terminal of 120 columns: (exit code, stdout, terminal output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen([*EDGE_AGENT, "count", *args], stdout=subprocess.PIPE, stderr=slave, cwd=REPO)
    os.close(slave)
    terminal = b""
    try:
        while chunk := os.read(master, 65536):
            terminal += chunk
    except OSError:  # EIO: every writer closed the terminal (the process ended)
        pass
    finally:
        os.close(master)
    stdout, _ = proc.communicate(timeout=timeout)
    return proc.returncode, stdout.decode(), terminal.decode(errors="replace")


# --- fast: arguments, help, version ----------------------------------------------------------

def test_version_prints_the_package_version() -> None:
    out = subprocess.run([*EDGE_AGENT, "--version"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == f"edge-agent {edge_agent.__version__}"


def test_help_explains_direction_classes_coordinates_and_rate() -> None:
    out = subprocess.run([*EDGE_AGENT, "count", "--help"], capture_output=True, text=True, timeout=60, cwd=REPO,
                         env={**os.environ, "COLUMNS": "400"})  # one line per option: phrases are not wrapped
    assert out.returncode == 0
    text = out.stdout
    assert "'in' = crossing from the left to the right of P1->P2 as seen on screen" in text
    assert "(default: person)" in text and "normalised 0..1" in text
    assert "--fps 5 reproduces the live rate" in text and "default: every frame" in text
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    undocumented = [a.dest for a in sub.choices["count"]._actions if not a.help]  # argparse has no public list
    assert undocumented == []


@pytest.mark.parametrize("args, message", [
    (["--annotate", "out.gif"], "--annotate out.gif: the file name must end in .mp4, .avi, .mkv"),
    (["--annotate", "no/such/dir/out.mp4"], "--annotate no/such/dir/out.mp4: cannot write a video there"),
    (["--events", "no/such/dir/ev.jsonl"], "--events no/such/dir/ev.jsonl: cannot write"),
])
def test_an_output_that_cannot_be_written_is_exit_2_before_processing(model_path, footage, tmp_path, args,
                                                                       message) -> None:
    out = count(str(footage("TUD-Campus")), "--model", str(model_path), "--line", LINE, *args, cwd=tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("edge-agent count: " + message), line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fps", [None, 30.0, 25.0, 7.0, 5.0, 1.0])
def test_the_bar_total_is_the_number_of_frames_processed(tmp_path, fps) -> None:
    """The progress bar's total from the frame count equals what the file reader yields at --fps."""
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 25, (64, 48))
    for i in range(23):
        writer.write(np.full((48, 64, 3), i * 10, np.uint8))
    writer.release()
    _, _, src_fps, frames = video_size(video)
    assert frames == 23
    assert processed_frame_count(frames, src_fps, fps) == sum(1 for _ in iter_file_frames(video, fps))


def test_events_are_in_video_order_with_seconds_into_the_video() -> None:
    crossings = [Crossing("v", "in", "person", 4, 30, 1.2), Crossing("h", "out", "car", 2, 12, 0.48),
                 Crossing("v", "out", "person", 9, 30, 1.2)]
    assert event_rows(crossings) == [
        {"line": "h", "direction": "out", "class": "car", "track_id": 2, "frame": 12, "t": 0.48},
        {"line": "v", "direction": "in", "class": "person", "track_id": 4, "frame": 30, "t": 1.2},
        {"line": "v", "direction": "out", "class": "person", "track_id": 9, "frame": 30, "t": 1.2},
    ]


# --- slow: real runs -------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(180)
def test_annotated_video_and_events_of_a_real_clip(model_path, footage, tmp_path) -> None:
    video = footage("TUD-Campus")
    out = count(str(video), "--model", str(model_path), "--line", LINE, "--zone", "left:0,0;0.5,0;0.5,1;0,1",
                "--annotate", str(tmp_path / "out.mp4"), "--events", str(tmp_path / "ev.jsonl"), "--json")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""  # no progress bar with --json (nor off a terminal)
    result = json.loads(out.stdout)
    width, height, src_fps, source_frames = video_size(video)

    annotated = cv2.VideoCapture(str(tmp_path / "out.mp4"))
    raw = cv2.VideoCapture(str(video))
    try:
        assert (int(annotated.get(cv2.CAP_PROP_FRAME_WIDTH)), int(annotated.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (
            width, height)
        frames = 0
        while True:
            ok, image = annotated.read()
            if not ok:
                break
            ok_raw, source = raw.read()
            assert ok_raw
            if frames in (0, result["frames"] // 2):
                # The line runs down the middle: drawn there (yellow) on the annotated frames only.
                x = round(0.5 * width)
                ys = [round(height * k) for k in (0.05, 0.15, 0.85, 0.95)]  # away from the arrow and label
                drawn = [int(np.abs(image[y, x].astype(int) - source[y, x].astype(int)).max()) for y in ys]
                assert min(drawn) > 40, drawn
            frames += 1
    finally:
        annotated.release()
        raw.release()
    assert frames == result["frames"] == source_frames

    rows = [json.loads(line) for line in (tmp_path / "ev.jsonl").read_text().splitlines()]
    totals = result["lines"]["v"]
    assert len(rows) == totals["in"] + totals["out"] >= 3
    for row in rows:
        assert set(row) == {"line", "direction", "class", "track_id", "frame", "t"}
        assert row["line"] == "v" and row["class"] == "person" and row["direction"] in ("in", "out")
        assert isinstance(row["track_id"], int) and row["track_id"] > 0
        assert 0 <= row["frame"] < source_frames and row["t"] == round(row["frame"] / src_fps, 3)
    assert [r["frame"] for r in rows] == sorted(r["frame"] for r in rows)
    assert sum(r["direction"] == "in" for r in rows) == totals["in"]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_summary_lists_every_requested_class_and_no_bar_off_a_terminal(model_path, footage) -> None:
    out = count(str(footage("TUD-Campus")), "--model", str(model_path), "--line", LINE,
                "--classes", "person,car", "--fps", "5")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    [line] = [s for s in out.stdout.splitlines() if s.startswith("line v:")]
    assert "car 0" in line and line.count("car 0") == 2 and line.count("person") == 2, line
    assert out.stdout.startswith("15 frames")  # 71 frames at 25 fps, every fifth


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_progress_bar_on_a_terminal(model_path, footage) -> None:
    code, stdout, terminal = count_on_a_terminal(str(footage("TUD-Campus")), "--model", str(model_path),
                                                 "--line", LINE, "--fps", "5")
    assert code == 0, terminal
    # "counting:  27%|███▋   | 4/15 [00:00<00:00, 38.34frame/s]": done/total, elapsed<ETA, rate
    assert re.search(r"counting: +\d+%\|.*\| \d+/15 \[\d\d:\d\d<[?\d:]+, [?\d.]+frame/s\]", terminal), terminal
    assert stdout.startswith("15 frames")  # the summary stays on stdout
