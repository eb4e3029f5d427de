"""Keeps the camera workers running: one failing camera never takes the others down.

The supervisor owns one slot per configured camera. A worker that cannot be built
(bad model, unreadable state dir) or whose processing thread died is rebuilt with
exponential backoff. A worker whose thread is alive but whose heartbeat stopped is
*stuck* (a hung native call cannot be interrupted from Python); a worker whose thread
keeps dying (more than ``max_deaths`` within ``death_window_s``) is *dead* and no
longer rebuilt. Either way ``failing()`` says so, ``/healthz`` answers 503, the daemon
stops its watchdog pings, and systemd restarts the whole process. A worker that cannot
be built keeps being retried (an unreachable camera is not a bug), and sources that
fail are the reader's business (it reconnects).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from edge_agent.common.backoff import backoff_delay
from edge_agent.common.envelope import Draft
from edge_agent.common.supervised import record_crash
from edge_agent.vision.config import CameraConfig

log = logging.getLogger(__name__)


class UnknownCamera(LookupError):
    """A camera id the agent does not run."""


class CameraView(Protocol):
    """What people see of a camera (liveview.LiveView)."""

    def snapshot(self, *, raw: bool = False) -> bytes | None: ...
    def next_stream_jpeg(self, after: int, timeout: float) -> tuple[int, bytes] | None: ...


class Worker(Protocol):
    camera: CameraConfig
    view: CameraView

    def start(self) -> None: ...
    def stop(self, timeout: float = 5.0) -> None: ...
    def status(self) -> dict: ...
    def heartbeat(self) -> float: ...
    def alive(self) -> bool: ...


WorkerFactory = Callable[[CameraConfig], Worker]


@dataclass
class _Slot:
    camera: CameraConfig
    worker: Worker | None = None
    failures: int = 0
    next_try: float = 0.0
    started_at: float = 0.0
    last_error: str | None = None
    restarts: int = 0
    deaths: deque[float] = field(default_factory=deque)  # when its thread died, within the window
    dead: bool = False  # died too often: not rebuilt until restarted by hand or by a config change


class CameraSupervisor:
    def __init__(self, factory: WorkerFactory, *, emit: Callable[[Draft], Any] | None = None,
                 stuck_after_s: float = 30.0, backoff_min_s: float = 1.0, backoff_max_s: float = 60.0,
                 stable_after_s: float = 60.0, stop_timeout_s: float = 5.0,
                 max_deaths: int = 5, death_window_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic):
        self._factory = factory
        self._emit = emit
        self._stuck_after_s = stuck_after_s
        self._backoff_min_s = backoff_min_s
        self._backoff_max_s = backoff_max_s
        self._stable_after_s = stable_after_s
        self._stop_timeout_s = stop_timeout_s
        self._max_deaths = max_deaths
        self._death_window_s = death_window_s
        self._clock = clock
        self._slots: dict[str, _Slot] = {}
        self._lock = threading.RLock()  # commands, live config and the main loop all come here

    # --- life cycle ---------------------------------------------------------------------

    def start(self, cameras: list[CameraConfig]) -> None:
        with self._lock:
            for cam in cameras:
                self._slots[cam.id] = _Slot(cam)
                if cam.enabled:
                    self._launch(self._slots[cam.id])

    def stop_all(self) -> None:
        """Stop every worker (each flushes its report and emits camera.offline), all at once:
        one at a time, eight cameras would outlast systemd's TimeoutStopSec."""
        with self._lock:
            slots = list(self._slots.values())
        stoppers = [threading.Thread(target=self._halt, args=(slot,), name=f"stop-{slot.camera.id}")
                    for slot in slots]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join(self._stop_timeout_s + 5)

    def apply(self, cameras: list[CameraConfig], *, restart_all: bool = False) -> dict[str, list[str]]:
        """Bring the running set in line with ``cameras``; untouched cameras keep running."""
        done: dict[str, list[str]] = {"started": [], "stopped": [], "restarted": [], "kept": []}
        wanted = {c.id: c for c in cameras}
        with self._lock:
            for cam_id in [i for i in self._slots if i not in wanted]:
                self._halt(self._slots.pop(cam_id))
                done["stopped"].append(cam_id)
            for cam_id, cam in wanted.items():
                slot = self._slots.get(cam_id)
                if slot is None:
                    slot = self._slots[cam_id] = _Slot(cam)
                    if cam.enabled:
                        self._launch(slot)
                    done["started"].append(cam_id)
                elif slot.camera != cam or restart_all:
                    self._halt(slot)
                    self._slots[cam_id] = slot = _Slot(cam, restarts=slot.restarts)
                    if cam.enabled:
                        self._launch(slot)
                    done["restarted"].append(cam_id)
                else:
                    done["kept"].append(cam_id)
        return done

    def restart(self, camera_id: str) -> None:
        with self._lock:
            slot = self._slot(camera_id)
            self._halt(slot)
            slot.failures, slot.next_try = 0, 0.0
            slot.deaths.clear()
            slot.dead = False
            slot.restarts += 1
            if slot.camera.enabled:
                self._launch(slot)

    # --- supervision --------------------------------------------------------------------

    def check(self) -> None:
        """Called periodically: rebuild dead or never-built workers once their backoff is over."""
        now = self._clock()
        with self._lock:
            for slot in self._slots.values():
                if not slot.camera.enabled:
                    continue
                if slot.worker is not None and now - slot.started_at > self._stable_after_s:
                    slot.failures = 0  # it ran long enough: the next failure starts the backoff afresh
                if slot.worker is not None and not slot.worker.alive():
                    self._died(slot, now)
                    self._halt(slot)
                if slot.worker is None and not slot.dead and now >= slot.next_try:
                    slot.restarts += 1
                    self._launch(slot)

    def stuck(self) -> list[str]:
        """Cameras whose processing thread is alive but has not beaten for ``stuck_after_s``."""
        now = self._clock()
        with self._lock:
            return [cam_id for cam_id, slot in self._slots.items()
                    if slot.worker is not None and slot.worker.alive()
                    and now - slot.worker.heartbeat() > self._stuck_after_s]

    def dead(self) -> list[str]:
        """Cameras whose worker thread died more often than the restart budget allows."""
        with self._lock:
            return [cam_id for cam_id, slot in self._slots.items() if slot.dead]

    def failing(self) -> str | None:
        """Why the cameras make the process unhealthy (stuck or dead ones), or None."""
        problems = [f"{cam_id} stuck" for cam_id in self.stuck()] + [f"{cam_id} dead" for cam_id in self.dead()]
        return ", ".join(problems) or None

    def healthy(self) -> bool:
        return self.failing() is None

    # --- queries ------------------------------------------------------------------------

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._slots)

    def view(self, camera_id: str) -> CameraView | None:
        """The camera's live view; None while it has no running worker; UnknownCamera if not configured."""
        with self._lock:
            worker = self._slot(camera_id).worker
        return worker.view if worker is not None else None

    def status(self) -> dict[str, dict]:
        stuck = set(self.stuck())
        out: dict[str, dict] = {}
        with self._lock:
            for cam_id, slot in self._slots.items():
                if not slot.camera.enabled:
                    info: dict = {"id": cam_id, "state": "disabled"}
                elif slot.dead:
                    info = {"id": cam_id, "state": "dead"}
                elif slot.worker is None:
                    info = {"id": cam_id, "state": "failed",
                            "retry_in_s": round(max(0.0, slot.next_try - self._clock()), 1)}
                else:
                    try:
                        info = dict(slot.worker.status())
                    except Exception as e:  # a broken status() must not break get_status
                        info = {"id": cam_id, "state": "unknown", "status_error": repr(e)}
                    if cam_id in stuck:
                        info["state"] = "stuck"
                info.update(restarts=slot.restarts, last_error=slot.last_error)
                out[cam_id] = info
        return out

    # --- internals ----------------------------------------------------------------------

    def _slot(self, camera_id: str) -> _Slot:
        slot = self._slots.get(camera_id)
        if slot is None:
            raise UnknownCamera(camera_id)
        return slot

    def _launch(self, slot: _Slot) -> None:
        try:
            worker = self._factory(slot.camera)
            worker.start()
        except Exception as e:
            log.exception("camera %s: cannot start its worker", slot.camera.id, extra={"camera_id": slot.camera.id})
            self._failed(slot, f"cannot start: {type(e).__name__}: {e}")
            return
        slot.worker = worker
        slot.started_at = self._clock()

    def _died(self, slot: _Slot, now: float) -> None:
        """The worker's thread ended on its own: rebuild it, unless that keeps happening."""
        deaths = record_crash(slot.deaths, now, self._death_window_s)
        self._failed(slot, "camera worker thread died")
        if deaths > self._max_deaths:
            slot.dead = True
            log.critical("camera %s: worker died %d times in %.0f s; giving up, the process reports unhealthy",
                         slot.camera.id, deaths, self._death_window_s,
                         extra={"camera_id": slot.camera.id})

    def _failed(self, slot: _Slot, reason: str) -> None:
        slot.failures += 1
        delay = backoff_delay(slot.failures, self._backoff_min_s, self._backoff_max_s)
        slot.next_try = self._clock() + delay
        slot.last_error = reason
        log.error("camera %s: %s; next try in %.1f s", slot.camera.id, reason, delay,
                  extra={"camera_id": slot.camera.id})
        if self._emit is not None:
            try:
                self._emit(Draft(stream="camera.events", type="camera.stream_error", camera_id=slot.camera.id,
                                 data={"error": reason, "stage": "worker", "attempt": slot.failures,
                                       "retry_in_s": round(delay, 3)}))
            except Exception:
                log.exception("camera %s: could not record the failure", slot.camera.id)

    def _halt(self, slot: _Slot) -> None:
        worker, slot.worker = slot.worker, None
        if worker is None:
            return
        try:
            worker.stop(self._stop_timeout_s)
        except Exception:
            log.exception("camera %s: stop failed", slot.camera.id)
