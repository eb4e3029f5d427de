"""The agent's config file as a live, versioned document.

The version is a short sha256 of the file's bytes, so the operator's
``expected_version`` and a hand edit are judged by the same yardstick: whatever
is on disk. Remote patches (RFC 7396 JSON merge patch) and hand edits go
through one gate: parse, validate with ``config.parse_agent``, check secrets,
and only then replace the running config. A broken edit never replaces it.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import json_merge_patch
import yaml
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from .config import AgentConfig, ConfigError, missing_secrets, parse_agent, parse_yaml_mapping
from .envelope import Draft
from .files import atomic_write

log = logging.getLogger(__name__)

Source = Literal["remote", "file"]
AUDIT_STREAM = "audit.logs"
# Editors save in several steps (truncate, write, rename); wait for the burst to end.
DEBOUNCE_S = 0.3


class VersionConflict(Exception):
    """The caller's expected_version is not the file's version (HTTP-like 409)."""

    def __init__(self, expected: str | None, current: str):
        super().__init__(f"stale expected_version {expected!r}: the config is at {current!r}")
        self.expected = expected
        self.current = current


class ConfigRejected(Exception):
    """A patch or an edit that does not give a valid config (HTTP-like 422)."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def version_of(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class ConfigState:
    version: str
    document: dict[str, Any]  # the file as written, for get_config and patching
    config: AgentConfig


@dataclass(frozen=True)
class ConfigChange:
    source: Source
    old: AgentConfig
    new: AgentConfig
    version: str
    previous_version: str
    changed: list[str] = field(default_factory=list)  # dotted paths


def changed_paths(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON-like values differ; lists of objects with ``id`` are keyed by it."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            here = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                out.append(here)
            else:
                out.extend(changed_paths(old[key], new[key], here))
        return out
    if _id_keyed(old) and _id_keyed(new):
        return changed_paths({x["id"]: x for x in old}, {x["id"]: x for x in new}, prefix)
    return [] if old == new else [prefix or "(root)"]


def _id_keyed(value: Any) -> bool:
    if not isinstance(value, list) or not all(isinstance(x, dict) and "id" in x for x in value):
        return False
    return len({x["id"] for x in value}) == len(value)


def parse_document(raw: bytes, *, check_secrets: bool = True) -> tuple[dict[str, Any], AgentConfig]:
    """File bytes -> (document, validated config); ConfigRejected names every problem."""
    try:
        data = parse_yaml_mapping(raw)  # the same reading as check-config's
    except ConfigError as e:
        raise ConfigRejected(e.problems) from e
    return data, validate(data, check_secrets=check_secrets)


def validate(data: dict[str, Any], *, check_secrets: bool = True) -> AgentConfig:
    try:
        cfg = parse_agent(data)
    except ConfigError as e:
        raise ConfigRejected(e.problems) from e
    # A secret variable the running process does not have would break the next reconnect.
    problems = missing_secrets(cfg) if check_secrets else []
    if problems:
        raise ConfigRejected(problems)
    return cfg




def dump_document(data: dict[str, Any]) -> bytes:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=None).encode("utf-8")


