#!/usr/bin/env python3
"""The agent with one camera at 5 fps: does it hold the rate, how much memory and CPU does it use?

Starts a private Mosquitto, an in-process acker (stand-in bridge) and `edge-agent run` with one
camera playing the PETS09-S2L1 clip in a loop at 5 fps with the real YOLOX-nano model. After a
warm-up it samples the agent's RSS (/proc) and CPU time, and reads the processed frame count
from the agent's /api/v1/status. Prints one JSON line last.

    .venv/bin/python scripts/bench_agent.py [--seconds 60] [--warmup 15] [--fps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from edge_testkit.mqtt import start_mosquitto
from edge_testkit.processes import (
    AgentProcess,
    free_port,
    process_cpu_seconds,
    shared_dir,
    wait_for,
)

RSS_LIMIT_MB = 250.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_acker(port: int) -> mqtt.Client:
    """Acks every envelope at once, like a bridge whose Kafka is instant, so the outbox stays empty."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-agent-acker", protocol=mqtt.MQTTv5)

    def on_message(c, userdata, msg) -> None:
        env = json.loads(msg.payload)
        c.publish(f"edge/{env['device_id']}/ack", json.dumps({"seq": [[env["seq"], env["seq"]]]}), qos=1)

    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.subscribe("edge/+/up/#", qos=1)
    client.loop_start()
    return client


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=15.0)
    ap.add_argument("--fps", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    video = shared_dir() / "footage" / "PETS09-S2L1" / "PETS09-S2L1.avi"
    model = shared_dir() / "models" / "yolox_nano.onnx"
    for path in (video, model):
        if not path.is_file():
            print(f"missing {path} (set EDGE_SHARED_DIR)", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmpdir:
        tmp = Path(tmpdir)
        broker = start_mosquitto(tmp / "mosquitto")
        acker = start_acker(broker.port)
        http_port = free_port()
        cfg = {"device_id": "bench-1", "mqtt": {"host": "127.0.0.1", "port": broker.port},
               "outbox": {"path": str(tmp / "outbox")}, "state_dir": str(tmp / "state"),
               "model": {"path": str(model), "threads": args.threads, "classes": ["person"]},
               "cameras": [{"id": "cam-1", "source": str(video), "loop": True, "fps": args.fps,
                            "lines": [{"id": "v", "points": [[0.5, 0.0], [0.5, 1.0]]}]}],
               "report": {"interval_s": 10}, "http": {"listen": f"127.0.0.1:{http_port}"},
               "commands": {"enabled": True}, "log": {"level": "WARNING"}}
        (tmp / "agent.yaml").write_text(yaml.safe_dump(cfg))
        agent = AgentProcess(["run", "-c", str(tmp / "agent.yaml")], tmp / "agent.log").start()
        http = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=10)
        try:
            def frames() -> int:
                return http.get("/api/v1/status").json()["cameras"]["cam-1"]["frames"]

            wait_for(lambda: agent.alive and _quiet(frames) > 0, 120, message="first processed frame")
            time.sleep(args.warmup)  # a benchmark's measuring window, not a synchronisation
            pid = agent.pid
            assert pid is not None
            f0, c0, t0 = frames(), process_cpu_seconds(pid), time.monotonic()
            rss_samples = []
            while time.monotonic() - t0 < args.seconds:
                rss_samples.append(rss_mb(pid))
                time.sleep(1.0)
            f1, c1, t1 = frames(), process_cpu_seconds(pid), time.monotonic()
            status = http.get("/api/v1/status").json()
        finally:
            http.close()
            agent.stop()
            acker.loop_stop()
            broker.kill()
    elapsed = t1 - t0
    fps = (f1 - f0) / elapsed
    result = {
        "bench": "agent_one_camera",
        "target_fps": args.fps,
        "processed_fps": round(fps, 2),
        "rate_held": fps >= 0.95 * args.fps,
        "rss_mb_max": round(max(rss_samples), 1),
        "rss_mb_mean": round(sum(rss_samples) / len(rss_samples), 1),
        "rss_ok": max(rss_samples) <= RSS_LIMIT_MB,
        "cpu_percent_of_one_core": round(100 * (c1 - c0) / elapsed, 1),
        "cpu_cores": os.cpu_count(),
        "model_threads": args.threads,
        "seconds": round(elapsed, 1),
        "outbox_depth_end": status["outbox"]["depth"],
        "skipped_frames": status["cameras"]["cam-1"]["skipped"],
    }
    print(json.dumps(result))
    return 0


def _quiet(fn):
    try:
        return fn()
    except (httpx.HTTPError, KeyError, ValueError):
        return 0


if __name__ == "__main__":
    sys.exit(main())
