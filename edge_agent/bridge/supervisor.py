"""``workers: N``: N bridge workers in one share group under the daemon's process.

The daemon's own process is worker 1: it also serves the HTTP API (whose publishes go
through its producer) and supervises workers 2..N, each a child process running a
``Bridge`` with its own MQTT session (``worker_client_id``) and producer. Mosquitto
spreads the shared subscription over the sessions, so the workers split the stream
as separate bridge hosts do, and each has a core and a broker window of its own.

Each child is watched by a supervised thread: a child that exits unasked is started
again with backoff, and after too many crashes the part is dead (``/healthz`` 503,
no watchdog ping). Metrics are prometheus_client's multiprocess mode: every process
writes its values to files in one directory, ``/metrics`` merges them.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from functools import partial
from pathlib import Path
from typing import Any, Callable

from edge_agent.bridge.config import BridgeConfig, worker_client_id
from edge_agent.common import logs
from edge_agent.common.supervised import Health, SupervisedThread

__all__ = ["WorkerProcesses", "freeze_startup_heap", "merged_exposition", "multiprocess_metrics", "worker_config"]

log = logging.getLogger(__name__)

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's name for it
CHILD_STOP_TIMEOUT_S = 20.0  # a child's drain on SIGTERM, as the daemon's own
PARENT_CHECK_S = 1.0  # a child whose supervisor died stops within this


def multiprocess_metrics() -> Path:
    """Switch prometheus_client to multiprocess mode (for this process and its children).

    Must run before anything imports prometheus_client: it picks its value class at import.
    """
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before multiprocess metrics were set up")
    path = Path(tempfile.mkdtemp(prefix="edge-bridge-metrics-"))
    os.environ[METRICS_DIR_ENV] = str(path)
    return path


def remove_metrics_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.environ.pop(METRICS_DIR_ENV, None)


def merged_exposition() -> tuple[bytes, str] | None:
    """Every worker's metrics as one Prometheus page, or None when there is one process only."""
    if not os.environ.get(METRICS_DIR_ENV):
        return None
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def worker_config(cfg: BridgeConfig, index: int) -> BridgeConfig:
    """Worker ``index``'s config (0-based): its own MQTT client id, hence its own session."""
    mqtt = cfg.mqtt.model_copy(update={"client_id": worker_client_id(cfg.mqtt.client_id, cfg.workers, index)})
    return cfg.model_copy(update={"mqtt": mqtt})


def freeze_startup_heap() -> None:
    """Leave what start-up allocated (modules, pydantic and FastAPI schemas) out of every later GC pass.

    Those objects live as long as the process; a full collection walked all of them and
    stopped every thread, which showed as the bridge's latency tail (docs/bridge.md).
    """
    gc.freeze()


class WorkerProcesses:
    """Workers 2..N as child processes, each supervised by a thread (parts ``bridge-worker-<i>``)."""

    def __init__(self, cfg: BridgeConfig, health: Health, *, restart_backoff_s: float = 0.5,
                 max_restarts: int = 5):
        self._cfg = cfg
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._procs: dict[int, subprocess.Popen] = {}
        self.parts = [SupervisedThread(f"bridge-worker-{i + 1}", partial(self._run_child, i),
                                       backoff_min_s=restart_backoff_s, max_restarts=max_restarts)
                      for i in range(1, cfg.workers)]
        for i, part in enumerate(self.parts, start=1):
            health.add(_ChildPart(part, partial(self._pid_of, i)))

    def start(self) -> None:
        for part in self.parts:
            part.start()

    def _pid_of(self, index: int) -> int | None:
        """The pid of worker ``index``'s live process, if it runs."""
        with self._lock:
            proc = self._procs.get(index)
            return proc.pid if proc is not None and proc.poll() is None else None

    def stop(self, timeout: float = CHILD_STOP_TIMEOUT_S + 5) -> bool:
        """SIGTERM every child (each drains as the daemon does) and wait; True when all exited by themselves."""
        self._stopping.set()
        for part in self.parts:
            part.stop_restarting()
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        clean = True
        for proc in procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.error("worker process %s did not stop in %.0f s: killed", proc.pid, timeout)
                proc.kill()
                proc.wait(5)
                clean = False
        for part in self.parts:
            part.join(5)
        return clean

    def _run_child(self, index: int) -> None:
        """One run of worker ``index``: start its process, wait for it; an exit not asked for is a crash."""
        with self._lock:
            if self._stopping.is_set():
                return
            # A fresh interpreter, not multiprocessing: its spawn re-runs the __main__ of
            # `python -m edge_agent`, and a fork would copy a process that runs threads.
            proc = subprocess.Popen([sys.executable, "-c", CHILD_ENTRY, str(os.getpid())], stdin=subprocess.PIPE)
            self._procs[index] = proc
        assert proc.stdin is not None
        with proc.stdin:
            proc.stdin.write(worker_config(self._cfg, index).model_dump_json(round_trip=True).encode())
        log.info("worker %d started (pid %s)", index + 1, proc.pid)
        proc.wait()
        _forget_gauges_of(proc.pid)
        if not self._stopping.is_set():
            raise RuntimeError(f"worker process {proc.pid} exited with code {proc.returncode}")


class _ChildPart:
    """A child worker in the health report: its supervising thread's state, and its pid."""

    def __init__(self, thread: SupervisedThread, pid: Callable[[], int | None]):
        self.name = thread.name
        self._thread = thread
        self._pid = pid

    def dead(self) -> bool:
        return self._thread.dead()

    def report(self) -> dict[str, Any]:
        return {**self._thread.report(), "pid": self._pid()}


def _forget_gauges_of(pid: int | None) -> None:
    """A dead worker's live gauges (in flight) must not linger in the merged page; its counters stay."""
    if pid is not None and os.environ.get(METRICS_DIR_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


CHILD_ENTRY = "import sys; from edge_agent.bridge.supervisor import worker_main; worker_main(int(sys.argv[1]))"


def worker_main(parent_pid: int) -> None:
    """A child worker's entry: its config (JSON) on stdin, its supervisor's pid as the argument."""
    cfg = BridgeConfig.model_validate_json(sys.stdin.buffer.read())
    run_worker_process(cfg, parent_pid)


def run_worker_process(cfg: BridgeConfig, parent_pid: int) -> None:
    """A child worker: its Bridge until SIGTERM (or its supervisor is gone), then drain and exit 0.

    Exits 1 when its worker thread died for good, so that the supervisor starts it afresh.
    """
    from edge_agent.bridge.worker import Bridge

    logs.setup(cfg.log.level, cfg.log.format)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # Ctrl-C reaches the whole process group: the supervisor stops its children itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    bridge = Bridge(cfg)
    bridge.start()
    freeze_startup_heap()
    while not stop.wait(PARENT_CHECK_S):
        if os.getppid() != parent_pid:
            log.error("the bridge's supervisor is gone: stopping")
            break
        if not bridge.alive():
            log.error("dead for good: %s; exiting so that the supervisor starts this worker again",
                      ", ".join(bridge.parts.dead()))
            bridge.stop(timeout=5)
            sys.exit(1)
    bridge.stop(timeout=CHILD_STOP_TIMEOUT_S)
