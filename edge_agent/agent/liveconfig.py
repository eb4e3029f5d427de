"""The agent's config file as a live, versioned document.

The version is a short sha256 of the file's bytes, so the operator's
``expected_version`` and a hand edit are judged by the same yardstick: whatever
is on disk. Remote patches (RFC 7396 JSON merge patch) and hand edits go
through one gate: parse, validate with ``config.parse_agent``, check secrets,
and only then replace the running config. A broken edit never replaces it.
A remote patch may change only ``REMOTE_CHANGEABLE``; the rest takes a hand edit.
What get_config shows hides secrets (``redact``), and a document sent back keeps
them (``keep_hidden_values``): both directions of that rule live here.
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

from edge_agent.agent.config import AgentConfig, parse_agent
from edge_agent.common.config import ConfigError, missing_secrets, parse_yaml_mapping
from edge_agent.common.envelope import Draft
from edge_agent.common.files import atomic_write, remove_stale_temps
from edge_agent.common.logs import mask_userinfo
from edge_agent.common.wire import AUDIT_STREAM

log = logging.getLogger(__name__)

Source = Literal["remote", "file"]
# Editors save in several steps (truncate, write, rename); wait for the burst to end.
DEBOUNCE_S = 0.3
REDACTED = "***"  # what get_config shows instead of a secret
_SECRET_WORDS = {"password", "passwd", "secret", "token", "key", "credentials"}

Key = tuple[str, ...]  # a place in a config document: ("cameras", "cam-1", "fps")

# What a remote set_config may change: the run-time knobs an operator needs from afar. The rest
# (identity, the MQTT endpoint, credentials and TLS, commands, HTTP, file paths) and any ``*_env``
# name takes a local edit: a signed command must not be able to send the host's secrets
# elsewhere or loosen the guard on commands.
REMOTE_CHANGEABLE: tuple[Key, ...] = (("cameras",), ("report",), ("log",), ("model", "confidence"),
                                      ("model", "nms_iou"), ("model", "classes"), ("model", "threads"))
# A camera whose password comes from the environment keeps its URL and user: re-pointing
# them would send that password to another host.
_CREDENTIAL_BOUND = ("source", "username")
_ABSENT = object()


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


class ChangeForbidden(ConfigRejected):
    """A remote patch that changes what only a local edit of the file may change (HTTP-like 403)."""

    def __init__(self, paths: list[str]):
        super().__init__([f"{p}: only a local edit of the config file may change this" for p in paths])
        self.paths = paths


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


def changed_paths(old: Any, new: Any) -> list[str]:
    """Dotted paths where two JSON-like values differ; lists of objects with ``id`` are keyed by it."""
    return [".".join(key) or "(root)" for key in changed_keys(old, new)]


def changed_keys(old: Any, new: Any, *, leaves: bool = False, here: Key = ()) -> list[Key]:
    """Where two JSON-like values differ. A key on one side only is one change; with ``leaves``
    it is followed down to every value under it (a new camera: each of its settings)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[Key] = []
        for key in sorted(set(old) | set(new), key=str):
            at = here + (str(key),)
            if key in old and key in new:
                out.extend(changed_keys(old[key], new[key], leaves=leaves, here=at))
            elif leaves:
                out.extend(changed_keys(old.get(key, _ABSENT), new.get(key, _ABSENT), leaves=True, here=at))
            else:
                out.append(at)
        return out
    if _id_keyed(old) and _id_keyed(new):
        return changed_keys(_by_id(old), _by_id(new), leaves=leaves, here=here)
    if old is _ABSENT or new is _ABSENT:
        present = new if old is _ABSENT else old
        if isinstance(present, dict) or _id_keyed(present):
            empty: Any = {} if isinstance(present, dict) else []
            return changed_keys(empty if old is _ABSENT else old, empty if new is _ABSENT else new,
                                leaves=True, here=here)
    return [] if old == new else [here]


def _id_keyed(value: Any) -> bool:
    if not isinstance(value, list) or not all(isinstance(x, dict) and "id" in x for x in value):
        return False
    try:
        return len({x["id"] for x in value}) == len(value)
    except TypeError:  # an unhashable id (a list in a remote patch) keys nothing
        return False


