#!/usr/bin/env python3
"""Benchmark of the bridge with a ``rabbitmq`` section, against real Mosquitto + a private RabbitMQ
node; prints one JSON line LAST.

(a) drain: ``--n`` envelopes (one device, one camera) queue in Mosquitto for persistent MQTT 3.1.1
    sessions while no bridge runs: ours (the real daemon, ``edge-agent bridge -c …``) and a naive
    bridge written here (paho 3.1.1, ``clean_session=False``, manual ack; pika ``SelectConnection``
    with publisher confirms, up to ``WINDOW`` unconfirmed; PUBACK only after the confirm; persistent
    messages; no validation, no dedupe, no e2e ack). Each bridge has a vhost of its own. Each then
    drains its copy of the backlog in a process of its own; msg/s = n / seconds from the start of the
    process until ``camera.queue`` holds n messages (a passive queue.declare every 10 ms); CPU µs per
    message is the process tree's CPU over that time (start-up included) / n. The queue is purged
    before each drain.
(b) latency: ``edge-agent bridge -c …`` runs on a vhost of its own; we publish stamped envelopes at
    ``--rate`` msg/s for ``--seconds`` (MQTT, QoS 1) and a pika consumer on ``camera.queue`` stamps
    each arrival: MQTT publish -> RabbitMQ consume. ``--latency-rounds`` runs, each with a fresh
    vhost and bridge process; medians, and each run's p95. ``bridge_cpu_pct``: the bridge's CPU
    meanwhile (on two cores it is taken from the brokers and the consumer, and shows as latency).

Helpers shared with the Kafka benchmark are imported from ``bench_bridge`` (beside this script).

Usage: .venv/bin/python scripts/bench_bridge_rabbitmq.py [--n 100000] [--rounds 2] [--rate 2000] [--seconds 10]
                                                         [--latency-rounds 2]
"""

from __future__ import annotations

import sys

WINDOW = 1000  # the naive bridge's unconfirmed publishes at most: Mosquitto's max_inflight_messages


def naive_main(argv: list[str]) -> None:
    """The naive bridge as a user would write it: paho and pika, nothing else imported.

    argv: MQTT port, AMQP port, vhost, client id, subscription. paho's network loop runs in its
    thread; pika's I/O loop in the main thread, woken once per batch of received messages.
    """
    import signal
    import threading
    from collections import deque
    from typing import Any

    import paho.mqtt.client as mqtt
    import pika
    from pika.adapters.select_connection import SelectConnection

    mqtt_port, amqp_port, vhost, client_id, subscription = argv
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    received: deque[tuple[int, str, bytes]] = deque()  # (mid, topic, payload), paho thread -> pika thread
    unconfirmed: dict[int, int] = {}  # delivery tag -> MQTT mid
    state: dict[str, Any] = {"tag": 0, "wake_due": False, "channel": None}
    lock = threading.Lock()
    props = pika.BasicProperties(content_type="application/json", delivery_mode=2)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False,
                         manual_ack=True)

    def pump() -> None:
        with lock:
            state["wake_due"] = False
        while received and len(unconfirmed) < WINDOW:
            mid, topic, payload = received.popleft()
            state["channel"].basic_publish("camera.events", topic.split("/")[1], payload, props)
            state["tag"] += 1
            unconfirmed[state["tag"]] = mid

    def on_confirm(frame: pika.frame.Method) -> None:
        m = frame.method
        tags = [t for t in unconfirmed if t <= m.delivery_tag] if m.multiple else [m.delivery_tag]
        for tag in tags:
            client.ack(unconfirmed.pop(tag), 1)
        pump()

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        received.append((msg.mid, msg.topic, msg.payload))
        with lock:
            wake, state["wake_due"] = not state["wake_due"], True
        if wake:
            conn.ioloop.add_callback_threadsafe(pump)

    def on_channel(ch: object) -> None:
        state["channel"] = ch
        steps = [lambda cb: ch.exchange_declare("camera.events", "topic", durable=True, callback=cb),
                 lambda cb: ch.queue_declare("camera.queue", durable=True, callback=cb),
                 lambda cb: ch.queue_bind("camera.queue", "camera.events", "#", callback=cb),
                 lambda cb: ch.confirm_delivery(on_confirm, callback=cb)]

        def run(i: int) -> None:
            if i < len(steps):
                steps[i](lambda _frame: run(i + 1))
                return
            client.on_message = on_message
            client.on_connect = lambda c, *_: c.subscribe(subscription, qos=1)
            client.connect("127.0.0.1", int(mqtt_port))
            client.loop_start()
        run(0)

    params = pika.ConnectionParameters("127.0.0.1", int(amqp_port), vhost, pika.PlainCredentials("guest", "guest"))
    conn = SelectConnection(params, on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
                            on_close_callback=lambda c, _r: c.ioloop.stop())
    conn.ioloop.start()


