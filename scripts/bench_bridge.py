#!/usr/bin/env python3
"""Benchmark of the bridge against real Mosquitto + Tansu; prints one JSON line LAST.

(a) drain: ``--n`` envelopes (default 100,000) queue in Mosquitto for persistent sessions
    while no bridge runs: ours (the real daemon, ``edge-agent bridge -c …``, with
    ``workers: N`` for each N of ``--workers``, one session per worker in one share group)
    and two naive bridges written here: paho with its defaults (MQTT 3.1.1,
    ``clean_session=False``, manual ack, PUBACK from the Kafka delivery callback) and the
    same on MQTT v5, each with an idempotent producer (``acks=all``, ``linger.ms=5``), no
    validation, no dedupe, no e2e ack. Each then drains its copy of the backlog in a process
    of its own; msg/s = n / seconds from the start of the process to the last record in
    Kafka (the topic's high watermarks, polled every 10 ms); CPU µs per message is the
    process tree's CPU over that time (start-up included) / n.
(b) latency: ``edge-agent bridge -c …`` (the real daemon) runs; we publish at a
    fixed rate and a consumer stamps each record: MQTT publish -> Kafka consume.
    The naive bridge (3.1.1) and a producer writing the same records straight to Kafka
    (the floor no bridge can beat) are measured the same way, in alternating rounds, each run
    on a fresh Mosquitto and Tansu; medians.
    ``bridge_cpu_pct`` is the bridge process's CPU meanwhile: on two cores, a
    bridge's CPU is taken from the brokers and the consumer, and shows as latency.

Usage: .venv/bin/python scripts/bench_bridge.py [--n 100000] [--rounds 2] [--workers 1,2,4] [--rate 2000]
                                                [--seconds 10] [--latency-rounds 2]
"""

from __future__ import annotations

import sys
import time


def naive_main(argv: list[str]) -> None:
    """The naive bridge as a user would write it: paho and confluent-kafka, nothing else imported.

    argv: protocol (311 | 5), MQTT port, Kafka bootstrap, Kafka topic, client id, subscription,
    clean (1: a fresh session, for the latency run; 0: resume the persistent one).
    """
    import signal

    import paho.mqtt.client as mqtt
    from confluent_kafka import Producer
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    protocol, port, kafka, topic, client_id, subscription, clean = argv
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    producer = Producer({"bootstrap.servers": kafka, "enable.idempotence": True, "acks": "all", "linger.ms": 5})
    if protocol == "5":
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                             manual_ack=True)
    else:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean == "1",
                             manual_ack=True)

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        mid = msg.mid
        producer.produce(topic, msg.payload, msg.topic.split("/")[1].encode(),
                         on_delivery=lambda err, _m: err is None and client.ack(mid, 1))

    client.on_message = on_message
    client.on_connect = lambda c, *_: c.subscribe(subscription, qos=1)
    client.on_subscribe = lambda *_: print("subscribed", flush=True)  # the latency run waits for it
    if protocol == "5":
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        props.ReceiveMaximum = 1000  # the window Mosquitto's max_inflight_messages gives the others
        client.connect("127.0.0.1", int(port), clean_start=clean == "1", properties=props)
    else:
        client.connect("127.0.0.1", int(port))
    client.loop_start()
    while True:
        producer.poll(0.1)


if __name__ == "__main__" and sys.argv[1:2] == ["--naive"]:
    naive_main(sys.argv[2:])

import argparse  # noqa: E402 - below: the orchestrator's imports, which the naive bridge does without
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Iterator  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

import paho.mqtt.client as mqtt
import yaml
from confluent_kafka import Consumer, Producer, TopicPartition
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.common.envelope import Envelope
from edge_testkit.kafka import TANSU_CONSUMER_DEFAULTS, TansuBroker, create_topics
from edge_testkit.mqtt import start_mosquitto
from edge_testkit.processes import free_port, process_cpu_seconds, wait_for

PREFIX = "bench"
# One device with one camera: one record key, so that our bridge (key <device>/<camera>), the naive
# one (key <device>) and the Kafka-only floor all write one partition. Spread over 8 cameras, our
# records land in all 4 partitions, where the test broker itself is much slower: "latency_8_cameras"
# and "kafka_only_latency_8_cameras" show ours and the floor that way.
CAMERAS = 1
PARTITIONS = 4
RECEIVE_MAXIMUM = 1000  # MQTT v5 clients' window: as Mosquitto's max_inflight_messages gives 3.1.1 ones


