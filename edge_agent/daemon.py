"""``edge-agent run``: the camera-host daemon.

Threads, one job each: the outbox writer, the uplink (MQTT), the loopback HTTP server,
and per camera a reader and a processing thread. The main thread only waits for a
signal, supervises, and shuts everything down in order.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path

import sdnotify

from . import __version__, logs
from .agent_http import AgentHttp
from .config import AgentConfig, ConfigError, load_agent
from .envelope import Draft, Envelope
from .outbox import Outbox
from .uplink import Uplink

log = logging.getLogger(__name__)


class Agent:
    def __init__(self, cfg: AgentConfig, config_path: Path | None = None):
        self.cfg = cfg
        self.config_path = config_path
        self.started_at = time.time()
        self.stop_requested = threading.Event()
        self.outbox = Outbox(cfg.outbox, cfg.device_id)
        self.uplink = Uplink(cfg.mqtt, cfg.device_id, self.outbox)
        host, port = cfg.http.host_port
        self.http = AgentHttp(host, port, self.outbox, self.status)
        self._notify = sdnotify.SystemdNotifier()

    def emit(self, draft: Draft) -> Envelope:
        return self.outbox.put(draft)

    def status(self) -> dict:
        ob = self.outbox.stats()
        return {
            "device_id": self.cfg.device_id,
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 1),
            "outbox": {k: ob[k] for k in ("depth", "bytes", "max_bytes", "oldest_age_s", "by_stream", "inflight")},
            "mqtt": self.uplink.status(),
        }

    def start(self) -> None:
        self.http.start()
        self.uplink.start()
        self.emit(Draft(stream="camera.events", type="agent.started",
                        data={"version": __version__, "cameras": [c.id for c in self.cfg.cameras],
                              "outbox_reset": self.outbox.reset_report}))
        self._notify.notify("READY=1")
        log.info("agent %s started; http on %s:%s", self.cfg.device_id, *self.cfg.http.host_port)

    def run_until_stopped(self) -> None:
        while not self.stop_requested.wait(1.0):
            self._notify.notify("WATCHDOG=1")

    def shutdown(self) -> None:
        self._notify.notify("STOPPING=1")
        try:
            self.emit(Draft(stream="camera.events", type="agent.stopped", data={"reason": "signal"}))
        except Exception:  # noqa: BLE001 - stopping must go on
            log.exception("cannot record agent.stopped")
        # Give the uplink a moment to hand over what is queued; the outbox keeps the rest.
        deadline = time.monotonic() + 2.0
        while self.uplink.connected and self.outbox.unsent_count() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.uplink.stop()
        self.http.stop()
        self.outbox.close()
        log.info("agent %s stopped", self.cfg.device_id)


def run_agent(config_path: Path) -> int:
    try:
        cfg = load_agent(config_path)
    except ConfigError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return 2
    logs.setup(cfg.log.level, cfg.log.format)
    agent = Agent(cfg, config_path)

    def on_signal(signum, frame) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        agent.stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.start()
    try:
        agent.run_until_stopped()
    finally:
        agent.shutdown()
    return 0
