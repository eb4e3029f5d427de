"""How fast the test brokers come up and how Tansu behaves for consumers.

Backs the numbers quoted in docs/architecture.md (the test kit) and the README: broker start and
restart times, first produce to a missing topic (auto-create), consumer-group
join (subscribe) versus partition assignment. Prints one JSON line last.

    .venv/bin/python scripts/bench_harness.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from edge_testkit.kafka import TANSU_CONSUMER_DEFAULTS, TansuBroker, create_topics
from edge_testkit.mqtt import start_mosquitto


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def first_record_seconds(bootstrap: str, topic: str, *, subscribe: bool) -> float:
    """Seconds from creating a consumer to its first record (group join vs. assign)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, **TANSU_CONSUMER_DEFAULTS,
                         "group.id": f"bench-{uuid.uuid4().hex[:6]}"})
    start = time.perf_counter()
    try:
        if subscribe:
            consumer.subscribe([topic])
        else:
            consumer.assign([TopicPartition(topic, 0, 0)])
        deadline = start + 30
        while time.perf_counter() < deadline:
            msg = consumer.poll(0.01)
            if msg is not None and msg.error() is None:
                return time.perf_counter() - start
        raise TimeoutError("no record within 30 s")
    finally:
        consumer.close()


def produce_one(bootstrap: str, topic: str) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    producer.produce(topic, value=b"x")
    if producer.flush(30) != 0:
        raise TimeoutError(f"produce to {topic} not delivered")


def measure_round(workdir: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    mosquitto = start_mosquitto(workdir / "mosquitto", persistence=False)
    out["mosquitto_restart_s"] = timed(mosquitto.restart)
    mosquitto.kill()

    tansu = TansuBroker(workdir / "tansu")
    out["tansu_start_s"] = timed(tansu.start)
    try:
        out["tansu_restart_s"] = timed(tansu.restart)
        out["auto_create_first_produce_s"] = timed(lambda: produce_one(tansu.bootstrap, "auto-created"))
        create_topics(tansu, ["bench"], partitions=1)
        produce_one(tansu.bootstrap, "bench")
        out["group_join_first_record_s"] = first_record_seconds(tansu.bootstrap, "bench", subscribe=True)
        out["assign_first_record_s"] = first_record_seconds(tansu.bootstrap, "bench", subscribe=False)
    finally:
        tansu.kill()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rounds = []
    with tempfile.TemporaryDirectory(prefix="bench-harness-") as tmp:
        for i in range(args.rounds):
            rounds.append(measure_round(Path(tmp) / f"round-{i}"))
            print(f"round {i + 1}: " + ", ".join(f"{k}={v:.3f}" for k, v in rounds[-1].items()), file=sys.stderr)
    summary = {key: round(statistics.median(r[key] for r in rounds), 4) for key in rounds[0]}
    print(json.dumps({"bench": "harness", "rounds": args.rounds, "median": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