def v5_client(client_id: str, **kw: Any) -> mqtt.Client:
    return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, **kw)


def session_props() -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    props.ReceiveMaximum = RECEIVE_MAXIMUM
    return props


def bridge_config(mqtt_port: int, kafka: str, topic: str, client_id: str, http_port: int,
                  share_group: str = "bench") -> dict[str, Any]:
    # Each run needs its own share group: Mosquitto gives an OFFLINE member of a group its
    # share of the messages (queued in its session), so a stale drain session would eat them.
    return {"mqtt": {"port": mqtt_port, "topic_prefix": PREFIX, "client_id": client_id, "share_group": share_group},
            "kafka": {"bootstrap_servers": kafka},
            "topics": {"camera.events": topic}, "dlq": {"topic": topic + ".dlq"},
            "http": {"listen": f"127.0.0.1:{http_port}"}, "log": {"level": "WARNING"}}


# --- the drain: a backlog queued for each bridge's persistent session(s), then one process each ---

def create_session(port: int, client_id: str, topic_filter: str, protocol: int = mqtt.MQTTv5) -> None:
    """Connect once with a persistent session and subscribe, so the broker queues while we are away."""
    subscribed = threading.Event()
    if protocol == mqtt.MQTTv5:
        client = v5_client(client_id)
        client.connect("127.0.0.1", port, clean_start=False, properties=session_props())
    else:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        client.connect("127.0.0.1", port)
    client.on_subscribe = lambda *_: subscribed.set()
    client.loop_start()
    client.subscribe(topic_filter, qos=1)
    wait_for(subscribed.is_set, 10, message=f"SUBACK for {client_id}")
    client.disconnect()
    client.loop_stop()


def envelope(seq: int, data: dict[str, Any], cameras: int = CAMERAS) -> bytes:
    from edge_agent.common.envelope import build, encode

    return encode(build("gw-bench", seq, "counting.crossing", data, camera_id=f"cam-{seq % cameras}"))


T_NS_PLACEHOLDER = b"1" * 19  # as wide as time.time_ns() until 2286


def stamped_envelopes(first_seq: int, n: int, cameras: int = CAMERAS) -> list[bytes]:
    """Envelopes built before the clock starts, each with a placeholder ``stamp`` replaces at send time:
    building one with pydantic per send cost the measuring process CPU that the brokers and the
    bridge under test need on this two-core machine."""
    return [envelope(first_seq + i, {"t_ns": int(T_NS_PLACEHOLDER)}, cameras) for i in range(n)]


def stamp(payload: bytes) -> bytes:
    return payload.replace(T_NS_PLACEHOLDER, str(time.time_ns()).encode(), 1)


def publish_backlog(port: int, n: int, first_seq: int) -> None:
    payloads = [envelope(first_seq + i, {"i": i}) for i in range(n)]
    client = v5_client(f"bench-pub-{uuid.uuid4().hex[:6]}")
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port)
    client.loop_start()
    for chunk in range(0, n, 20_000):  # fewer unconfirmed than paho's 65,535 packet ids
        infos = [client.publish(f"{PREFIX}/gw-bench/up/camera.events", payload, qos=1)
                 for payload in payloads[chunk:chunk + 20_000]]
        for info in infos:
            info.wait_for_publish(120)
    client.disconnect()
    client.loop_stop()


def worker_client_ids(client_id: str, workers: int) -> list[str]:
    """The MQTT client ids of a bridge's workers (the bridge's config names them so)."""
    if workers == 1:
        return [client_id]
    from edge_agent.bridge.config import worker_client_id

    return [worker_client_id(client_id, workers, i) for i in range(workers)]


