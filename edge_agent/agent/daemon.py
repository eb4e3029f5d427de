"""``edge-agent run``: the camera-host daemon.

Threads, one job each: the outbox writer, the uplink (MQTT), the loopback HTTP server,
the command worker, the config watcher, and per camera a reader and a processing
thread. The outbox writer, the uplink and the HTTP server restart themselves after a
crash (``SupervisedThread``); ``Health`` gathers them with the cameras. The main thread
only waits for signals, supervises the cameras, pings the systemd watchdog while no part
is dead or stuck, and shuts everything down in order.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from edge_agent import __version__
from edge_agent.agent.commands import CommandProcessor
from edge_agent.agent.config import AgentConfig
from edge_agent.agent.http import AgentHttp
from edge_agent.agent.liveconfig import ConfigChange, ConfigRejected, LiveConfig
from edge_agent.agent.outbox import Outbox
from edge_agent.agent.supervisor import CameraSupervisor, Worker
from edge_agent.agent.uplink import Uplink
from edge_agent.common import logs, systemd
from edge_agent.common.config import env_secret, print_problems
from edge_agent.common.envelope import Draft, Envelope
from edge_agent.common.supervised import Check, Health
from edge_agent.vision.config import ModelConfig

log = logging.getLogger(__name__)

# Config sections the running process cannot swap without a restart (sockets, files, identity).
RESTART_SECTIONS = ("device_id", "mqtt", "outbox", "http", "commands", "state_dir")
# Sections that change what every camera does.
ALL_CAMERA_SECTIONS = ("model", "report")
TICK_S = 0.5
FLUSH_WAIT_S = 10.0


def command_secret(cfg: AgentConfig) -> bytes | None:
    """The HMAC key; None only when none is configured (then the broker ACL is the only guard)."""
    var = cfg.commands.hmac_secret_env
    secret = env_secret(var)
    if var and not secret:
        # Fail closed: a key nobody knows, so every command gets 401 instead of running unsigned.
        log.error("commands.hmac_secret_env names %s but it is not set: every command will be refused "
                  "until it is set and the agent restarted", var)
        return os.urandom(32)
    return secret.encode() if secret else None


def restart_required(change: ConfigChange) -> list[str]:
    return [p for p in change.changed if p.split(".", 1)[0] in RESTART_SECTIONS]


class Agent:
    """The daemon's parts and the ``AgentControl`` side of remote commands."""

    def __init__(self, cfg: AgentConfig, config_path: Path | None = None, live: LiveConfig | None = None):
        self.cfg = cfg
        self.config_path = config_path
        self.live = live
        self.started_at = time.time()
        self.stop_requested = threading.Event()
        self.health = Health()
        self.outbox = Outbox(cfg.outbox, cfg.device_id)
        self.uplink = Uplink(cfg.mqtt, cfg.device_id, self.outbox)
        host, port = cfg.http.host_port
        self.http = AgentHttp(host, port, self.outbox, self.status, health=self.health.healthz, control=self,
                              max_body=cfg.outbox.max_message_bytes, max_connections=cfg.http.max_connections,
                              read_timeout_s=cfg.http.read_timeout_s)
        self._notify = systemd  # anything with notify(state): the tests record the pings
        self._detectors: dict[str, Any] = {}  # one ONNX session per model config, shared by cameras
        self._detector_lock = threading.Lock()
        self.supervisor = CameraSupervisor(self._make_worker, emit=self.emit)
        for part in (self.outbox.thread, Check("outbox", self.outbox.storage_problem), self.uplink.thread,
                     self.http.thread, Check("cameras", lambda: self.supervisor.failing())):
            self.health.add(part)
        self.commands: CommandProcessor | None = None
        if cfg.commands.enabled:
            self.commands = CommandProcessor(
                self, device_id=cfg.device_id, topic_prefix=cfg.mqtt.topic_prefix,
                secret=command_secret(cfg), window_s=cfg.commands.window_s,
                emit=self.emit, publish=self.uplink.publish_direct,
                max_packet_size=self.uplink.max_packet_size)
            self.uplink.set_command_handler(self.commands.on_message)
            self.health.add(self.commands.thread)
        if live is not None:
            live.set_callbacks(emit=self.emit, on_change=self.apply_change)

    # --- events -------------------------------------------------------------------------

    def emit(self, draft: Draft) -> Envelope:
        return self.outbox.put(draft)

    # --- cameras ------------------------------------------------------------------------

    def _detector_for(self, model: ModelConfig) -> Any:
        from edge_agent.vision.detect import (
            Detector,  # onnxruntime is heavy: only when a camera needs it
        )

        key = model.model_dump_json()
        with self._detector_lock:
            if key not in self._detectors:
                self._detectors = {key: Detector(model)}  # the old model goes once no camera uses it
            return self._detectors[key]

    def _make_worker(self, camera) -> Worker:
        from edge_agent.agent.worker import CameraWorker

        return CameraWorker(camera, self.cfg.model, self.emit, device_id=self.cfg.device_id,
                            report_interval_s=self.cfg.report.interval_s, state_dir=self.cfg.state_path,
                            detector=self._detector_for(self.cfg.model))

    # --- live config --------------------------------------------------------------------

    def apply_change(self, change: ConfigChange) -> None:
        """Apply what can change live; cameras whose config did not change keep running."""
        new = change.new
        needs_restart = restart_required(change)
        if needs_restart:
            log.warning("config %s: %s take effect at the next restart", change.version, ", ".join(needs_restart))
        touched_all = any(p.split(".", 1)[0] in ALL_CAMERA_SECTIONS for p in change.changed)
        # Keep the settings that need a restart as they run; take the rest.
        self.cfg = self.cfg.model_copy(update={"cameras": new.cameras, "model": new.model, "report": new.report,
                                               "log": new.log})
        logging.getLogger().setLevel(new.log.level)
        result = self.supervisor.apply(new.cameras, restart_all=touched_all)
        log.info("config %s applied from %s: cameras %s", change.version, change.source,
                 {k: v for k, v in result.items() if v})

    # --- AgentControl (remote commands) -------------------------------------------------

    def status(self) -> dict:
        ob = self.outbox.stats()
        out = {
            "device_id": self.cfg.device_id,
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 1),
            "outbox": {k: ob[k] for k in ("depth", "bytes", "max_bytes", "oldest_age_s", "by_stream", "inflight")},
            "mqtt": self.uplink.status(),
            "cameras": self.supervisor.status(),
            "health": self.health.healthz()[1],
        }
        if self.live is not None:
            out["config_version"] = self.live.state.version
        return out

    def config_document(self) -> tuple[str, dict]:
        if self.live is None:
            return "", self.cfg.model_dump(mode="json")
        state = self.live.state
        return state.version, state.document

    def _live(self) -> LiveConfig:
        if self.live is None:
            raise ConfigRejected(["(file): this agent runs without a config file"])
        return self.live

    def set_config(self, patch: dict, expected_version: str, *, correlation_id: str | None) -> dict:
        change = self._live().apply_patch(patch, expected_version, correlation_id=correlation_id)
        return {"version": change.version, "changed": change.changed, "restart_required": restart_required(change)}

    def reload_config(self, *, correlation_id: str | None) -> dict:
        live = self._live()
        change = live.reload(source="file", correlation_id=correlation_id)
        if change is None:
            return {"version": live.state.version, "changed": [], "restart_required": []}
        return {"version": change.version, "changed": change.changed, "restart_required": restart_required(change)}

    def restart_camera(self, camera_id: str) -> dict:
        self.supervisor.restart(camera_id)
        return {"camera_id": camera_id, "restarted": True}

    def snapshot(self, camera_id: str, *, raw: bool = False) -> bytes | None:
        view = self.supervisor.view(camera_id)
        return view.snapshot(raw=raw) if view is not None else None

    def next_stream_jpeg(self, camera_id: str, after: int, timeout: float) -> tuple[int, bytes] | None:
        """The camera's next annotated live-view frame after ``after`` (None: none within ``timeout``)."""
        view = self.supervisor.view(camera_id)
        if view is None:  # restarting: the next call finds the new worker's view
            self.stop_requested.wait(min(timeout, 0.2))
            return None
        return view.next_stream_jpeg(after, timeout)

    def flush_outbox(self) -> dict:
        """Resend everything unacked now and wait (bounded) until nothing is left unsent."""
        before = self.outbox.unsent_count()
        resent = self.uplink.status()["inflight"] if self.uplink.connected else 0
        self.uplink.resend_now()
        deadline = time.monotonic() + FLUSH_WAIT_S
        while self.uplink.connected and self.outbox.unsent_count() and time.monotonic() < deadline:
            time.sleep(0.05)  # bounded: a command must answer even if the broker stalls
        stats = self.outbox.stats()
        return {"connected": self.uplink.connected, "unsent_before": before, "resent": resent,
                "unsent": self.outbox.unsent_count(),
                "depth": stats["depth"], "inflight": stats["inflight"]}

    # --- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        self.http.start()
        if self.commands is not None:
            self.commands.start()
        self.uplink.start()
        try:
            self.emit(Draft(stream="camera.events", type="agent.started",
                            data={"version": __version__, "cameras": [c.id for c in self.cfg.cameras],
                                  "config_version": self.live.state.version if self.live else None,
                                  "outbox_reset": self.outbox.reset_report}))
        except Exception:  # noqa: BLE001 - a full disk must not keep the agent from starting (and saying so)
            log.exception("cannot record agent.started")
        self.supervisor.start(self.cfg.cameras)
        if self.live is not None:
            self.live.start_watching()
        self._notify.notify("READY=1")
        log.info("agent %s started; http on %s:%s", self.cfg.device_id, *self.cfg.http.host_port)

    def run_until_stopped(self) -> None:
        interval = systemd.watchdog_interval_s()
        last_ping = 0.0
        unhealthy_logged: dict[str, Any] = {}
        while not self.stop_requested.wait(TICK_S):
            self.supervisor.check()
            status, health = self.health.healthz()
            if status != 200:
                # No ping: systemd kills and restarts us; a dead part or a hung native call cannot be
                # undone here.
                why = {name: health["parts"][name].get("last_error") for name in health["dead"]}
                if why != unhealthy_logged:
                    log.error("unhealthy: %s; withholding the watchdog ping",
                              "; ".join(f"{name} ({err})" for name, err in why.items()))
                unhealthy_logged = why
                continue
            unhealthy_logged = {}
            now = time.monotonic()
            if now - last_ping >= interval:
                self._notify.notify("WATCHDOG=1")
                last_ping = now

    def shutdown(self, reason: str = "signal") -> None:
        self._notify.notify("STOPPING=1")
        if self.live is not None:
            self.live.stop_watching()
        if self.commands is not None:
            self.commands.stop()
        self.supervisor.stop_all()  # each camera flushes its last interval report first
        try:
            self.emit(Draft(stream="camera.events", type="agent.stopped",
                            data={"reason": reason, "uptime_s": round(time.time() - self.started_at, 1)}))
        except Exception:  # noqa: BLE001 - stopping must go on
            log.exception("cannot record agent.stopped")
        # Give the uplink a moment to hand over what is queued; the outbox keeps the rest.
        deadline = time.monotonic() + 2.0
        while self.uplink.connected and self.outbox.unsent_count() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.uplink.stop()  # publishes the retained offline status
        self.http.stop()
        self.outbox.close()
        log.info("agent %s stopped", self.cfg.device_id)


def run_agent(config_path: Path) -> int:
    try:
        live = LiveConfig(config_path, check_secrets=False)
    except ConfigRejected as e:
        return print_problems(e.problems)
    except OSError as e:
        print(f"(file): cannot read {config_path}: {e.strerror or e}", file=sys.stderr)
        return 2
    cfg = live.config
    # A model or TLS file that is not there would fail the cameras or the uplink over and over:
    # say so once, as check-config does, and let systemd show it.
    if problems := cfg.file_problems():
        return print_problems(problems)
    logs.setup(cfg.log.level, cfg.log.format)
    agent = Agent(cfg, config_path, live)

    def on_stop(signum, frame) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        agent.stop_requested.set()

    def on_hup(signum, frame) -> None:
        live.request_reload()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    agent.start()
    try:
        agent.run_until_stopped()
    finally:
        agent.shutdown()
    return 0
