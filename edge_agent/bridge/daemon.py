"""``edge-agent bridge -c bridge.yaml``: the bridge daemon, its HTTP API thread and systemd.

With ``workers: N`` above 1 it also supervises workers 2..N (``supervisor``). Nothing here
imports the metrics at module level: multiprocess metrics must be set up before that.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from edge_agent.bridge.config import BridgeConfig, load_bridge
from edge_agent.bridge.supervisor import (
    WorkerProcesses,
    freeze_startup_heap,
    multiprocess_metrics,
    remove_metrics_dir,
)
from edge_agent.common import logs
from edge_agent.common.config import ConfigError, missing_secrets, print_problems
from edge_agent.common.supervised import SupervisedThread
from edge_agent.common.systemd import notify

if TYPE_CHECKING:
    from edge_agent.bridge.worker import Bridge

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
        return print_problems(e.problems)
    logs.setup(cfg.log.level, cfg.log.format)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # first: a SIGTERM during start-up still drains
        signal.signal(sig, lambda *_: stop.set())
    metrics_dir = multiprocess_metrics() if cfg.workers > 1 else None
    try:
        return _serve(cfg, stop)
    finally:
        if metrics_dir is not None:
            remove_metrics_dir(metrics_dir)


def _serve(cfg: BridgeConfig, stop: threading.Event) -> int:
    from edge_agent.bridge.worker import Bridge

    bridge = Bridge(cfg)  # worker 1; the HTTP API publishes through it
    bridge.start()
    children = WorkerProcesses(cfg, bridge.parts)
    children.start()
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
    # Every worker drains at once: children on SIGTERM, worker 1 here, inside the unit's
    # TimeoutStopSec=30 with room to disconnect.
    stopping = threading.Thread(target=children.stop, name="stop-workers")
    stopping.start()
    bridge.stop(timeout=20)
    stopping.join()
    stop_http()
    return 0