if __name__ == "__main__" and sys.argv[1:2] == ["--naive"]:
    naive_main(sys.argv[2:])
    sys.exit(0)

import argparse  # noqa: E402 - below: the orchestrator's imports, which the naive bridge does without
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import bench_bridge as bb  # noqa: E402 - beside this script: the script's directory is on sys.path
import paho.mqtt.client as mqtt  # noqa: E402
import pika  # noqa: E402
import yaml  # noqa: E402

from edge_agent.common.wire import STREAMS  # noqa: E402
from edge_testkit.mqtt import start_mosquitto  # noqa: E402
from edge_testkit.processes import free_port, wait_for  # noqa: E402
from edge_testkit.rabbitmq import RabbitNode  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
QUEUE = "camera.queue"  # the camera.events stream's queue, in DESIGN's topology (both bridges use it)


def bridge_config(mqtt_port: int, amqp_url: str, client_id: str, http_port: int, share_group: str) -> dict[str, Any]:
    """Our bridge on RabbitMQ: streams named as the exchanges (the defaults), dead letters to ``dlq``."""
    return {"mqtt": {"port": mqtt_port, "topic_prefix": bb.PREFIX, "client_id": client_id, "share_group": share_group},
            "rabbitmq": {"url": amqp_url}, "topics": {s: s for s in STREAMS}, "dlq": {"topic": "dlq"},
            "http": {"listen": f"127.0.0.1:{http_port}"}, "log": {"level": "WARNING"}}


class QueueDepth:
    """Messages ready in one queue, by passive queue.declare (cheap; ``rabbitmqctl`` costs ~1 s of CPU a call)."""

    def __init__(self, node: RabbitNode, vhost: str, queue: str = QUEUE):
        self._conn = pika.BlockingConnection(pika.ConnectionParameters(
            node.host, node.port, vhost, pika.PlainCredentials(node.username, node.password)))
        self._channel = self._conn.channel()
        self._queue = queue

    def depth(self) -> int:
        return self._channel.queue_declare(self._queue, passive=True).method.message_count

    def purge(self) -> None:
        self._channel.queue_purge(self._queue)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.close()


def declare_topology(node: RabbitNode, vhost: str) -> None:
    """The camera.events exchange bound to camera.queue, as both bridges declare them (so QueueDepth
    can look before either ran)."""
    conn = pika.BlockingConnection(pika.ConnectionParameters(node.host, node.port, vhost,
                                                             pika.PlainCredentials(node.username, node.password)))
    try:
        ch = conn.channel()
        ch.exchange_declare("camera.events", "topic", durable=True)
        ch.queue_declare(QUEUE, durable=True, arguments={"x-queue-type": "classic"})
        ch.queue_bind(QUEUE, "camera.events", "#")
    finally:
        conn.close()


# --- the drain ---------------------------------------------------------------------------------

def time_drain(argv: list[str], depth: QueueDepth, n: int, log_path: Path) -> dict[str, float]:
    """Purge the queue, start a bridge process, wait until the queue holds n; seconds and CPU from its start.

    (A re-delivery of what an earlier round's process had not PUBACKed when it was stopped counts too:
    at most a few hundred of n, as in bench_bridge.)"""
    depth.purge()
    first_at: float | None = None
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        try:
            deadline = start + 300
            while (have := depth.depth()) < n:
                if proc.poll() is not None or time.perf_counter() > deadline:
                    raise RuntimeError(f"{argv[1:4]} drained {have} of {n} (exit {proc.poll()}):\n"
                                       f"{log_path.read_text()[-3000:]}")
                if have and first_at is None:
                    first_at = time.perf_counter()
                time.sleep(0.01)
            elapsed = time.perf_counter() - start
            cpu = bb.tree_cpu_seconds(proc.pid)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
    first_s = (first_at or start) - start
    return {"seconds": round(elapsed, 3), "msg_s": round(n / elapsed), "cpu_us_per_msg": round(cpu / n * 1e6, 1),
            "first_message_s": round(first_s, 3), "steady_msg_s": round(n / max(elapsed - first_s, 1e-3))}