class RecordCounter:
    """Counts the records of a topic by reading them all: the test broker's high watermark is the
    base offset of the last batch, short of the end by that batch (1,926 of 2,000 seen). A fresh
    consumer per drain: one left idle between rounds once stopped seeing new records. With several
    producers on one partition (workers: N) the test broker now and then files records behind a
    consumer reading at the head, which never sees them: ``time_drain`` then counts again from
    the start."""

    def __init__(self, kafka: str, topic: str):
        self._consumer = Consumer({"bootstrap.servers": kafka, "group.id": f"bench-drain-{uuid.uuid4().hex[:6]}",
                                   **TANSU_CONSUMER_DEFAULTS})
        self._consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
        self.count = 0
        self.first_at: float | None = None  # time.perf_counter() when read() saw its first record
        self.last_at: float | None = None  # ... and its latest

    def catch_up(self, idle_s: float = 0.5) -> int:
        """Read what is there already, until nothing came for idle_s."""
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < idle_s:
            got = self._read_once()
            if got:
                quiet_since = time.monotonic()
        return self.count

    def read(self, at_least: int, timeout: float, stop: Callable[[], bool], stall_s: float = 5.0) -> bool:
        """Read until ``at_least`` records were seen (True), ``stop()``, the timeout or stall_s without
        a new record once any came (False)."""
        deadline = time.monotonic() + timeout
        while self.count < at_least:
            if stop() or time.monotonic() >= deadline:
                return False
            if self._read_once():
                self.last_at = time.perf_counter()
                self.first_at = self.first_at or self.last_at
            elif self.last_at is not None and time.perf_counter() - self.last_at > stall_s:
                return False
        return True

    def _read_once(self) -> int:
        got = sum(1 for m in self._consumer.consume(10_000, 0.01) if m.error() is None)
        self.count += got
        return got

    def close(self) -> None:
        self._consumer.close()


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and its live descendants (a bridge's workers)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += process_cpu_seconds(p)
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return total


def time_drain(argv: list[str], kafka: str, topic: str, n: int, log_path: Path) -> dict[str, float]:
    """Start a bridge process, wait until Kafka has n more records in its topic; seconds and CPU from its start.

    (A re-delivery of what an earlier round's process had not PUBACKed when it was stopped counts too:
    at most a few hundred of n.)"""
    counter = RecordCounter(kafka, topic)
    n_before = counter.catch_up()  # connected, assigned, caught up before the clock starts
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        try:
            if not counter.read(n_before + n, 300, lambda: proc.poll() is not None) and not _all_there(
                    kafka, topic, n_before + n):
                raise RuntimeError(f"{argv[2:4]} drained {counter.count - n_before} of {n} (exit {proc.poll()}):\n"
                                   f"{log_path.read_text()[-3000:]}")
            # The last record came then (those the live count missed were filed behind it, earlier).
            elapsed = (counter.last_at or time.perf_counter()) - start
            cpu = tree_cpu_seconds(proc.pid)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
            counter.close()
    # CPU per message is what a loaded, shared machine cannot distort much (wall time it can).
    # first_record_s: start-up until the first record is in Kafka. Most of it is the idempotent
    # producer getting its id: librdkafka asks before any broker is up and retries after 500 ms,
    # sometimes twice; steady_msg_s leaves that lottery out (docs/bridge.md).
    first_s = (counter.first_at or start) - start
    return {"seconds": round(elapsed, 3), "msg_s": round(n / elapsed), "cpu_us_per_msg": round(cpu / n * 1e6, 1),
            "first_record_s": round(first_s, 3), "steady_msg_s": round(n / max(elapsed - first_s, 1e-3))}


def _all_there(kafka: str, topic: str, n: int) -> bool:
    """Count the topic again from its start (see RecordCounter)."""
    recount = RecordCounter(kafka, topic)
    try:
        return recount.catch_up(idle_s=2.0) >= n
    finally:
        recount.close()


def bench_drain(mqtt_port: int, kafka: str, n: int, rounds: int, workers: list[int], workdir: Path) -> dict[str, Any]:
    """Every bridge drains its own copy of each round's backlog; who goes first rotates."""
    drainers: dict[str, tuple[str, list[str]]] = {}  # name -> (Kafka topic, command line)
    for protocol in ("311", "5"):
        name, topic = f"naive{protocol}", f"drain-naive{protocol}-{uuid.uuid4().hex[:6]}"
        create_session(mqtt_port, f"bench-{name}", f"{PREFIX}/+/up/#", mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311)
        drainers[name] = (topic, [sys.executable, __file__, "--naive", protocol, str(mqtt_port), kafka, topic,
                                  f"bench-{name}", f"{PREFIX}/+/up/#", "0"])
    for w in workers:
        name, topic = f"ours_w{w}", f"drain-ours-w{w}-{uuid.uuid4().hex[:6]}"
        cfg = bridge_config(mqtt_port, kafka, topic, f"bench-ours-w{w}", free_port(), share_group=f"bench-w{w}")
        if w > 1:
            cfg["workers"] = w
        for cid in worker_client_ids(cfg["mqtt"]["client_id"], w):
            # Each worker's session joins the share group before the backlog: Mosquitto gives each its share.
            create_session(mqtt_port, cid, f"$share/bench-w{w}/{PREFIX}/+/up/#")
        cfg_path = workdir / f"{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        drainers[name] = (topic, [sys.executable, "-m", "edge_agent", "bridge", "-c", str(cfg_path)])
    create_topics(kafka, [topic for topic, _ in drainers.values()], partitions=PARTITIONS)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in drainers}
    names = list(drainers)
    for r in range(rounds):
        publish_backlog(mqtt_port, n, first_seq=1 + r * n)  # every session queues a copy
        for name in names[r % len(names):] + names[:r % len(names)]:
            topic, argv = drainers[name]
            runs[name].append(time_drain(argv, kafka, topic, n, workdir / f"{name}-{r}.log"))
            print(json.dumps({"drain": name, **runs[name][-1]}), file=sys.stderr)
    out: dict[str, Any] = {"n": n, "rounds": rounds}
    for name, results in runs.items():
        out[name] = {"msg_s": [r["msg_s"] for r in results], "best_msg_s": max(r["msg_s"] for r in results),
                     "steady_msg_s": [r["steady_msg_s"] for r in results],
                     "first_record_s": [r["first_record_s"] for r in results],
                     "cpu_us_per_msg": statistics.median(r["cpu_us_per_msg"] for r in results)}
    ours = out[f"ours_w{workers[0]}"]
    for naive in ("naive311", "naive5"):
        out[f"ratio_best_vs_{naive}"] = round(ours["best_msg_s"] / out[naive]["best_msg_s"], 3)
        # Per round: the same backlog, back to back, so the machine's load is as alike as it gets.
        out[f"ratio_rounds_vs_{naive}"] = [round(a / b, 3) for a, b in zip(ours["msg_s"], out[naive]["msg_s"])]
        out[f"steady_ratio_rounds_vs_{naive}"] = [round(a / b, 3) for a, b in zip(ours["steady_msg_s"],
                                                                                   out[naive]["steady_msg_s"])]
    out["load_avg_1m"] = round(os.getloadavg()[0], 1)
    return out


