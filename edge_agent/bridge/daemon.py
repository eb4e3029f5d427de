"""``edge-agent bridge -c bridge.yaml``: the bridge daemon, its HTTP API thread and systemd."""

from __future__ import annotations

import gc
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from edge_agent.bridge.config import load_bridge
from edge_agent.bridge.worker import Bridge
from edge_agent.common import logs
from edge_agent.common.config import ConfigError, missing_secrets
from edge_agent.common.supervised import SupervisedThread
from edge_agent.common.systemd import notify

log = logging.getLogger(__name__)


def serve_http(bridge: Bridge) -> Callable[[], None]:
    """Serve the HTTP API in a supervised thread (part ``http``); returns a function that stops it."""
    host, port = bridge.config.http.host_port
    import uvicorn

    from edge_agent.bridge.api import create_app

    config = uvicorn.Config(create_app(bridge), host=host, port=port, log_level="warning", lifespan="off")
    servers: list[uvicorn.Server] = []  # the current run's server: a crashed one is not reused
    stopping = threading.Event()

    def serve() -> None:
        servers[:] = [uvicorn.Server(config)]
        servers[0].run()  # a failed bind ends in SystemExit: the supervisor restarts it too
        if not stopping.is_set():
            raise RuntimeError("the HTTP server stopped by itself")

    part = SupervisedThread("http", serve)
    bridge.parts.add(part)
    part.start()
    # READY=1 and the log line below should mean "answers HTTP": wait (bounded) for uvicorn.
    deadline = time.monotonic() + 30
    while not (servers and servers[0].started) and not part.dead() and time.monotonic() < deadline:
        time.sleep(0.02)
    if servers and servers[0].started:
        log.info("HTTP API listening on %s:%s", host, port)
    else:
        log.error("the HTTP API on %s:%s did not start", host, port)

    def stop_uvicorn() -> None:
        stopping.set()
        part.stop_restarting()
        for server in servers:
            server.should_exit = True
        part.join(timeout=5)
    return stop_uvicorn


def run_bridge(path: Path) -> int:
    """``edge-agent bridge -c PATH``: run until SIGTERM/SIGINT, then drain and exit 0 (2: bad config)."""
    try:
        cfg = load_bridge(path)
        problems = missing_secrets(cfg)
        if problems:
            raise ConfigError(problems)
    except ConfigError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return 2
    logs.setup(cfg.log.level, cfg.log.format)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # first: a SIGTERM during start-up still drains
        signal.signal(sig, lambda *_: stop.set())
    bridge = Bridge(cfg)
    bridge.start()
    stop_http = serve_http(bridge)
    freeze_startup_heap()
    notify("READY=1")
    while not stop.wait(1.0):
        # edge-bridge.service has WatchdogSec: a hung main loop or a dead worker thread gets restarted.
        if bridge.alive():
            notify("WATCHDOG=1")
        else:
            log.error("dead for good: %s; withholding the watchdog ping", ", ".join(bridge.parts.dead()))
    notify("STOPPING=1")
    log.info("signal received: draining")
    bridge.stop(timeout=20)  # inside the unit's TimeoutStopSec=30, with room to disconnect
    stop_http()
    return 0


def freeze_startup_heap() -> None:
    """Leave what start-up allocated (modules, pydantic and FastAPI schemas) out of every later GC pass.

    Those objects live as long as the process; a full collection walked all of them and
    stopped every thread, which showed as the bridge's latency tail (docs/bridge.md).
    """
    gc.freeze()