def bench_drain(node: RabbitNode, mqtt_port: int, n: int, rounds: int, workdir: Path) -> dict[str, Any]:
    """Each bridge drains its own copy of each round's backlog into its own vhost; who goes first alternates."""
    drainers: dict[str, list[str]] = {}
    vhosts = {"ours": f"drain-ours-{uuid.uuid4().hex[:6]}", "naive": f"drain-naive-{uuid.uuid4().hex[:6]}"}
    for vhost in vhosts.values():
        node.add_vhost(vhost)
        declare_topology(node, vhost)
    bb.create_session(mqtt_port, "bench-naive", f"{bb.PREFIX}/+/up/#", mqtt.MQTTv311)
    drainers["naive"] = [sys.executable, __file__, "--naive", str(mqtt_port), str(node.port), vhosts["naive"],
                         "bench-naive", f"{bb.PREFIX}/+/up/#"]
    cfg = bridge_config(mqtt_port, node.url(vhost=vhosts["ours"]), "bench-ours", free_port(), "bench-drain")
    bb.create_session(mqtt_port, "bench-ours", f"$share/bench-drain/{bb.PREFIX}/+/up/#", mqtt.MQTTv311)
    cfg_path = workdir / "ours.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    drainers["ours"] = [sys.executable, "-m", "edge_agent", "bridge", "-c", str(cfg_path)]
    depths = {name: QueueDepth(node, vhosts[name]) for name in drainers}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in drainers}
    names = list(drainers)
    try:
        for r in range(rounds):
            bb.publish_backlog(mqtt_port, n, first_seq=1 + r * n)  # every session queues a copy
            print(f"round {r + 1}: {n} queued for each bridge", file=sys.stderr, flush=True)
            for name in names[r % 2:] + names[:r % 2]:
                runs[name].append(time_drain(drainers[name], depths[name], n, workdir / f"{name}-{r}.log"))
                print(json.dumps({"drain": name, **runs[name][-1]}), file=sys.stderr, flush=True)
        dlq = QueueDepth(node, vhosts["ours"], "dlq.queue")  # declared by our bridge; valid envelopes: none
        dead_letters = dlq.depth()
        dlq.close()
    finally:
        for d in depths.values():
            d.close()
    out: dict[str, Any] = {"n": n, "rounds": rounds, "ours_dead_letters": dead_letters}
    for name, results in runs.items():
        out[name] = {"msg_s": [r["msg_s"] for r in results], "best_msg_s": max(r["msg_s"] for r in results),
                     "steady_msg_s": [r["steady_msg_s"] for r in results],
                     "first_message_s": [r["first_message_s"] for r in results],
                     "cpu_us_per_msg": [r["cpu_us_per_msg"] for r in results]}
    # Per round: the same backlog, back to back, so the machine's load is as alike as it gets.
    out["ratio_rounds_vs_naive"] = [round(a / b, 3) for a, b in zip(out["ours"]["msg_s"], out["naive"]["msg_s"])]
    out["cpu_ratio_vs_naive"] = round(statistics.median(out["ours"]["cpu_us_per_msg"])
                                      / statistics.median(out["naive"]["cpu_us_per_msg"]), 3)
    out["load_avg_1m"] = round(os.getloadavg()[0], 1)
    return out


# --- the latency -------------------------------------------------------------------------------

