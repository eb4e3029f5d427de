"""The ``edge-agent`` console script: one subcommand per DESIGN command.

Thin dispatch: each command imports its side lazily, after checking that the side's pip extra
is installed, so a bridge host without OpenCV (or a camera host without a Kafka client) gets
one line saying what to install instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

from edge_agent import __version__
from edge_agent.common.config import ConfigError, print_problems

# Top-level modules of each extra in pyproject.toml (import names, not distribution names).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "agent": ("numpy", "cv2", "onnxruntime", "lap", "diskcache", "watchdog", "json_merge_patch", "tqdm"),
    "bridge": ("confluent_kafka", "pika", "fastapi", "uvicorn"),
    "consumer": ("confluent_kafka", "psycopg"),
}
VISION_MODULES = ("numpy", "cv2", "onnxruntime", "lap", "tqdm")  # what `count` imports


def missing_modules(names: tuple[str, ...]) -> list[str]:
    """The modules of ``names`` that cannot be imported here (found without importing them)."""
    return [name for name in names if importlib.util.find_spec(name) is None]


def require_extra(extra: str, command: str, modules: tuple[str, ...] | None = None) -> None:
    """Exit 2 with the pip line to run when ``command`` lacks a module of its extra."""
    missing = missing_modules(modules if modules is not None else EXTRA_MODULES[extra])
    if missing:
        print(f"edge-agent {command}: missing {', '.join(missing)}; install the {extra} extra: "
              f"pip install 'edge-agent[{extra}]'", file=sys.stderr)
        raise SystemExit(2)


def _cmd_check_config(args: argparse.Namespace) -> int:
    from edge_agent.common.envfile import read_env_file
    from edge_agent.config_check import check_file

    env = dict(os.environ)
    for env_file in args.env_file:
        try:
            env.update(read_env_file(Path(env_file)))  # as systemd: the file's values win
        except (OSError, UnicodeDecodeError) as e:
            print(f"--env-file: cannot read {env_file}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
            return 2
    kind, problems = check_file(Path(args.config), env=env, files=not args.skip_files)
    if problems:
        return print_problems(problems)
    print(f"{args.config}: valid {kind} config")
    return 0


def _load_or_exit(loader, path: str):
    try:
        return loader(Path(path))
    except ConfigError as e:
        raise SystemExit(print_problems(e.problems))


def _cmd_run(args: argparse.Namespace) -> int:
    require_extra("agent", "run")
    from edge_agent.agent.daemon import run_agent

    return run_agent(Path(args.config))


def _cmd_bridge(args: argparse.Namespace) -> int:
    require_extra("bridge", "bridge")
    from edge_agent.bridge.daemon import run_bridge

    return run_bridge(Path(args.config))


def _cmd_consume(args: argparse.Namespace) -> int:
    require_extra("consumer", "consume", ("confluent_kafka",))
    if args.from_ts is None and args.to_ts is None:
        from edge_agent.consumer.daemon import run_consume

        return run_consume(Path(args.config))
    from edge_agent.consumer.replay import replay_command

    return replay_command(Path(args.config), args.from_ts, args.to_ts)


def _cmd_topics(args: argparse.Namespace) -> int:
    require_extra("consumer", "topics", ("confluent_kafka",))
    from edge_agent.consumer.topics import ensure_command

    return ensure_command(Path(args.config), dry_run=args.dry_run)


def _cmd_counts(args: argparse.Namespace) -> int:
    require_extra("consumer", "counts", ("psycopg",))
    from edge_agent.consumer.counts import counts_command

    return counts_command(args)


def _cmd_outbox(args: argparse.Namespace) -> int:
    require_extra("agent", "outbox", ("diskcache",))
    from edge_agent.agent.config import load_agent
    from edge_agent.agent.outbox import Outbox

    cfg = _load_or_exit(load_agent, args.config)
    with Outbox.open_readonly(cfg.outbox) as box:
        print(json.dumps(box.stats(), indent=None if args.json else 2))
    return 0


def _cmd_count(args: argparse.Namespace) -> int:
    require_extra("agent", "count", VISION_MODULES)
    from edge_agent.vision.offline import count_command

    return count_command(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent", description=__doc__)
    p.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("run", help="the camera-host daemon")
    s.add_argument("-c", "--config", required=True)
    s.set_defaults(func=_cmd_run)

    s = sub.add_parser("bridge", help="the MQTT -> Kafka bridge daemon with its HTTP API")
    s.add_argument("-c", "--config", required=True)
    s.set_defaults(func=_cmd_bridge)

    s = sub.add_parser("check-config", help="validate an agent, bridge or consumer config file",
                       description="Validate an agent, bridge or consumer config file as the daemon would read it on "
                                   "this host: exit 0, or 2 with one 'path: problem' line per problem.")
    s.add_argument("-c", "--config", required=True, help="the YAML file (agent, bridge or consumer: told apart by its keys)")
    s.add_argument("--env-file", action="append", default=[], metavar="FILE",
                   help="a systemd EnvironmentFile (KEY=VALUE lines) the service gets, e.g. "
                        "/etc/edge-agent/agent.env: its variables count as set for the *_env keys")
    s.add_argument("--skip-files", action="store_true",
                   help="do not check the files the config names (model, TLS certificates and keys): "
                        "for a config checked away from the host it is meant for")
    s.set_defaults(func=_cmd_check_config)

    s = sub.add_parser("consume", help="a downstream consumer group: the central topics into PostgreSQL or a handler",
                       description="Consume the central topics as a consumer group and apply each record once "
                                   "(DESIGN 'Downstream'). With --from/--to: replay that time window with a group "
                                   "of its own, up to the end offsets seen at the start, then exit.")
    s.add_argument("-c", "--config", required=True, help="the consumer YAML file (examples/consumer.yaml)")
    s.add_argument("--from", dest="from_ts", default=None, metavar="TS",
                   help="replay from this time (RFC 3339, e.g. 2026-12-01T00:00:00Z)")
    s.add_argument("--to", dest="to_ts", default=None, metavar="TS", help="replay up to this time (default: now)")
    s.set_defaults(func=_cmd_consume)

    s = sub.add_parser("topics", help="central Kafka topics")
    topics_sub = s.add_subparsers(dest="topics_command", required=True)
    t = topics_sub.add_parser("ensure", help="create the central topics and converge their settings",
                              description="Create the central topics with their partitions, replication and "
                                          "retention (central_topics in the consumer file; dlq: 7 days, 1-day "
                                          "segments) and converge the settings of existing ones.")
    t.add_argument("-c", "--config", required=True, help="the consumer YAML file")
    t.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")
    t.set_defaults(func=_cmd_topics)

    s = sub.add_parser("counts", help="print the line counts the consumer stored in PostgreSQL")
    s.add_argument("-c", "--config", required=True, help="the consumer YAML file (its sink.postgres)")
    s.add_argument("--device", default=None)
    s.add_argument("--camera", default=None)
    s.add_argument("--line", default=None)
    s.add_argument("--class", dest="class_name", default=None, help="only this class")
    s.add_argument("--since", default=None, metavar="TS", help="buckets starting at or after (RFC 3339)")
    s.add_argument("--until", default=None, metavar="TS", help="buckets starting before (RFC 3339)")
    s.add_argument("--bucket", default=None, metavar="DURATION",
                   help="sum into buckets of this size (15m, 1h, 1d; whole minutes); default: one total")
    s.add_argument("--json", action="store_true", help="one line of JSON instead of a table")
    s.set_defaults(func=_cmd_counts)

    s = sub.add_parser("outbox", help="show the outbox: depth, bytes, oldest entry age, per stream")
    s.add_argument("-c", "--config", required=True)
    s.add_argument("--json", action="store_true", help="one line of JSON")
    s.set_defaults(func=_cmd_outbox)

    s = sub.add_parser(
        "count", help="count a video file offline with the same pipeline as run",
        description="Count people (or other classes) crossing lines and standing in zones of a video file, "
                    "with the same detector, tracker and counting rules as a camera in `run`. Coordinates "
                    "are normalised: 0..1 across the frame's width (x, left to right) and height (y, top "
                    "to bottom). A line counts 'in' when a track crosses it from the left-hand side of "
                    "P1->P2 to its right-hand side as seen on screen, and 'out' the other way; the "
                    "annotated video draws an arrow pointing to the 'in' side.",
        epilog="Every frame of the file is processed unless --fps is given, while a camera in `run` "
               "processes at its `fps` setting (default 5): --fps 5 reproduces the live rate and counts.")
    s.add_argument("video", help="the video file to count (any format OpenCV reads: .mp4, .avi, .mkv, ...)")
    s.add_argument("--model", required=True, help="the ONNX detection model file, e.g. models/yolox_nano.onnx")
    s.add_argument("--format", default="yolox", choices=["yolox", "yolov8"],
                   help="the model's output layout (default: yolox)")
    s.add_argument("--line", action="append", default=[], metavar="ID:x1,y1,x2,y2",
                   help="a counting line from P1 (x1,y1) to P2 (x2,y2), normalised 0..1; 'in' = crossing from "
                        "the left to the right of P1->P2 as seen on screen (y down), 'out' the other way; "
                        "repeat for more lines")
    s.add_argument("--zone", action="append", default=[], metavar="ID:x,y;x,y;…",
                   help="an occupancy zone: a polygon of three or more normalised 0..1 points; repeat for more")
    s.add_argument("--classes", default="person", metavar="CLASS[,CLASS…]",
                   help="the model classes to detect and count, comma-separated (default: person)")
    s.add_argument("--fps", type=float, default=None,
                   help="process at this rate (default: every frame); a camera in `run` processes at its "
                        "fps (default 5), so --fps 5 reproduces the live rate")
    s.add_argument("--confidence", type=float, default=None,
                   help="the detector's minimum score, 0..1 (default: model.confidence's default, as in run)")
    s.add_argument("--threads", type=int, default=None,
                   help="onnxruntime threads (default: model.threads's default, as in run)")
    s.add_argument("--annotate", metavar="OUT.mp4", default=None,
                   help="write every processed frame with the lines (arrow to the 'in' side, running counts), "
                        "zones (occupancy) and tracked boxes drawn: same size as the video, at the processing "
                        "rate (.mp4, .avi or .mkv)")
    s.add_argument("--events", metavar="OUT.jsonl", default=None,
                   help="write one JSON object per crossing, in the video's order: line, direction, class, "
                        "track_id, frame and t (seconds into the video)")
    s.add_argument("--json", action="store_true",
                   help="print the result as one line of JSON (and no progress bar)")
    s.set_defaults(func=_cmd_count)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
