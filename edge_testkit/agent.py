"""Driving an agent from a test, a benchmark or the demo: its config file, its HTTP API, systemd's socket."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from edge_testkit.processes import AgentProcess, free_port, wait_for

DEVICE = "gw-1"


def write_agent_config(tmp_path: Path, broker, **overrides) -> tuple[Path, int]:
    http_port = free_port()
    cfg = {
        "device_id": DEVICE,
        "mqtt": {"host": broker.host, "port": broker.port, "ack_timeout_s": 2.0, "reconnect_min_s": 0.1,
                 "reconnect_max_s": 1.0},
        "outbox": {"path": str(tmp_path / "outbox")},
        "http": {"listen": f"127.0.0.1:{http_port}"},
        "log": {"level": "INFO"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, http_port


class AgentApi:
    def __init__(self, port: int):
        # One pooled client: a new httpx client per call builds an SSL context, which costs CPU each time.
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30,
                                 limits=httpx.Limits(max_connections=32))

    def publish(self, topic: str, message: dict) -> httpx.Response:
        return self.http.post("/api/v1/queue/publish", json={"topic": topic, "message": message})

    def status(self) -> dict:
        return self.http.get("/api/v1/status").json()

    def metric(self, name: str) -> float:
        text = self.http.get("/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and not line.startswith(name + "_created"))

    def wait_up(self, proc, timeout: float = 30) -> None:
        def up() -> bool:
            if not proc.alive:
                raise AssertionError(f"agent exited:\n{proc.output()[-3000:]}")
            try:
                return self.http.get("/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
        wait_for(up, timeout, interval=0.05, message="agent /healthz")


def publish_many(api: AgentApi, topic: str, start: int, n: int) -> list[str]:
    """Concurrent local producers; returns the message ids the agent confirmed as durable."""
    def one(i: int) -> str:
        r = api.publish(topic, {"type": "test.event", "i": i})
        assert r.status_code == 200, r.text
        return r.json()["messageId"]

    with ThreadPoolExecutor(16) as ex:
        return list(ex.map(one, range(start, start + n)))


class NotifySocket:
    """A stand-in for systemd's notify socket: a real datagram socket the agent writes to."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def seen(self, text: str) -> list[float]:
        return [t for t, m in list(self.messages) if text in m.split("\n")]

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


@dataclass
class CameraAgent:
    """A running ``edge-agent run`` with one real camera (a looping clip) and its own Mosquitto."""

    proc: AgentProcess
    api: AgentApi
    broker: Any
    config_path: Path
    port: int
    camera_id: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_processing(self, frames: int = 1, timeout: float = 90) -> dict:
        """The camera's status once it has processed at least ``frames`` frames."""
        return wait_for(lambda: (c := self.api.status()["cameras"][self.camera_id])["frames"] >= frames and c,
                        timeout, interval=0.1, message=f"camera {self.camera_id} processing {frames} frames")

    def close(self) -> None:
        self.proc.kill()
        self.api.http.close()
        self.broker.kill()


def start_camera_agent(tmp_path: Path, video: Path, model: Path, *, camera_id: str = "cam-1",
                       lines: list[dict] | None = None, zones: list[dict] | None = None,
                       fps: float = 5.0) -> CameraAgent:
    """An agent counting ``video`` on a loop at ``fps`` (the live path: reader, pacing, live view)."""
    from edge_testkit.mqtt import start_mosquitto

    broker = start_mosquitto(tmp_path / "mosquitto")
    camera = {"id": camera_id, "source": str(video), "loop": True, "fps": fps,
              "lines": lines or [], "zones": zones or []}
    cfg, port = write_agent_config(tmp_path, broker, model={"path": str(model)}, cameras=[camera],
                                   state_dir=str(tmp_path / "state"))
    proc = AgentProcess(["run", "-c", str(cfg)], tmp_path / "agent.log").start()
    api = AgentApi(port)
    try:
        api.wait_up(proc, timeout=60)
    except BaseException:
        proc.kill()
        broker.kill()
        raise
    return CameraAgent(proc, api, broker, cfg, port, camera_id)