def _by_id(items: list[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    return {x["id"]: x for x in items}


# --- what a remote patch may change ---------------------------------------------------------

def forbidden_remote_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted paths where a remote patch turning document ``old`` into ``new`` changes what it may not."""
    bound = _cameras_with_env_password(old) | _cameras_with_env_password(new)
    return [".".join(key) for key in changed_keys(old, new, leaves=True) if not _remote_may_change(key, bound)]


def _remote_may_change(key: Key, env_password_cameras: set[str]) -> bool:
    if key and key[0] not in AgentConfig.model_fields:
        return True  # not a setting: validation refuses it as an unknown key (422)
    if any(name.endswith("_env") for name in _setting_names(key)):
        return False
    if key[:1] == ("cameras",) and len(key) >= 3 and key[1] in env_password_cameras \
            and key[2] in _CREDENTIAL_BOUND:
        return False
    return any(key[:len(allowed)] == allowed for allowed in REMOTE_CHANGEABLE)


def _setting_names(key: Key) -> Key:
    """The key without the camera, line and zone ids (an id may end in ``_env``, a setting name does)."""
    if key[:1] != ("cameras",):
        return key
    names = key[:1] + key[2:3]
    return names + key[4:] if key[2:3] in (("lines",), ("zones",)) else names + key[3:]


def _cameras_with_env_password(document: dict[str, Any]) -> set[str]:
    cameras = document.get("cameras")
    if not isinstance(cameras, list):
        return set()
    return {str(c["id"]) for c in cameras if isinstance(c, dict) and "id" in c and c.get("password_env")}


def redact(value: Any, key: str = "") -> Any:
    """Copy of a config document with secret-looking values hidden (``*_env`` only names a
    variable) and credentials in URLs masked."""
    words = set(key.lower().replace("-", "_").split("_"))
    if words & _SECRET_WORDS and not key.lower().endswith("_env"):
        return REDACTED
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    return masked(value)


def masked(value: Any) -> Any:
    """Copy of a JSON-like value with the credentials of every URL in its strings masked."""
    if isinstance(value, str):
        return mask_userinfo(value)
    if isinstance(value, dict):
        return {k: masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v) for v in value]
    return value


def keep_hidden_values(old: Any, new: Any) -> Any:
    """``new`` with every string that is ``old``'s as get_config shows it (URL credentials masked,
    secrets redacted) put back to ``old``'s: a config fetched, edited and sent back keeps them."""
    if isinstance(old, str) and isinstance(new, str):
        return old if new != old and new in (mask_userinfo(old), REDACTED) else new
    if isinstance(old, dict) and isinstance(new, dict):
        return {k: keep_hidden_values(old[k], v) if k in old else v for k, v in new.items()}
    if _id_keyed(old) and _id_keyed(new):
        before = _by_id(old)
        return [keep_hidden_values(before[x["id"]], x) if x["id"] in before else x for x in new]
    return new


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
        for written in (self.path, self.backup_path):  # what a write cut short by a crash left
            remove_stale_temps(written)
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
        """Merge ``patch`` into the file on disk, check it changes only ``REMOTE_CHANGEABLE``
        (else ChangeForbidden), validate, write atomically (the backup with the file's mode), apply."""
        if not isinstance(patch, dict):
            raise ConfigRejected(["patch: must be a JSON object (RFC 7396 merge patch)"])
        with self._lock:
            try:
                raw = self.path.read_bytes()
                mode = self.path.stat().st_mode & 0o7777
            except OSError as e:
                raise ConfigRejected([f"(file): cannot read {self.path}: {e.strerror or e}"]) from e
            on_disk = version_of(raw)
            if expected_version != on_disk:
                raise VersionConflict(expected_version, on_disk)
            document, _ = parse_document(raw)
            merged = json_merge_patch.merge(copy.deepcopy(document), copy.deepcopy(patch))
            if not isinstance(merged, dict):
                raise ConfigRejected(["(file): the top level must be a mapping"])
            merged = keep_hidden_values(document, merged)
            forbidden = forbidden_remote_changes(document, merged)
            if forbidden:
                raise ChangeForbidden(forbidden)
            new_cfg = validate(merged)
            new_raw = dump_document(merged)
            atomic_write(self.backup_path, raw, mode=mode)
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
