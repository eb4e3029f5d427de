"""Long-lived threads that restart after a crash, and the health they report.

Every daemon part that runs for the life of the process (the bridge's worker, the
agent's uplink, an HTTP server) runs in a ``SupervisedThread``. When its body raises,
the traceback is logged and the body runs again after a backoff; a part that keeps
crashing (more than ``max_restarts`` within ``window_s``) is given up as *dead*.
``Health`` gathers the parts of one process: ``/healthz`` answers 503 naming the dead
ones, and the daemon stops pinging systemd's watchdog so that systemd restarts it.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from typing import Any, Callable, Literal, Protocol

from edge_agent.common.backoff import backoff_delay

log = logging.getLogger(__name__)

State = Literal["new", "running", "restarting", "dead", "stopped"]


def record_crash(times: deque[float], now: float, window_s: float) -> int:
    """Add a crash at ``now`` to ``times``, forget those older than ``window_s``; how many remain."""
    times.append(now)
    while times and times[0] < now - window_s:
        times.popleft()
    return len(times)


class Part(Protocol):
    """Anything ``Health`` can ask: a supervised thread, or a check of the daemon's own."""

    name: str

    def dead(self) -> bool: ...

    def report(self) -> dict[str, Any]: ...


class SupervisedThread:
    """Runs ``body`` in a daemon thread; runs it again with backoff when it raises.

    ``body`` returning normally means the part has finished on purpose (it was asked to
    stop). ``on_restart`` runs in the thread before each new run, so the part can drop
    state the crash may have left half done (reconnect, rebuild a client).
    """

    def __init__(self, name: str, body: Callable[[], None], *,
                 on_restart: Callable[[], None] | None = None,
                 backoff_min_s: float = 0.5, backoff_max_s: float = 30.0,
                 max_restarts: int = 5, window_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic):
        self.name = name
        self._body = body
        self._on_restart = on_restart
        self._backoff_min_s = backoff_min_s
        self._backoff_max_s = backoff_max_s
        self._max_restarts = max_restarts
        self._window_s = window_s
        self._clock = clock
        self._crashes: deque[float] = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.state: State = "new"
        self.restarts = 0
        self.last_error: str | None = None

    # --- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._supervise, name=self.name, daemon=True)
        self.state = "running"
        self._thread.start()

    def stop_restarting(self) -> None:
        """The daemon is stopping: a crash from now on ends the part instead of restarting it."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- health ---------------------------------------------------------------------------

    def dead(self) -> bool:
        return self.state == "dead"

    def report(self) -> dict[str, Any]:
        return {"state": self.state, "restarts": self.restarts, "last_error": self.last_error}

    # --- the thread -----------------------------------------------------------------------

    def _supervise(self) -> None:
        while True:
            try:
                self._body()
            except BaseException as e:  # noqa: BLE001 - SystemExit from a library must not end us silently
                if not self._crashed(e):
                    return
                continue
            self.state = "stopped"
            return

    def _crashed(self, error: BaseException) -> bool:
        """Log the crash; True when the body should run again (after the backoff)."""
        self.last_error = f"{type(error).__name__}: {error}"[:500]
        log.error("thread %s crashed: %s\n%s", self.name, self.last_error,
                  "".join(traceback.format_exception(error)).rstrip())
        if self._stop.is_set():
            self.state = "stopped"
            return False
        if record_crash(self._crashes, self._clock(), self._window_s) > self._max_restarts:
            self.state = "dead"
            log.critical("thread %s crashed %d times in %.0f s: giving up, the process reports unhealthy",
                         self.name, len(self._crashes), self._window_s)
            return False
        self.state = "restarting"
        delay = backoff_delay(len(self._crashes), self._backoff_min_s, self._backoff_max_s)
        if self._stop.wait(delay):
            self.state = "stopped"
            return False
        self.restarts += 1
        if self._on_restart is not None:
            try:
                self._on_restart()
            except Exception as e:  # noqa: BLE001 - a failed reset counts as the next crash
                return self._crashed(e)
        self.state = "running"
        return True


class Check:
    """A part whose health the daemon computes itself (e.g. cameras stuck past their budget)."""

    def __init__(self, name: str, failing: Callable[[], str | None]):
        self.name = name
        self._failing = failing

    def dead(self) -> bool:
        return self._failing() is not None

    def report(self) -> dict[str, Any]:
        why = self._failing()
        return {"state": "dead" if why else "running", "last_error": why}


class Health:
    """The long-lived parts of one process, for ``/healthz``, status and the watchdog."""

    def __init__(self) -> None:
        self._parts: dict[str, Part] = {}

    def add(self, part: Part) -> Part:
        self._parts[part.name] = part
        return part

    def dead(self) -> list[str]:
        return [name for name, part in self._parts.items() if part.dead()]

    def report(self) -> dict[str, dict[str, Any]]:
        return {name: part.report() for name, part in self._parts.items()}

    def healthz(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body): 503 naming the dead parts, else 200."""
        dead = self.dead()
        if dead:
            return 503, {"status": "unhealthy", "dead": dead, "parts": self.report()}
        return 200, {"status": "ok", "parts": self.report()}