class ArrivalStamper:
    """A pika consumer on the queue in its own thread: publish -> consume latency of each message (ns)."""

    def __init__(self, node: RabbitNode, vhost: str, queue: str = QUEUE):
        self.latencies: list[int] = []
        self._conn = pika.BlockingConnection(pika.ConnectionParameters(
            node.host, node.port, vhost, pika.PlainCredentials(node.username, node.password)))
        self._channel = self._conn.channel()
        self._channel.basic_consume(queue, self._on_message, auto_ack=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stamper", daemon=True)
        self._thread.start()

    def _on_message(self, _ch: Any, _method: Any, _props: Any, body: bytes) -> None:
        self.latencies.append(time.time_ns() - json.loads(body)["data"]["t_ns"])

    def _run(self) -> None:
        while not self._stop.is_set():
            self._conn.process_data_events(time_limit=0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(Exception):
            self._conn.close()


def measure_latency(node: RabbitNode, vhost: str, mqtt_port: int, rate: float, seconds: float) -> dict[str, Any]:
    stamper = ArrivalStamper(node, vhost)
    client = bb.v5_client(f"bench-lat-{uuid.uuid4().hex[:6]}")
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", mqtt_port)
    client.loop_start()
    topic = f"{bb.PREFIX}/gw-bench/up/camera.events"
    try:
        n = int(rate * seconds)
        payloads = bb.stamped_envelopes(2, n)
        # Warm-up: one message through the whole path before the clock starts.
        client.publish(topic, bb.envelope(1, {"t_ns": time.time_ns()}), qos=1)
        wait_for(lambda: stamper.latencies, 60, interval=0.05, message="first message through the bridge")
        stamper.latencies.clear()
        start = time.perf_counter()
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            client.publish(topic, bb.stamp(payloads[i]), qos=1)
        sent_s = time.perf_counter() - start
        wait_for(lambda: len(stamper.latencies) >= n, 60,
                 message=lambda: f"{n} messages consumed (have {len(stamper.latencies)})")
    finally:
        stamper.close()
        client.disconnect()
        client.loop_stop()
    ms = sorted(x / 1e6 for x in stamper.latencies)
    pick = lambda q: round(ms[min(len(ms) - 1, int(q * len(ms)))], 2)  # noqa: E731
    return {"rate_msg_s": rate, "achieved_msg_s": round(n / sent_s), "n": len(ms),
            "p50_ms": pick(0.50), "p95_ms": pick(0.95), "p99_ms": pick(0.99), "max_ms": round(ms[-1], 2)}


def bench_latency(node: RabbitNode, mqtt_port: int, rate: float, seconds: float, workdir: Path) -> dict[str, Any]:
    vhost, run = f"latency-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex[:6]
    workdir.mkdir(parents=True, exist_ok=True)
    node.add_vhost(vhost)
    declare_topology(node, vhost)
    http_port = free_port()
    cfg_path = workdir / "latency.yaml"
    cfg_path.write_text(yaml.safe_dump(bridge_config(mqtt_port, node.url(vhost=vhost), f"bench-latency-{run}",
                                                     http_port, f"bench-latency-{run}")))
    log_path = workdir / "latency.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "bridge", "-c", str(cfg_path)], stdout=log,
                                stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        try:
            # Until the bridge has subscribed, its share group does not exist and messages are dropped.
            wait_for(lambda: bb._mqtt_connected(http_port), 60, interval=0.1, message="bridge /healthz: MQTT connected")
            return bb._with_cpu_of(proc.pid, lambda: measure_latency(node, vhost, mqtt_port, rate, seconds))
        except Exception:
            print(log_path.read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            proc.terminate()
            proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rate", type=float, default=2000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--latency-rounds", type=int, default=2, help="each: a fresh vhost and bridge process; medians")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-bridge-rmq-") as tmp:
        work = Path(tmp)
        node = RabbitNode(work / "rabbitmq").start()
        mosq = start_mosquitto(work / "mosquitto", persistence=False,
                               extra_conf="max_queued_messages 200000\nmax_inflight_messages 1000\n")
        print(f"RabbitMQ on {node.port}, Mosquitto on {mosq.port}", file=sys.stderr, flush=True)
        try:
            drain = bench_drain(node, mosq.port, args.n, args.rounds, work)
            print(json.dumps({"drain": drain}), file=sys.stderr, flush=True)
            runs = []
            for r in range(args.latency_rounds):
                runs.append(bench_latency(node, mosq.port, args.rate, args.seconds, work / f"latency-{r}"))
                print(json.dumps({"latency": runs[-1]}), file=sys.stderr, flush=True)
        finally:
            mosq.kill()
            node.process.kill()  # its data is in tmp, thrown away: no clean shutdown needed
    result: dict[str, Any] = {
        "bench": "bridge_rabbitmq", "cpus": os.cpu_count(), "drain": drain,
        **({"latency": bb.summarise_latency(runs)} if runs else {}),
        "targets": {"drain_msg_s": 10000},
        "meets": {"drain_msg_s": drain["ours"]["best_msg_s"] >= 10000}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
