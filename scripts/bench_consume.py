"""How fast ``edge-agent consume`` gets records into PostgreSQL, and how long the whole path takes.

1. Throughput: N crossings already in a topic, read by (a) ``edge-agent consume`` (the exactly-once
   transaction: events + line_counts + processed, one transaction per poll batch) and (b) a naive
   consumer in this process that inserts each record with auto-commit (no processed table, no
   dedupe: what the guarantee costs), in the same run on the same brokers. Records/s is measured
   from the first row to the last, so the group join is not counted.
2. End to end: envelopes published to MQTT at ``--rate`` msg/s (what the agent's uplink does) go
   through ``edge-agent bridge`` (Mosquitto -> Tansu) and ``edge-agent consume`` into PostgreSQL;
   latency = the row's ``received_at`` (its transaction's start) - the publish time in the envelope.

Prints one JSON line last. Timings on this shared two-core machine are noisy: compare the ratios.

    .venv/bin/python scripts/bench_consume.py [--n 20000] [--rate 2000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from edge_agent.common.envelope import build, encode
from edge_testkit.kafka import TANSU_CONSUMER_DEFAULTS, TansuBroker, create_topics
from edge_testkit.mqtt import start_mosquitto
from edge_testkit.postgres import fresh_database, start_postgres
from edge_testkit.processes import AgentProcess, free_port, wait_for

PARTITIONS = 4
T_NS = b"1" * 19  # replaced by time.time_ns() at send time (as wide until 2286)


def crossings(n: int, *, stamped: bool = False) -> list[bytes]:
    data = {"line": "door", "direction": "in", "class": "person"}
    return [encode(build("gw-bench", i + 1, "counting.crossing",
                         {**data, "track_id": i, **({"t_ns": int(T_NS)} if stamped else {})},
                         camera_id=f"cam-{i % 4}")) for i in range(n)]


def count_rows(dsn: str, table: str = "edge.events") -> int:
    import psycopg

    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    except psycopg.Error:
        return 0


def rate_of(dsn: str, n: int, table: str, timeout: float = 600) -> dict[str, float]:
    """Records/s from the first row seen to the n-th."""
    first = wait_for(lambda: (lambda c: (time.perf_counter(), c) if c else None)(count_rows(dsn, table)), 120,
                     interval=0.05, message="the first row")
    wait_for(lambda: count_rows(dsn, table) >= n, timeout, interval=0.1, message=f"{n} rows in {table}")
    seconds = time.perf_counter() - first[0]
    return {"records_per_s": round((n - first[1]) / seconds), "seconds": round(seconds, 2)}


def consumer_file(workdir: Path, bootstrap: str, topic: str, group: str, **extra: Any) -> Path:
    doc = {"kafka": {"bootstrap_servers": bootstrap}, "group": group, "topics": [topic],
           "sink": {"postgres": {"dsn_env": "EDGE_PG_DSN"}}, "dlq": {"topic": f"{topic}.dlq"},
           "http": {"listen": f"127.0.0.1:{free_port()}"}, "log": {"level": "WARNING"},
           "consumer": {"fetch.wait.max.ms": 10}, **extra}
    path = workdir / f"{group}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def produce(bootstrap: str, topic: str, payloads: list[bytes]) -> None:
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for i, value in enumerate(payloads):
        p.produce(topic, value=value, key=f"gw-bench/cam-{i % 4}".encode())
        if i % 10000 == 0:
            p.poll(0)
    assert p.flush(60) == 0


def exactly_once(workdir: Path, bootstrap: str, topic: str, dsn: str, n: int, batch: int) -> dict[str, float]:
    path = consumer_file(workdir, bootstrap, topic, f"bench-{uuid.uuid4().hex[:6]}", batch_max=batch)
    proc = AgentProcess(["consume", "-c", str(path)], workdir / f"consume-{batch}.log", env={"EDGE_PG_DSN": dsn}).start()
    try:
        return rate_of(dsn, n, "edge.events")
    finally:
        proc.stop()


def naive(bootstrap: str, topic: str, dsn: str, n: int) -> dict[str, float]:
    """Insert each record with auto-commit, no dedupe: the usual hand-written consumer."""
    import threading

    import psycopg
    from confluent_kafka import Consumer

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS naive_events (id uuid, device_id text, seq bigint, data jsonb)")
        conn.execute("CREATE TABLE IF NOT EXISTS naive_counts (line text, in_count bigint, PRIMARY KEY (line))")
    stop = threading.Event()

    def run() -> None:
        c = Consumer({"bootstrap.servers": bootstrap, **TANSU_CONSUMER_DEFAULTS, "group.id": f"naive-{uuid.uuid4().hex[:6]}",
                      "enable.auto.commit": True})
        c.subscribe([topic])
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                msg = c.poll(0.1)
                if msg is None or msg.error():
                    continue
                env = json.loads(msg.value())
                conn.execute("INSERT INTO naive_events VALUES (%s, %s, %s, %s)",
                             (env["id"], env["device_id"], env["seq"], json.dumps(env["data"])))
                conn.execute("INSERT INTO naive_counts VALUES (%s, 1) ON CONFLICT (line) DO UPDATE "
                             "SET in_count = naive_counts.in_count + 1", (env["data"]["line"],))
        c.close()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        return rate_of(dsn, n, "naive_events")
    finally:
        stop.set()
        thread.join(10)


def end_to_end(workdir: Path, bootstrap: str, dsn: str, rate: float, seconds: float) -> dict[str, Any]:
    import paho.mqtt.client as mqtt
    import psycopg

    mosq = start_mosquitto(workdir / "mosquitto", persistence=False,
                           extra_conf="max_queued_messages 200000\nmax_inflight_messages 1000\n")
    topic = f"e2e-{uuid.uuid4().hex[:6]}"
    create_topics(bootstrap, [topic, f"{topic}.dlq"], partitions=PARTITIONS)
    bridge_cfg = workdir / "bridge.yaml"
    bridge_cfg.write_text(yaml.safe_dump({
        "mqtt": {"port": mosq.port, "client_id": "bench-bridge", "share_group": f"b{uuid.uuid4().hex[:6]}"},
        "kafka": {"bootstrap_servers": bootstrap}, "topics": {"ai.inference.results": topic},
        "dlq": {"topic": f"{topic}.dlq"}, "http": {"listen": f"127.0.0.1:{free_port()}"}, "log": {"level": "WARNING"}}))
    bridge = AgentProcess(["bridge", "-c", str(bridge_cfg)], workdir / "bridge.log").start()
    consumer = AgentProcess(["consume", "-c", str(consumer_file(workdir, bootstrap, topic, "bench-e2e"))],
                            workdir / "consume-e2e.log", env={"EDGE_PG_DSN": dsn}).start()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{uuid.uuid4().hex[:6]}",
                         protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", mosq.port)
    client.loop_start()
    try:
        n = int(rate * seconds)
        payloads = crossings(n + 1, stamped=True)
        send = lambda p: client.publish("edge/gw-bench/up/ai.inference.results",  # noqa: E731
                                        p.replace(T_NS, str(time.time_ns()).encode(), 1), qos=1)
        def warmed_up() -> bool:  # the bridge subscribed, the group joined; the same id again is a duplicate
            send(payloads[0])
            return count_rows(dsn) >= 1
        wait_for(warmed_up, 120, interval=1.0, message="the first record through")
        start = time.perf_counter()
        for i in range(1, n + 1):
            delay = start + (i - 1) / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            send(payloads[i])
        sent_s = time.perf_counter() - start
        wait_for(lambda: count_rows(dsn) >= n + 1, 120, interval=0.2, message=f"{n + 1} rows")
        with psycopg.connect(dsn, autocommit=True) as conn:
            rows = conn.execute("SELECT extract(epoch FROM received_at) * 1000 - (data->>'t_ns')::numeric / 1e6 "
                                "FROM edge.events ORDER BY seq OFFSET 1").fetchall()
        ms = sorted(float(r[0]) for r in rows)
        pick = lambda q: round(ms[min(len(ms) - 1, int(q * len(ms)))], 1)  # noqa: E731
        return {"rate_msg_s": rate, "achieved_msg_s": round(n / sent_s), "n": len(ms),
                "p50_ms": pick(0.5), "p95_ms": pick(0.95), "p99_ms": pick(0.99), "max_ms": round(ms[-1], 1)}
    finally:
        client.disconnect()
        client.loop_stop()
        consumer.stop()
        bridge.stop()
        mosq.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20_000, help="records for the throughput runs")
    ap.add_argument("--batch", default="500,1", help="batch_max values of the exactly-once runs")
    ap.add_argument("--rate", type=float, default=2000)
    ap.add_argument("--seconds", type=float, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-consume-") as tmp:
        workdir = Path(tmp)
        pg = start_postgres(workdir)
        tansu = TansuBroker(workdir / "tansu").start()
        try:
            topic = f"bench-{uuid.uuid4().hex[:6]}"
            create_topics(tansu.bootstrap, [topic, f"{topic}.dlq"], partitions=PARTITIONS)
            produce(tansu.bootstrap, topic, crossings(args.n))
            result: dict[str, Any] = {"n": args.n}
            for batch in (int(b) for b in args.batch.split(",")):
                dsn = fresh_database(pg.dsn, f"eo_{batch}")
                result[f"exactly_once_batch_{batch}"] = exactly_once(workdir, tansu.bootstrap, topic, dsn, args.n, batch)
            result["naive_autocommit"] = naive(tansu.bootstrap, topic, fresh_database(pg.dsn, "naive"), args.n)
            best = result[f"exactly_once_batch_{args.batch.split(',')[0]}"]["records_per_s"]
            result["exactly_once_vs_naive"] = round(best / max(result["naive_autocommit"]["records_per_s"], 1), 2)
            result["end_to_end"] = end_to_end(workdir, tansu.bootstrap, fresh_database(pg.dsn, "e2e"), args.rate,
                                              args.seconds)
        finally:
            tansu.kill()
            pg.remove()
        print(json.dumps(result))


if __name__ == "__main__":
    main()