def bench_naive_latency(mqtt_port: int, kafka: str, rate: float, seconds: float, workdir: Path) -> dict[str, Any]:
    """The naive bridge (MQTT 3.1.1) on a fresh session, measured as ours is."""
    topic = f"latency-naive-{uuid.uuid4().hex[:6]}"
    create_topics(kafka, [topic], partitions=PARTITIONS)
    log_path = workdir / "naive.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, __file__, "--naive", "311", str(mqtt_port), kafka, topic,
                             f"bench-naive-latency-{uuid.uuid4().hex[:6]}", f"{PREFIX}/+/up/#", "1"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    try:
        wait_for(lambda: b"subscribed" in log_path.read_bytes(), 60, interval=0.1, message="naive bridge subscribed")
        return _with_cpu_of(proc.pid, lambda: _measure_latency(mqtt_port, kafka, topic, rate, seconds))
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def bench_latency(mqtt_port: int, kafka: str, rate: float, seconds: float, workdir: Path,
                  cameras: int = CAMERAS) -> dict[str, Any]:
    topic = f"latency-{uuid.uuid4().hex[:6]}"
    create_topics(kafka, [topic], partitions=PARTITIONS)
    cfg_path = workdir / "bridge.yaml"
    http_port = free_port()
    run = uuid.uuid4().hex[:6]  # a fresh session and share group: no backlog from earlier runs
    cfg_path.write_text(yaml.safe_dump(bridge_config(mqtt_port, kafka, topic, f"bench-latency-{run}", http_port,
                                                share_group=f"bench-latency-{run}")))
    log = open(workdir / "bridge.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "bridge", "-c", str(cfg_path)], stdout=log,
                            stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    try:
        # Until the bridge has subscribed, its share group does not exist and messages are dropped.
        wait_for(lambda: _mqtt_connected(http_port), 60, interval=0.1, message="bridge /healthz says MQTT connected")
        return _with_cpu_of(proc.pid, lambda: _measure_latency(mqtt_port, kafka, topic, rate, seconds,
                                                               cameras=cameras))
    except Exception:
        log.flush()
        print((workdir / "bridge.log").read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def bench_kafka_floor(kafka: str, rate: float, seconds: float, cameras: int = CAMERAS) -> dict[str, Any]:
    """Produce the same records straight to Kafka at the same rate: the latency no bridge can beat.

    Same value, key (<device>/<camera>) and headers as our bridge sends: the test broker is much
    slower with headers over 4 partitions (docs/architecture.md, "Figures"), so a floor of bare
    values under one key would flatter every bridge but the one under test.
    """
    topic = f"latency-floor-{uuid.uuid4().hex[:6]}"
    create_topics(kafka, [topic], partitions=PARTITIONS)
    producer = Producer({"bootstrap.servers": kafka, "enable.idempotence": True, "acks": "all", "linger.ms": 2})
    stop = threading.Event()
    poller = threading.Thread(target=lambda: [producer.poll(0.05) for _ in iter(stop.is_set, True)], daemon=True)
    poller.start()
    try:
        def send(payload: bytes) -> None:
            envelope = Envelope.model_validate_json(payload)  # as the bridge does, in the measuring process
            producer.produce(topic, payload, envelope.kafka_key.encode(), headers=envelope.kafka_headers())
        return _measure_latency(0, kafka, topic, rate, seconds, send=send, cameras=cameras)
    finally:
        stop.set()
        poller.join(5)
        producer.flush(10)


def _with_cpu_of(pid: int, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a latency measurement and add the bridge process's CPU share during it: on two cores,
    every bridge's CPU is taken from the broker and the consumer, so it shows in the latency."""
    cpu, start = process_cpu_seconds(pid), time.perf_counter()
    result = measure()
    result["bridge_cpu_pct"] = round(100 * (process_cpu_seconds(pid) - cpu) / (time.perf_counter() - start), 1)
    return result


def _mqtt_connected(http_port: int) -> bool:
    import httpx

    try:
        return bool(httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=1).json()["mqtt"]["connected"])
    except (httpx.HTTPError, KeyError, ValueError):
        return False


def _measure_latency(mqtt_port: int, kafka: str, topic: str, rate: float, seconds: float,
                     send: Callable[[bytes], Any] | None = None, cameras: int = CAMERAS) -> dict[str, Any]:
    consumer = Consumer({"bootstrap.servers": kafka, "group.id": "bench-latency", **TANSU_CONSUMER_DEFAULTS})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    latencies: list[float] = []
    stop = threading.Event()

    def consume() -> None:
        while not stop.is_set():
            for msg in consumer.consume(1000, 0.01):
                if msg.error() is None:
                    latencies.append(time.time_ns() - json.loads(msg.value())["data"]["t_ns"])

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    client = v5_client(f"bench-lat-{uuid.uuid4().hex[:6]}")
    if send is None:
        client.max_inflight_messages_set(1000)
        client.connect("127.0.0.1", mqtt_port)
        client.loop_start()
        send = lambda payload: client.publish(f"{PREFIX}/gw-bench/up/camera.events", payload, qos=1)  # noqa: E731
    # Warm-up: the bridge is connected and Kafka metadata fetched once a first record goes through.
    n = int(rate * seconds)
    payloads = stamped_envelopes(2, n, cameras)
    send(envelope(1, {"t_ns": time.time_ns()}))
    wait_for(lambda: latencies, 60, interval=0.05, message="first record through the bridge")
    latencies.clear()
    start = time.perf_counter()
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        send(stamp(payloads[i]))
    sent_s = time.perf_counter() - start
    wait_for(lambda: len(latencies) >= n, 60, message=lambda: f"{n} records consumed (have {len(latencies)})")
    stop.set()
    reader.join(5)
    consumer.close()
    if client.is_connected():
        client.disconnect()
        client.loop_stop()
    ms = sorted(x / 1e6 for x in latencies)
    pick = lambda q: round(ms[min(len(ms) - 1, int(q * len(ms)))], 2)  # noqa: E731
    return {"rate_msg_s": rate, "achieved_msg_s": round(n / sent_s), "n": len(ms),
            "p50_ms": pick(0.50), "p95_ms": pick(0.95), "p99_ms": pick(0.99), "max_ms": round(ms[-1], 2)}


@contextlib.contextmanager
def fresh_brokers(workdir: Path) -> Iterator[tuple[int, str]]:
    """A Mosquitto and a Tansu of their own for one measurement: the test broker keeps every record
    in memory, so that no run inherits what the drains or the runs before it left there."""
    workdir.mkdir(parents=True, exist_ok=True)
    mosq = start_mosquitto(workdir / "mosquitto", persistence=False,
                           extra_conf="max_queued_messages 200000\nmax_inflight_messages 1000\n")
    tansu = TansuBroker(workdir / "tansu").start()
    try:
        yield mosq.port, tansu.bootstrap
    finally:
        tansu.kill()
        mosq.kill()


def summarise_latency(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds (each round is one run of ``--seconds``), and every run's p95."""
    out: dict[str, Any] = {key: round(statistics.median(run[key] for run in runs), 2)
                           for key in ("p50_ms", "p95_ms", "p99_ms", "max_ms", "bridge_cpu_pct") if key in runs[0]}
    return {"rate_msg_s": runs[0]["rate_msg_s"], "rounds": len(runs), **out, "p95_ms_runs": [r["p95_ms"] for r in runs]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", default="1", help="comma-separated: drain with workers: N for each N")
    ap.add_argument("--rate", type=float, default=2000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--latency-rounds", type=int, default=2, help="0: the drain only")
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-bridge-") as tmp:
        work = Path(tmp)
        with fresh_brokers(work / "drain") as (mqtt_port, kafka):
            drain = bench_drain(mqtt_port, kafka, args.n, args.rounds, workers, work / "drain")
        print(json.dumps({"drain": drain}), file=sys.stderr)
        measure: dict[str, Callable[[int, str, Path], dict[str, Any]]] = {
            "ours": lambda port, kafka, run: bench_latency(port, kafka, args.rate, args.seconds, run),
            "naive": lambda port, kafka, run: bench_naive_latency(port, kafka, args.rate, args.seconds, run),
            "floor": lambda _port, kafka, _run: bench_kafka_floor(kafka, args.rate, args.seconds),
            "ours_8_cameras": lambda port, kafka, run: bench_latency(port, kafka, args.rate, args.seconds, run,
                                                                     cameras=8),
            "floor_8_cameras": lambda _port, kafka, _run: bench_kafka_floor(kafka, args.rate, args.seconds, cameras=8)}
        runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in measure}
        for r in range(args.latency_rounds):
            for kind in (list(measure) if r % 2 == 0 else list(measure)[::-1]):
                run_dir = work / f"latency-{kind}-{r}"
                with fresh_brokers(run_dir) as (mqtt_port, kafka):
                    runs[kind].append(measure[kind](mqtt_port, kafka, run_dir))
                print(json.dumps({f"latency_{kind}": runs[kind][-1]}), file=sys.stderr)
    ours = drain[f"ours_w{workers[0]}"]
    result: dict[str, Any] = {"bench": "bridge", "cpus": os.cpu_count(), "drain": drain,
                              "targets": {"drain_msg_s": 10000, "drain_ratio_vs_naive311": 1.0, "p95_ms": 25},
                              "meets": {"drain_msg_s": ours["best_msg_s"] >= 10000,
                                        "drain_ratio_vs_naive311": drain["ratio_best_vs_naive311"] >= 1.0}}
    if args.latency_rounds:
        latency = summarise_latency(runs["ours"])
        result.update({"latency": latency, "naive_latency": summarise_latency(runs["naive"]),
                       "kafka_only_latency": summarise_latency(runs["floor"]),
                       "latency_8_cameras": summarise_latency(runs["ours_8_cameras"]),
                       "kafka_only_latency_8_cameras": summarise_latency(runs["floor_8_cameras"])})
        result["meets"]["p95_ms"] = latency["p95_ms"] <= 25
    print(json.dumps(result))


if __name__ == "__main__":
    main()
