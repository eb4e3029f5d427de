"""Remote commands over MQTT: verify, dispatch, answer, audit (DESIGN "Commands over MQTT").

The MQTT thread only queues a message; one worker thread runs commands in
arrival order, so a slow snapshot or config write never stalls the uplink. The
agent side is the ``AgentControl`` protocol, which the daemon implements.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import queue
import threading
import time
from collections import OrderedDict
from datetime import datetime
from typing import Any, Callable, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import metrics
from .envelope import Draft, new_trace_id, utc_now_iso
from .liveconfig import ConfigRejected, VersionConflict
from .supervisor import UnknownCamera

log = logging.getLogger(__name__)

AUDIT_STREAM = "audit.logs"
MAX_PAYLOAD_BYTES = 256 * 1024
QUEUE_SIZE = 64
NONCE_CACHE_MAX = 100_000  # ~ a request every 0.6 ms for a 60 s window
_SECRET_WORDS = {"password", "passwd", "secret", "token", "key", "credentials"}


# --- wire models ---------------------------------------------------------------------------

class CommandRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=128)
    args: dict[str, Any] = {}
    ts: str | None = None
    nonce: str | None = Field(None, min_length=8, max_length=128)
    sig: str | None = None


class CommandResult(BaseModel):
    request_id: str | None
    ok: bool
    code: int
    result: dict[str, Any] | None = None
    error: str | None = None


class CameraArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    camera_id: str = Field(min_length=1)


class SetConfigArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    patch: dict[str, Any]
    expected_version: str = Field(min_length=1)


class NoArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- the agent side ------------------------------------------------------------------------

class AgentControl(Protocol):
    def status(self) -> dict[str, Any]: ...

    def config_document(self) -> tuple[str, dict[str, Any]]:
        """(version, the config file as a mapping)."""

    def set_config(self, patch: dict[str, Any], expected_version: str, *,
                   correlation_id: str | None) -> dict[str, Any]:
        """Raises VersionConflict (409) or ConfigRejected (422); returns at least ``version``."""

    def reload_config(self, *, correlation_id: str | None) -> dict[str, Any]: ...

    def restart_camera(self, camera_id: str) -> dict[str, Any]:
        """Raises UnknownCamera (404)."""

    def snapshot(self, camera_id: str) -> bytes | None:
        """The latest frame as JPEG, None when none yet; raises UnknownCamera."""

    def flush_outbox(self) -> dict[str, Any]: ...


class CommandError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


# --- signatures ----------------------------------------------------------------------------

def canonical(request: dict[str, Any]) -> bytes:
    body = {k: v for k, v in request.items() if k != "sig"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def signature(secret: bytes, topic: str, request: dict[str, Any]) -> str:
    return hmac.new(secret, topic.encode("utf-8") + b"\n" + canonical(request), hashlib.sha256).hexdigest()


def sign_request(secret: bytes, topic: str, request: dict[str, Any]) -> dict[str, Any]:
    """The operator side: the request with ``sig`` set (ts and nonce must be in it already)."""
    return {**request, "sig": signature(secret, topic, request)}


def parse_rfc3339(ts: str) -> float:
    moment = datetime.fromisoformat(ts.replace("Z", "+00:00").replace("z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError("ts needs a UTC offset (RFC 3339)")
    return moment.timestamp()


class ReplayCache:
    """Nonces seen in the last ``window_s``; bounded, because memory is finite on a camera host."""

    def __init__(self, window_s: float, max_entries: int = NONCE_CACHE_MAX):
        self._window_s = window_s
        self._max = max_entries
        self._seen: OrderedDict[str, float] = OrderedDict()

    def check_and_add(self, nonce: str, now: float) -> str | None:
        """None when fresh (and now remembered), else why it is refused."""
        # A ts may be up to window_s ahead of our clock, so a nonce stays replayable for 2 windows.
        while self._seen and next(iter(self._seen.values())) < now - 2 * self._window_s:
            self._seen.popitem(last=False)
        if nonce in self._seen:
            return "replayed nonce"
        if len(self._seen) >= self._max:
            # Evicting a live nonce would reopen it for replay; refusing is the safe side.
            return "replay cache full, retry later"
        self._seen[nonce] = now
        return None


# --- redaction -----------------------------------------------------------------------------

def redact(value: Any, key: str = "") -> Any:
    """Copy of a config document with secret-looking values hidden (``*_env`` only names a variable)."""
    words = set(key.lower().replace("-", "_").split("_"))
    if words & _SECRET_WORDS and not key.lower().endswith("_env"):
        return "***"
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    return value


# --- the processor -------------------------------------------------------------------------

def _correlation_text(data: bytes | None) -> str | None:
    if not data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.hex()


class CommandProcessor:
    """Takes raw MQTT messages on ``<prefix>/<device>/cmd/<name>``, answers each one."""

    def __init__(self, control: AgentControl, *, device_id: str, topic_prefix: str,
                 secret: bytes | None, window_s: float,
                 emit: Callable[[Draft], Any],
                 publish: Callable[..., None],
                 clock: Callable[[], float] = time.time):
        self._control = control
        self._base = f"{topic_prefix}/{device_id}/cmd/"
        self._secret = secret
        self._window_s = window_s
        self._emit = emit
        self._publish = publish  # (topic, payload, *, qos, correlation_data)
        self._clock = clock
        self._replay = ReplayCache(window_s)
        self._queue: queue.Queue[tuple[str, bytes, Any] | None] = queue.Queue(QUEUE_SIZE)
        self._refusers = threading.BoundedSemaphore(4)
        self._worker: threading.Thread | None = None
        self._handlers: dict[str, Callable[[dict[str, Any], str | None], dict[str, Any]]] = {
            "ping": self._ping,
            "get_status": self._get_status,
            "get_config": self._get_config,
            "set_config": self._set_config,
            "reload_config": self._reload_config,
            "restart_camera": self._restart_camera,
            "snapshot": self._snapshot,
            "flush_outbox": self._flush_outbox,
        }
        if secret is None:
            log.warning("commands: no HMAC secret configured; the broker ACL is the only guard "
                        "against forged commands on %s#", self._base)

    @property
    def subscription(self) -> str:
        return self._base + "#"

    # --- threads ---

    def start(self) -> None:
        self._worker = threading.Thread(target=self._work, name="commands", daemon=True)
        self._worker.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._worker is None:
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._worker.join(timeout)
        self._worker = None

    def on_message(self, topic: str, payload: bytes, properties: Any = None) -> None:
        """Called on the MQTT thread: queue only, never block it."""
        if not self._is_request_topic(topic):
            return
        try:
            self._queue.put_nowait((topic, payload, properties))
        except queue.Full:
            # Answer 503 off the MQTT thread, with a few threads at most: a flood must not
            # turn into a thread per message. Beyond that the request is only logged.
            if self._refusers.acquire(blocking=False):
                threading.Thread(target=self._refuse_busy, args=(topic, payload, properties), daemon=True).start()
            else:
                log.error("commands: queue full, dropping a request on %s unanswered", topic)

    def _refuse_busy(self, topic: str, payload: bytes, properties: Any) -> None:
        try:
            name = topic[len(self._base):]
            request_id = _peek_request_id(payload)
            self._finish(name, topic, properties, request_id, CommandResult(
                request_id=request_id, ok=False, code=503, error="agent busy: too many queued commands"),
                new_trace_id())
        finally:
            self._refusers.release()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self.process(*item)
            except Exception:  # belt and braces: one bad request never stops the worker
                log.exception("commands: unexpected failure")

    def _is_request_topic(self, topic: str) -> bool:
        # Our own results come back on cmd/<name>/result: answering them would loop.
        return topic.startswith(self._base) and "/" not in topic[len(self._base):] \
            and bool(topic[len(self._base):])

    # --- one request ---

    def process(self, topic: str, payload: bytes, properties: Any = None) -> CommandResult:
        name = topic[len(self._base):]
        request_id: str | None = None
        trace_id = new_trace_id()  # ties the log lines and the audit record of this request together
        try:
            raw = self._decode(payload)
            request_id = raw.get("request_id") if isinstance(raw.get("request_id"), str) else None
            request = self._validate(raw)
            self._authenticate(topic, raw, request)
            handler = self._handlers.get(name)
            if handler is None:
                raise CommandError(404, f"unknown command {name!r}")
            correlation_id = _correlation_text(getattr(properties, "CorrelationData", None)) or request.request_id
            result = CommandResult(request_id=request_id, ok=True, code=200,
                                   result=handler(request.args, correlation_id))
        except CommandError as e:
            result = CommandResult(request_id=request_id, ok=False, code=e.code, error=str(e))
        except Exception as e:
            log.exception("commands: %s failed", name, extra={"trace_id": trace_id, "command": name})
            result = CommandResult(request_id=request_id, ok=False, code=500,
                                   error=f"internal error: {type(e).__name__}")
        self._finish(name, topic, properties, request_id, result, trace_id)
        return result

    def _decode(self, payload: bytes) -> dict[str, Any]:
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise CommandError(400, f"request larger than {MAX_PAYLOAD_BYTES} bytes")
        try:
            raw = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CommandError(400, f"request is not JSON: {e}") from e
        if not isinstance(raw, dict):
            raise CommandError(400, "request must be a JSON object")
        return raw

    def _validate(self, raw: dict[str, Any]) -> CommandRequest:
        try:
            return CommandRequest.model_validate(raw)
        except ValidationError as e:
            raise CommandError(400, "malformed request: " + _first_problems(e)) from e

    def _authenticate(self, topic: str, raw: dict[str, Any], request: CommandRequest) -> None:
        if self._secret is None:
            return
        if not request.sig:
            raise CommandError(401, "missing signature")
        # Signature first: unsigned junk must not fill the nonce cache.
        if not hmac.compare_digest(request.sig.lower(), signature(self._secret, topic, raw)):
            raise CommandError(401, "bad signature")
        if not request.ts:
            raise CommandError(401, "missing ts")
        try:
            sent = parse_rfc3339(request.ts)
        except ValueError as e:
            raise CommandError(401, f"ts is not RFC 3339: {e}") from e
        now = self._clock()
        if abs(now - sent) > self._window_s:
            raise CommandError(401, f"stale request: ts is {now - sent:+.0f} s from the agent's clock")
        if not request.nonce:
            raise CommandError(401, "missing nonce")
        refused = self._replay.check_and_add(request.nonce, now)
        if refused:
            raise CommandError(401, refused)

    def _finish(self, name: str, topic: str, properties: Any, request_id: str | None,
                result: CommandResult, trace_id: str) -> None:
        known = name in self._handlers
        metrics.COMMANDS.labels(command=name if known else "unknown", result=str(result.code)).inc()
        correlation_id = _correlation_text(getattr(properties, "CorrelationData", None)) or request_id
        kind = "command.rejected" if 400 <= result.code < 500 or result.code == 503 else "command.executed"
        log.log(logging.INFO if result.ok else logging.WARNING, "command %s %s: %s %s", name, request_id,
                result.code, result.error or "ok",
                extra={"command": name, "correlation_id": correlation_id, "trace_id": trace_id})
        self._audit(kind, {"request_id": request_id, "command": name[:128], "code": result.code,
                           "ok": result.ok, "error": result.error, "topic": topic[:256]}, correlation_id, trace_id)
        self._answer(name, properties, result)

    def _audit(self, type_: str, data: dict[str, Any], correlation_id: str | None, trace_id: str) -> None:
        try:
            self._emit(Draft(stream=AUDIT_STREAM, type=type_, data=data, correlation_id=correlation_id,
                             trace_id=trace_id))
        except Exception:
            log.exception("commands: could not record %s", type_)

    def _answer(self, name: str, properties: Any, result: CommandResult) -> None:
        response_topic = getattr(properties, "ResponseTopic", None)
        topic = response_topic or f"{self._base}{name}/result"
        try:
            self._publish(topic, result.model_dump_json().encode(), qos=1,
                          correlation_data=getattr(properties, "CorrelationData", None))
        except Exception:
            log.exception("commands: could not publish the result to %s", topic)

    # --- the commands ---

    def _ping(self, args: dict[str, Any], _corr: str | None) -> dict[str, Any]:
        _args(NoArgs, args)
        return {"pong": True, "ts": utc_now_iso()}

    def _get_status(self, args: dict[str, Any], _corr: str | None) -> dict[str, Any]:
        _args(NoArgs, args)
        return self._control.status()

    def _get_config(self, args: dict[str, Any], _corr: str | None) -> dict[str, Any]:
        _args(NoArgs, args)
        version, document = self._control.config_document()
        return {"version": version, "config": redact(document)}

    def _set_config(self, args: dict[str, Any], corr: str | None) -> dict[str, Any]:
        a = _args(SetConfigArgs, args)
        try:
            return self._control.set_config(a.patch, a.expected_version, correlation_id=corr)
        except VersionConflict as e:
            raise CommandError(409, str(e)) from e
        except ConfigRejected as e:
            raise CommandError(422, "invalid config: " + "; ".join(e.problems)) from e

    def _reload_config(self, args: dict[str, Any], corr: str | None) -> dict[str, Any]:
        _args(NoArgs, args)
        try:
            return self._control.reload_config(correlation_id=corr)
        except ConfigRejected as e:
            raise CommandError(422, "config file refused, running config kept: " + "; ".join(e.problems)) from e

    def _restart_camera(self, args: dict[str, Any], _corr: str | None) -> dict[str, Any]:
        a = _args(CameraArgs, args)
        try:
            return self._control.restart_camera(a.camera_id)
        except UnknownCamera as e:
            raise CommandError(404, f"unknown camera {a.camera_id!r}") from e

    def _snapshot(self, args: dict[str, Any], _corr: str | None) -> dict[str, Any]:
        a = _args(CameraArgs, args)
        try:
            jpeg = self._control.snapshot(a.camera_id)
        except UnknownCamera as e:
            raise CommandError(404, f"unknown camera {a.camera_id!r}") from e
        if jpeg is None:
            raise CommandError(404, f"camera {a.camera_id!r} has no frame yet")
        return {"camera_id": a.camera_id, "content_type": "image/jpeg", "bytes": len(jpeg),
                "jpeg_base64": base64.b64encode(jpeg).decode("ascii")}

    def _flush_outbox(self, args: dict[str, Any], _corr: str | None) -> dict[str, Any]:
        _args(NoArgs, args)
        return self._control.flush_outbox()


def _args(model: type[BaseModel], args: dict[str, Any]) -> Any:
    try:
        return model.model_validate(args)
    except ValidationError as e:
        raise CommandError(400, "bad args: " + _first_problems(e)) from e


def _first_problems(err: ValidationError, limit: int = 3) -> str:
    parts = []
    for e in err.errors()[:limit]:
        where = ".".join(str(p) for p in e["loc"]) or "(request)"
        parts.append(f"{where}: {'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}")
    return "; ".join(parts)


def _peek_request_id(payload: bytes) -> str | None:
    try:
        raw = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    rid = raw.get("request_id") if isinstance(raw, dict) else None
    return rid if isinstance(rid, str) else None
