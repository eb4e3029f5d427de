#!/usr/bin/env python3
"""Benchmark of the bridge HTTP API over the real wire; prints one JSON line LAST.

Own Mosquitto + Tansu (as ``make demo`` starts them) and an ``edge-agent bridge`` process:
  - publish: POST /api/v1/queue/publish answered after Kafka confirms; latency
    p50/p95/p99 one request at a time, and throughput with ``--clients`` concurrent clients;
  - status: GET /api/v1/queue/status latency with ``--letters`` dead letters in the DLQ;
  - retry: POST /api/v1/queue/dlq/retry re-publishing all of them, letters per second.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import secrets
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from confluent_kafka import Producer

from edge_agent.common.envelope import build, encode
from edge_agent.common.wire import DLQ_ATTEMPTS, DLQ_REASON, DLQ_SOURCE_TOPIC
from edge_testkit.processes import free_port

REPO = Path(__file__).resolve().parent.parent


def _demo():
    spec = importlib.util.spec_from_file_location("edge_demo", REPO / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["edge_demo"] = module
    spec.loader.exec_module(module)
    return module


demo = _demo()


def percentiles(samples_s: list[float]) -> dict[str, float]:
    q = statistics.quantiles(sorted(samples_s), n=100, method="inclusive")
    return {"p50_ms": round(q[49] * 1000, 2), "p95_ms": round(q[94] * 1000, 2), "p99_ms": round(q[98] * 1000, 2)}


def publish_once(http: httpx.Client, token: str, i: int) -> float:
    t0 = time.perf_counter()
    r = http.post("/api/v1/queue/publish", headers={"Authorization": f"Bearer {token}"},
                  json={"topic": "camera.events", "message": {"type": "bench", "i": i}})
    r.raise_for_status()
    return time.perf_counter() - t0


def seed_dead_letters(bootstrap: str, n: int) -> None:
    """Letters as the bridge writes them after exhausted retries: a valid envelope with its dlq-* headers
    (DLQ retry re-publishes nothing else)."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for i in range(n):
        value = encode(build("gw-bench", i + 1, "bench.letter", {"i": i}))
        producer.produce(demo.DLQ, value=value, headers=[
            (DLQ_REASON, b"retries_exhausted"), (DLQ_SOURCE_TOPIC, b"notifications"), (DLQ_ATTEMPTS, b"5")])
        producer.poll(0)
    if producer.flush(30):
        raise SystemExit("could not seed the DLQ")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--letters", type=int, default=5000)
    args = p.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="edge-bench-api-"))
    token = secrets.token_urlsafe(16)
    out: dict = {"requests": args.requests, "clients": args.clients, "letters": args.letters}
    with contextlib.ExitStack() as stack:  # brokers and bridge started as make demo starts them, all stopped
        mosquitto, tansu = demo.start_brokers(workdir, stack)
        bootstrap = tansu.bootstrap
        http_port = free_port()
        cfg = demo.write_yaml(workdir / "bridge.yaml", demo.bridge_config(mosquitto.port, bootstrap, http_port))
        demo.start_daemon(["bridge", "-c", str(cfg)], workdir / "bridge.log", http_port,
                          {"EDGE_DEMO_ADMIN_TOKEN": token}, stack, 30)
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as http:
            for i in range(20):  # warm-up: producer connection, first metadata
                publish_once(http, token, i)
            serial = [publish_once(http, token, i) for i in range(args.requests)]
            out["publish_serial"] = percentiles(serial)

            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                concurrent = list(pool.map(lambda i: publish_once(http, token, i), range(args.requests)))
            elapsed = time.perf_counter() - t0
            out["publish_concurrent"] = {**percentiles(concurrent), "req_per_s": round(args.requests / elapsed, 1)}

            seed_dead_letters(bootstrap, args.letters)
            auth = {"Authorization": f"Bearer {token}"}
            status = []
            for _ in range(10):
                t0 = time.perf_counter()
                r = http.get("/api/v1/queue/status", params={"topic": "notifications"}, headers=auth)
                r.raise_for_status()
                status.append(time.perf_counter() - t0)
            assert r.json()[0]["dlqSize"] == args.letters, r.text
            out["status_with_letters"] = {"median_ms": round(statistics.median(status) * 1000, 1),
                                          "max_ms": round(max(status) * 1000, 1)}

            t0 = time.perf_counter()
            r = http.post("/api/v1/queue/dlq/retry", headers=auth,
                          json={"topic": "notifications", "maxMessages": args.letters})
            r.raise_for_status()
            elapsed = time.perf_counter() - t0
            out["retry"] = {**r.json(), "seconds": round(elapsed, 2),
                            "letters_per_s": round(r.json()["retried"] / elapsed, 1)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