class LiveConfig:
    """The running config, its file, and the ways it changes (remote patch, file watch, SIGHUP).

    ``on_change`` is called (under this object's lock, so changes apply one at a time
    and in order) with every accepted change; ``emit`` receives the audit drafts.
    """

    def __init__(self, path: Path, *, emit: Callable[[Draft], Any] | None = None,
                 on_change: Callable[[ConfigChange], None] | None = None,
                 check_secrets: bool = True):
        self.path = Path(path).absolute()
        self.backup_path = self.path.with_name(self.path.name + ".bak")
        self._emit = emit
        self._on_change = on_change
        self._lock = threading.RLock()
        raw = self.path.read_bytes()
        # check_secrets=False at start keeps `run` as lenient as before (the uplink reports auth
        # failures); later changes must not introduce a variable this process does not have.
        document, cfg = parse_document(raw, check_secrets=check_secrets)
        self._state = ConfigState(version_of(raw), document, cfg)
        self._last_rejected: str | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._observer: Any = None
        self._thread: threading.Thread | None = None

    # --- reading ------------------------------------------------------------------------

    @property
    def state(self) -> ConfigState:
        return self._state

    @property
    def config(self) -> AgentConfig:
        return self._state.config

    def set_callbacks(self, *, emit: Callable[[Draft], Any] | None = None,
                      on_change: Callable[[ConfigChange], None] | None = None) -> None:
        """The daemon builds its outbox from the first config, so it hooks in after loading."""
        if emit is not None:
            self._emit = emit
        if on_change is not None:
            self._on_change = on_change

    # --- changing -----------------------------------------------------------------------

    def apply_patch(self, patch: Any, expected_version: str | None, *,
                    correlation_id: str | None = None) -> ConfigChange:
        """Merge ``patch`` into the file on disk, validate, write atomically, apply."""
        if not isinstance(patch, dict):
            raise ConfigRejected(["patch: must be a JSON object (RFC 7396 merge patch)"])
        with self._lock:
            try:
                raw = self.path.read_bytes()
            except OSError as e:
                raise ConfigRejected([f"(file): cannot read {self.path}: {e.strerror or e}"]) from e
            on_disk = version_of(raw)
            if expected_version != on_disk:
                raise VersionConflict(expected_version, on_disk)
            document, _ = parse_document(raw)
            merged = json_merge_patch.merge(copy.deepcopy(document), copy.deepcopy(patch))
            if not isinstance(merged, dict):
                raise ConfigRejected(["(file): the top level must be a mapping"])
            new_cfg = validate(merged)
            new_raw = dump_document(merged)
            atomic_write(self.backup_path, raw)
            atomic_write(self.path, new_raw)
            return self._accept(ConfigState(version_of(new_raw), merged, new_cfg), "remote", correlation_id)

    def reload(self, *, source: Source = "file", correlation_id: str | None = None) -> ConfigChange | None:
        """Pick up the file as it is now; None when it did not change. Broken: ConfigRejected."""
        with self._lock:
            try:
                raw = self.path.read_bytes()
            except OSError as e:  # deleted or unreadable: the running config stays
                problems = [f"(file): cannot read {self.path}: {e.strerror or e}"]
                self._reject(f"unreadable:{e.errno}", problems, correlation_id)
                raise ConfigRejected(problems) from e
            version = version_of(raw)
            if version == self._state.version:
                return None
            try:
                document, cfg = parse_document(raw)
            except ConfigRejected as e:
                self._reject(version, e.problems, correlation_id)
                raise
            return self._accept(ConfigState(version, document, cfg), source, correlation_id)

    def _accept(self, new: ConfigState, source: Source, correlation_id: str | None) -> ConfigChange:
        old = self._state
        change = ConfigChange(source=source, old=old.config, new=new.config, version=new.version,
                              previous_version=old.version,
                              changed=changed_paths(old.config.model_dump(mode="json"),
                                                    new.config.model_dump(mode="json")))
        self._state = new
        self._last_rejected = None
        log.info("config %s -> %s from %s: %s", old.version, new.version, source,
                 ", ".join(change.changed) or "no effective change", extra={"correlation_id": correlation_id})
        self._audit("config.changed", {"source": source, "version": new.version,
                                       "previous_version": old.version, "changed": change.changed},
                    correlation_id)
        if self._on_change is not None:
            try:
                self._on_change(change)
            except Exception:  # the file is valid and written; a failed apply must not kill the watcher
                log.exception("applying config %s failed", new.version)
        return change

    def _reject(self, version: str, problems: list[str], correlation_id: str | None) -> None:
        if version == self._last_rejected:  # one audit record per broken file, not per save event
            return
        self._last_rejected = version
        log.error("config file %s refused, keeping %s: %s", self.path, self._state.version, "; ".join(problems))
        self._audit("config.rejected", {"source": "file", "version": version,
                                        "running_version": self._state.version, "problems": problems},
                    correlation_id)

    def _audit(self, type_: str, data: dict[str, Any], correlation_id: str | None) -> None:
        if self._emit is None:
            return
        try:
            self._emit(Draft(stream=AUDIT_STREAM, type=type_, data=data, correlation_id=correlation_id))
        except Exception:  # an outbox that refuses must not turn a config change into a crash
            log.exception("could not record %s", type_)

    # --- watching -----------------------------------------------------------------------

    def request_reload(self) -> None:
        """Safe from a signal handler: the watcher thread does the work."""
        self._wake.set()

    def start_watching(self, *, file_watch: bool = True) -> None:
        """Reload after hand edits: inotify via watchdog (no polling delay, no busy loop).

        The reload thread also serves ``request_reload`` (SIGHUP), so that still works when
        the file watch cannot start (e.g. the host ran out of inotify instances).
        """
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._reload_loop, name="config-watch", daemon=True)
        self._thread.start()
        if not file_watch:
            return
        handler = _FileEvents(self.path, self._wake.set)
        observer = Observer()
        # Watch the directory: editors and our own writer replace the file by rename.
        try:
            observer.schedule(handler, str(self.path.parent), recursive=False)
            observer.daemon = True
            observer.start()
        except OSError as e:
            log.warning("cannot watch %s (%s): hand edits apply on SIGHUP or reload_config only", self.path, e)
            return
        self._observer = observer

    def stop_watching(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _reload_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait()
            if self._stopping.is_set():
                return
            # Debounce: keep waiting while events keep coming.
            self._wake.clear()
            while self._wake.wait(DEBOUNCE_S):
                self._wake.clear()
                if self._stopping.is_set():
                    return
            try:
                self.reload(source="file")
            except ConfigRejected:
                pass  # audited in reload; the next event or SIGHUP tries again
            except Exception:
                log.exception("config reload failed")


class _FileEvents(FileSystemEventHandler):
    def __init__(self, path: Path, wake: Callable[[], None]):
        self._path = os.fsdecode(path)
        self._wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        paths = {os.fsdecode(event.src_path), os.fsdecode(getattr(event, "dest_path", "") or "")}
        if self._path in paths:
            self._wake()
