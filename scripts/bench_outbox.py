#!/usr/bin/env python3
"""Outbox and uplink figures: durable puts/s per fsync policy, drain rate to Mosquitto with
end-to-end acks, and the RSS of an idle agent. Prints one JSON line last.

    .venv/bin/python scripts/bench_outbox.py [--puts 20000] [--drain 20000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from edge_agent.agent.config import AgentMqttConfig, OutboxConfig
from edge_agent.agent.outbox import Outbox
from edge_agent.agent.uplink import Uplink
from edge_agent.common.envelope import Draft
from edge_testkit.mqtt import start_mosquitto
from edge_testkit.processes import AgentProcess, free_port, wait_for

# A stand-in bridge in its own process (so it does not share our GIL): acks seq ranges every 20 ms.
ACKER = textwrap.dedent("""
    import json, sys, threading, time
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    pending, lock = {}, threading.Lock()
    def on_message(c, u, m):
        env = json.loads(m.payload)
        with lock:
            pending.setdefault(env["device_id"], []).append(env["seq"])
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, client_id="bench-acker")
    c.on_message = on_message
    c.max_inflight_messages_set(1000)
    c.connect("127.0.0.1", int(sys.argv[1]))
    c.subscribe("edge/+/up/#", qos=1)
    c.loop_start()
    print("ready", flush=True)
    while True:
        time.sleep(0.02)
        with lock:
            batch = dict(pending)
            pending.clear()
        for dev, seqs in batch.items():
            seqs.sort(); ranges = []
            for s in seqs:
                if ranges and s == ranges[-1][1] + 1: ranges[-1][1] = s
                else: ranges.append([s, s])
            c.publish(f"edge/{dev}/ack", json.dumps({"seq": ranges}), qos=1)
""")


def bench_puts(tmp: Path, fsync: str, n: int, producers: int) -> float:
    box = Outbox(OutboxConfig(path=tmp / f"puts-{fsync}-{producers}", fsync=fsync), "bench")
    draft = Draft(stream="ai.inference.results", type="counting.crossing",
                  data={"line": "door", "direction": "in", "class": "person", "track_id": 42})
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(producers) as ex:
            list(ex.map(lambda _: box.put(draft), range(n)))
        return n / (time.perf_counter() - t0)
    finally:
        box.close()


def bench_drain(tmp: Path, n: int) -> dict:
    broker = start_mosquitto(tmp / "mosquitto", persistence=False, extra_conf="max_queued_messages 100000\n")
    acker = subprocess.Popen([sys.executable, "-c", ACKER, str(broker.port)], stdout=subprocess.PIPE, text=True)
    try:
        assert acker.stdout is not None and acker.stdout.readline().strip() == "ready"
        box = Outbox(OutboxConfig(path=tmp / "drain", fsync="batch"), "bench")
        draft = Draft(stream="ai.inference.results", type="counting.crossing", data={"line": "door", "n": 1})
        with ThreadPoolExecutor(32) as ex:
            list(ex.map(lambda _: box.put(draft), range(n)))
        uplink = Uplink(AgentMqttConfig(host=broker.host, port=broker.port, drain_rate=0, max_inflight=2000),
                        "bench", box)
        t0, cpu0 = time.perf_counter(), time.process_time()
        uplink.start()
        wait_for(lambda: box.depth() == 0, 300, interval=0.01, message="outbox drained")
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        uplink.stop()
        box.close()
        # msg per CPU second of this process: what one free core would do, on a busy machine
        return {"messages": n, "seconds": round(seconds, 3), "msg_per_s": round(n / seconds),
                "cpu_seconds": round(cpu, 3), "msg_per_cpu_s": round(n / cpu)}
    finally:
        acker.kill()
        broker.kill()


def idle_agent_rss_mb(tmp: Path) -> float:
    broker = start_mosquitto(tmp / "mosquitto-idle", persistence=False)
    http_port = free_port()
    cfg = tmp / "idle.yaml"
    cfg.write_text(json.dumps({"device_id": "idle", "mqtt": {"host": broker.host, "port": broker.port},
                               "outbox": {"path": str(tmp / "idle-outbox")},
                               "http": {"listen": f"127.0.0.1:{http_port}"}}))
    proc = AgentProcess(["run", "-c", str(cfg)], tmp / "idle.log").start()
    try:
        proc.wait_listening("127.0.0.1", http_port, 30)
        time.sleep(3)  # a bench, not a test: let it settle into idle before reading RSS
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
        raise RuntimeError("no VmRSS")
    finally:
        proc.stop()
        broker.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--puts", type=int, default=20000)
    ap.add_argument("--drain", type=int, default=20000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        puts = {}
        for fsync in ("always", "batch", "never"):
            n = args.puts // 5 if fsync == "always" else args.puts
            puts[fsync] = {"1_producer": round(bench_puts(tmp, fsync, n // 10, 1)),
                           "32_producers": round(bench_puts(tmp, fsync, n, 32))}
            print(f"puts/s {fsync}: {puts[fsync]}", file=sys.stderr)
        drain = bench_drain(tmp, args.drain)
        print(f"drain: {drain}", file=sys.stderr)
        rss = idle_agent_rss_mb(tmp)
        print(f"idle agent RSS: {rss} MB", file=sys.stderr)
    print(json.dumps({"bench": "outbox", "puts_per_s": puts, "drain": drain, "idle_agent_rss_mb": rss,
                      "targets": {"batch_puts_per_s": 5000, "drain_msg_per_s": 3000, "idle_rss_mb": 80}}))


if __name__ == "__main__":
    main()
