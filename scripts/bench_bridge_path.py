#!/usr/bin/env python3
"""Where one message's time goes inside the bridge; prints one JSON line LAST.

Real Mosquitto + Tansu. A publisher in a child process (so it does not share our
GIL) sends envelopes at a fixed rate, each stamped with its publish time; the
bridge runs in this process with timing hooks on four of its methods:

  pub -> recv      publisher, Mosquitto, the bridge's loop picking it up
  recv -> produce  read batch, validation, hand-over to librdkafka
  produce -> deliv linger, Kafka round trip, delivery report served by the loop
  deliv -> settle  the report handled: PUBACK queued, e2e ack batched

The first ``--warmup`` seconds are left out (producer id, metadata).

Usage: .venv/bin/python scripts/bench_bridge_path.py [--rate 2000] [--seconds 8] [--warmup 1.5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import bench_bridge as bb  # beside this script: the script's directory is on sys.path

from edge_agent.bridge.config import BridgeConfig
from edge_agent.bridge.daemon import freeze_startup_heap
from edge_agent.bridge.worker import Bridge
from edge_testkit.kafka import TansuBroker, create_topics
from edge_testkit.mqtt import start_mosquitto
from edge_testkit.processes import wait_for

STAGES = [("pub", "recv"), ("recv", "produce"), ("produce", "deliv"), ("deliv", "settle"), ("pub", "deliv")]

def publish_stamped(port: int, n: int, rate: float, topic: str) -> None:
    """The publisher child: ``n`` stamped envelopes at ``rate`` per second, QoS 1."""
    client = bb.v5_client("path-pub")
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port)
    client.loop_start()
    payloads = bb.stamped_envelopes(2, n)
    start = time.perf_counter()
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        info = client.publish(topic, bb.stamp(payloads[i]), qos=1)
    info.wait_for_publish(30)
    client.disconnect()
    client.loop_stop()


def hook_stamps(bridge: Bridge, stamps: dict[int, dict[str, int]], settled: list[int]) -> None:
    """Wrap the bridge's stage methods (benchmark only) to stamp each message by its seq."""
    on_message, send, on_delivery, settle = (bridge._client.on_message, bridge._send, bridge._on_delivery,
                                             bridge._settle_mqtt)

    def stamped_message(client: Any, userdata: Any, msg: Any) -> None:
        now = time.time_ns()
        body = json.loads(msg.payload)
        stamps[body["seq"]] = {"pub": body["data"]["t_ns"], "recv": now}
        on_message(client, userdata, msg)

    def stamped_send(rec: Any) -> None:
        if rec.seq in stamps:
            stamps[rec.seq].setdefault("produce", time.time_ns())
        send(rec)

    def stamped_delivery(rec: Any, err: Any, msg: Any) -> None:
        if rec.seq in stamps:
            stamps[rec.seq]["deliv"] = time.time_ns()
        on_delivery(rec, err, msg)

    def stamped_settle(tags: Any, device: Any, seq: Any, now: float) -> None:
        if seq in stamps:
            stamps[seq]["settle"] = time.time_ns()
            settled[0] += 1
        settle(tags, device, seq, now)

    bridge._client.on_message = stamped_message
    bridge._send = stamped_send  # type: ignore[method-assign]
    bridge._on_delivery = stamped_delivery  # type: ignore[method-assign]
    bridge._settle_mqtt = stamped_settle  # type: ignore[method-assign]


def percentiles(stamps: dict[int, dict[str, int]], warmup_s: float) -> dict[str, Any]:
    rows = [r for r in stamps.values() if len(r) == 5]
    first = min(r["pub"] for r in rows)
    rows = [r for r in rows if r["pub"] - first >= warmup_s * 1e9]
    out: dict[str, Any] = {"n": len(rows)}
    for a, b in STAGES:
        ms = sorted((r[b] - r[a]) / 1e6 for r in rows)
        pick = lambda q: round(ms[min(len(ms) - 1, int(q * len(ms)))], 2)  # noqa: E731
        out[f"{a}->{b}"] = {"p50": pick(0.5), "p95": pick(0.95), "p99": pick(0.99)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=2000)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--warmup", type=float, default=1.5)
    ap.add_argument("--publisher", type=int, metavar="MQTT_PORT", help=argparse.SUPPRESS)  # the child's mode
    args = ap.parse_args()
    n = int(args.rate * args.seconds)
    mqtt_topic = f"{bb.PREFIX}/gw-bench/up/camera.events"
    if args.publisher:
        publish_stamped(args.publisher, n, args.rate, mqtt_topic)
        return
    stamps: dict[int, dict[str, int]] = {}
    settled = [0]
    with tempfile.TemporaryDirectory(prefix="bench-path-") as tmp:
        work = Path(tmp)
        mosq = start_mosquitto(work / "mosquitto", persistence=False, extra_conf="max_inflight_messages 1000\n")
        tansu = TansuBroker(work / "tansu").start()
        try:
            topic = f"path-{uuid.uuid4().hex[:6]}"
            create_topics(tansu.bootstrap, [topic], partitions=bb.PARTITIONS)
            cfg = BridgeConfig.model_validate(bb.bridge_config(mosq.port, tansu.bootstrap, topic, "bench-path",
                                                               bb.free_port(), share_group="bench-path"))
            bridge = Bridge(cfg)
            hook_stamps(bridge, stamps, settled)
            subscribed = threading.Event()  # until the SUBACK, the share group does not exist: messages drop
            bridge._client.on_subscribe = lambda *_: subscribed.set()
            bridge.start()
            freeze_startup_heap()  # as run_bridge does
            wait_for(subscribed.is_set, 30, message="bridge subscribed")
            # A child of its own, so that the publisher does not share our GIL.
            publisher = subprocess.Popen([sys.executable, __file__, "--publisher", str(mosq.port), "--rate",
                                          str(args.rate), "--seconds", str(args.seconds)], start_new_session=True)
            try:
                wait_for(lambda: settled[0] >= n, args.seconds + 60, interval=0.2,  # rare looks: they cost GIL
                         message=lambda: f"{n} messages settled (have {settled[0]})")
            finally:
                publisher.wait(30)
            bridge.stop()
        finally:
            tansu.kill()
            mosq.kill()
    print(json.dumps({"bench": "bridge_path", "rate_msg_s": args.rate, "load_avg_1m": round(os.getloadavg()[0], 1),
                      **percentiles(stamps, args.warmup)}))


if __name__ == "__main__":
    main()
