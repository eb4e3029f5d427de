"""Remote commands over MQTT: verify, dispatch, answer, audit (DESIGN "Commands over MQTT").

The MQTT thread only queues a message; one worker thread runs commands in
arrival order, so a slow snapshot or config write never stalls the uplink. The
agent side is the ``AgentControl`` protocol, which the daemon implements.

Every request gets an answer and an audit record, whatever its bytes and MQTT
properties: an answer goes only under the device's own topics, carries bounded
correlation data, never shows a URL's credentials, and fits the broker's maximum
packet size (413 otherwise; a snapshot is downscaled until it fits). Who may send
commands is ``command_auth``'s business.
"""

from __future__ import annotations

import base64
import json
import logging
import queue
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edge_agent.agent.command_auth import RequestVerifier, Unauthorized, parse_rfc3339
from edge_agent.agent.liveconfig import (
    ChangeForbidden,
    ConfigRejected,
    VersionConflict,
    masked,
    redact,
)
from edge_agent.agent.supervisor import UnknownCamera
from edge_agent.agent.uplink import MQTT_MAX_PACKET_SIZE
from edge_agent.common import metrics
from edge_agent.common.config import problem_lines
from edge_agent.common.envelope import Draft, new_trace_id, utc_now_iso
from edge_agent.common.logs import clip, mask_userinfo
from edge_agent.common.supervised import SupervisedThread
from edge_agent.common.wire import AUDIT_STREAM, command_base, device_topic

log = logging.getLogger(__name__)

MAX_PAYLOAD_BYTES = 256 * 1024
QUEUE_SIZE = 64
MAX_CORRELATION_BYTES = 256  # longer correlation data is refused, never echoed or audited
MAX_LISTED_PATHS = 50  # refused config paths named in an answer or audit record
MAX_ERROR_CHARS = 2000  # an error text (e.g. every problem of a big patch) in an answer or audit record
# Under the device's topics, what an answer must not land on: requests (it would be taken for
# one), the uplink (the bridge would dead-letter it), the acks and the retained status.
_RESERVED_REPLY = re.compile(r"cmd/[^/]+|up(/.*)?|ack|status", re.DOTALL)


# --- wire models ---------------------------------------------------------------------------

class CommandRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=128)
    args: dict[str, Any] = {}
    ts: str | None = None
    nonce: str | None = Field(None, min_length=8, max_length=128)
    sig: str | None = None

    @field_validator("ts")
    @classmethod
    def _rfc3339(cls, ts: str | None) -> str | None:
        if ts is not None:
            parse_rfc3339(ts)
        return ts


class CommandResult(BaseModel):
    request_id: str | None
    ok: bool
    code: int
    result: dict[str, Any] | None = None
    error: str | None = None


class CameraArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    camera_id: str = Field(min_length=1)


class SnapshotArgs(CameraArgs):
    raw: bool = False  # the plain frame instead of the annotated one


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

    def snapshot(self, camera_id: str, *, raw: bool = False) -> bytes | None:
        """The latest frame as JPEG (annotated unless ``raw``), None when none yet; raises UnknownCamera."""

    def flush_outbox(self) -> dict[str, Any]: ...


class CommandError(Exception):
    def __init__(self, code: int, message: str, *, audit: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.audit = audit or {}  # extra fields for the audit record


@dataclass(frozen=True)
class Reply:
    """Where one request's answer goes."""

    topic: str
    correlation_data: bytes | None


@dataclass(frozen=True)
class Context:
    """What a command may need besides its args."""

    request_id: str | None
    correlation_id: str | None
    payload_budget: int  # bytes the answer's JSON may take and still fit the broker's packet limit


# --- the MQTT packet an answer takes -----------------------------------------------------

def _varint_size(n: int) -> int:
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


def publish_packet_size(topic: str, payload_bytes: int, correlation_data: bytes | None) -> int:
    """Bytes of an MQTT v5 QoS 1 PUBLISH, the measure of the broker's Maximum Packet Size."""
    props = 0 if correlation_data is None else 1 + 2 + len(correlation_data)
    remaining = 2 + len(topic.encode("utf-8")) + 2 + _varint_size(props) + props + payload_bytes
    return 1 + _varint_size(remaining) + remaining


# --- the processor -------------------------------------------------------------------------

def _correlation_text(data: bytes | None) -> str | None:
    if not data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.hex()


def _correlation_data(properties: Any) -> bytes | None:
    data = getattr(properties, "CorrelationData", None)
    return bytes(data) if isinstance(data, (bytes, bytearray)) else None


class CommandProcessor:
    """Takes raw MQTT messages on ``<prefix>/<device>/cmd/<name>``, answers each one."""

    def __init__(self, control: AgentControl, *, device_id: str, topic_prefix: str,
                 secret: bytes | None, window_s: float,
                 emit: Callable[[Draft], Any],
                 publish: Callable[..., None],
                 max_packet_size: Callable[[], int] = lambda: MQTT_MAX_PACKET_SIZE,
                 clock: Callable[[], float] = time.time):
        self._control = control
        self._space = device_topic(topic_prefix, device_id) + "/"  # answers go nowhere else
        self._base = command_base(topic_prefix, device_id)
        self._verifier = RequestVerifier(secret, window_s, clock) if secret is not None else None
        self._emit = emit
        self._publish = publish  # (topic, payload, *, qos, correlation_data)
        self._max_packet_size = max_packet_size  # the broker's CONNACK Maximum Packet Size
        self._queue: queue.Queue[tuple[str, bytes, Any] | None] = queue.Queue(QUEUE_SIZE)
        self._refusers = threading.BoundedSemaphore(4)
        # Supervised: a crash outside one request's guard restarts the worker, health shows it.
        self.thread = SupervisedThread("commands", self._work)
        self._handlers: dict[str, Callable[[dict[str, Any], Context], dict[str, Any]]] = {
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
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if not self.thread.is_alive():
            return
        self.thread.stop_restarting()
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self.thread.join(timeout)

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
                log.error("commands: queue full, dropping a request on %s unanswered", clip(topic))

    def _refuse_busy(self, topic: str, payload: bytes, properties: Any) -> None:
        try:
            name = topic[len(self._base):]
            request_id = _peek_request_id(payload)
            self._finish(name, topic, self._reply_for(name, properties), request_id, CommandResult(
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
        trace_id = new_trace_id()  # ties the log lines and the audit record of this request together
        reply = self._reply_for(name, properties)
        request_id: str | None = None
        audit: dict[str, Any] = {}
        try:
            raw = self._decode(payload)
            request_id = _request_id_of(raw)
            _check_correlation_data(properties)
            request = self._validate(raw)
            self._authenticate(topic, raw, request)
            handler = self._handlers.get(name)
            if handler is None:
                raise CommandError(404, f"unknown command {clip(name, 64)!r}")
            ctx = Context(request_id=request_id,
                          correlation_id=_correlation_text(reply.correlation_data) or request.request_id,
                          payload_budget=self._payload_budget(reply))
            result = CommandResult(request_id=request_id, ok=True, code=200,
                                   result=masked(handler(request.args, ctx)))
        except CommandError as e:
            result = CommandResult(request_id=request_id, ok=False, code=e.code, error=str(e))
            audit = e.audit
        except RecursionError:  # json, pydantic or the merge patch on a hostile nesting depth
            result = CommandResult(request_id=request_id, ok=False, code=400, error="request nested too deeply")
        except Exception as e:
            log.exception("commands: %s failed", clip(name), extra={"trace_id": trace_id, "command": name})
            result = CommandResult(request_id=request_id, ok=False, code=500,
                                   error=f"internal error: {type(e).__name__}")
        return self._finish(name, topic, reply, request_id, result, trace_id, audit)

    def _decode(self, payload: bytes) -> dict[str, Any]:
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise CommandError(400, f"request larger than {MAX_PAYLOAD_BYTES} bytes")
        try:
            raw = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CommandError(400, f"request is not JSON: {e}") from e
        except RecursionError as e:
            raise CommandError(400, "request is not JSON: nested too deeply") from e
        if not isinstance(raw, dict):
            raise CommandError(400, "request must be a JSON object")
        return raw

    def _validate(self, raw: dict[str, Any]) -> CommandRequest:
        try:
            return CommandRequest.model_validate(raw)
        except ValidationError as e:
            raise CommandError(400, "malformed request: " + _first_problems(e)) from e

    def _authenticate(self, topic: str, raw: dict[str, Any], request: CommandRequest) -> None:
        if self._verifier is None:  # no secret configured: the broker ACL is the only guard
            return
        try:
            self._verifier.verify(topic, raw, sig=request.sig, ts=request.ts, nonce=request.nonce)
        except Unauthorized as e:
            raise CommandError(401, str(e)) from e

    # --- the answer ---

    def _reply_for(self, name: str, properties: Any) -> Reply:
        """The request's response topic when it lies in the device's own topics, else cmd/<name>/result;
        its correlation data only when bounded (a longer one is refused, not echoed)."""
        default = f"{self._base}{name}/result"
        wanted = getattr(properties, "ResponseTopic", None)
        topic = default
        if isinstance(wanted, str) and wanted:
            if self._may_answer_on(wanted):
                topic = wanted
            else:
                log.warning("commands: response topic %s is not under %s: answering on %s", clip(wanted),
                            self._space, clip(default), extra={"command": name})
        data = _correlation_data(properties)
        return Reply(topic, data if data is not None and len(data) <= MAX_CORRELATION_BYTES else None)

    def _may_answer_on(self, topic: str) -> bool:
        rest = topic[len(self._space):]
        return topic.startswith(self._space) and bool(rest) and not any(c in topic for c in "+#\0") \
            and not _RESERVED_REPLY.fullmatch(rest)

    def _packet_limit(self) -> int:
        try:
            return int(self._max_packet_size())
        except Exception:  # an uplink that cannot say: the protocol's limit, the broker still guards
            log.exception("commands: cannot read the broker's maximum packet size")
            return MQTT_MAX_PACKET_SIZE

    def _payload_budget(self, reply: Reply) -> int:
        return self._packet_limit() - publish_packet_size(reply.topic, 0, reply.correlation_data)

    def _fitted(self, result: CommandResult, reply: Reply) -> tuple[CommandResult, bytes]:
        """The result and its bytes; a result the broker would refuse becomes a 413 that fits."""
        payload = result.model_dump_json().encode()
        budget = self._payload_budget(reply)
        if len(payload) <= budget:
            return result, payload
        too_big = CommandResult(request_id=result.request_id, ok=False, code=413,
                                error=f"result of {len(payload)} bytes does not fit the broker's maximum "
                                      f"packet size of {self._packet_limit()} bytes")
        return too_big, too_big.model_dump_json().encode()

    def _finish(self, name: str, topic: str, reply: Reply, request_id: str | None,
                result: CommandResult, trace_id: str, audit: dict[str, Any] | None = None) -> CommandResult:
        """Count, log, audit and publish the answer; returns it as sent."""
        if result.error:
            result = result.model_copy(update={"error": clip(mask_userinfo(result.error), MAX_ERROR_CHARS)})
        result, payload = self._fitted(result, reply)
        known = name in self._handlers
        metrics.COMMANDS.labels(command=name if known else "unknown", result=str(result.code)).inc()
        correlation_id = _correlation_text(reply.correlation_data) or request_id
        kind = "command.rejected" if 400 <= result.code < 500 or result.code == 503 else "command.executed"
        log.log(logging.INFO if result.ok else logging.WARNING, "command %s %s: %s %s", clip(name, 64),
                request_id, result.code, clip(result.error or "ok"),
                extra={"command": name, "correlation_id": correlation_id, "trace_id": trace_id})
        self._audit(kind, {"request_id": request_id, "command": name[:128], "code": result.code,
                           "ok": result.ok, "error": result.error, "topic": topic[:256], **(audit or {})},
                    correlation_id, trace_id)
        self._answer(reply, payload)
        return result

    def _audit(self, type_: str, data: dict[str, Any], correlation_id: str | None, trace_id: str) -> None:
        try:
            self._emit(Draft(stream=AUDIT_STREAM, type=type_, data=data, correlation_id=correlation_id,
                             trace_id=trace_id))
        except Exception:
            log.exception("commands: could not record %s", type_)

    def _answer(self, reply: Reply, payload: bytes) -> None:
        if publish_packet_size(reply.topic, len(payload), reply.correlation_data) > self._packet_limit():
            log.error("commands: no answer fits the broker's packet limit on %s", clip(reply.topic))
            return
        try:
            self._publish(reply.topic, payload, qos=1, correlation_data=reply.correlation_data)
        except Exception:
            log.exception("commands: could not publish the result to %s", clip(reply.topic))

    # --- the commands ---

    def _ping(self, args: dict[str, Any], _ctx: Context) -> dict[str, Any]:
        _args(NoArgs, args)
        return {"pong": True, "ts": utc_now_iso()}

    def _get_status(self, args: dict[str, Any], _ctx: Context) -> dict[str, Any]:
        _args(NoArgs, args)
        return self._control.status()

    def _get_config(self, args: dict[str, Any], _ctx: Context) -> dict[str, Any]:
        _args(NoArgs, args)
        version, document = self._control.config_document()
        return {"version": version, "config": redact(document)}

    def _set_config(self, args: dict[str, Any], ctx: Context) -> dict[str, Any]:
        return set_config(self._control, _args(SetConfigArgs, args), correlation_id=ctx.correlation_id)

    def _reload_config(self, args: dict[str, Any], ctx: Context) -> dict[str, Any]:
        _args(NoArgs, args)
        try:
            return self._control.reload_config(correlation_id=ctx.correlation_id)
        except ConfigRejected as e:
            raise CommandError(422, "config file refused, running config kept: " + "; ".join(e.problems)) from e

    def _restart_camera(self, args: dict[str, Any], _ctx: Context) -> dict[str, Any]:
        a = _args(CameraArgs, args)
        try:
            return self._control.restart_camera(a.camera_id)
        except UnknownCamera as e:
            raise CommandError(404, f"unknown camera {clip(a.camera_id, 64)!r}") from e

    def _snapshot(self, args: dict[str, Any], ctx: Context) -> dict[str, Any]:
        a = _args(SnapshotArgs, args)
        try:
            jpeg = self._control.snapshot(a.camera_id, raw=a.raw)
        except UnknownCamera as e:
            raise CommandError(404, f"unknown camera {clip(a.camera_id, 64)!r}") from e
        if jpeg is None:
            raise CommandError(404, f"camera {clip(a.camera_id, 64)!r} has no frame yet")
        from edge_agent.vision.capture import (
            jpeg_within,  # OpenCV: loaded by the first snapshot, not by an idle agent
        )

        fitting = jpeg_within(jpeg, self._jpeg_budget(a.camera_id, ctx))
        if fitting is None:
            raise CommandError(413, "no snapshot of this camera fits the broker's maximum packet size")
        return _snapshot_result(a.camera_id, fitting)

    def _jpeg_budget(self, camera_id: str, ctx: Context) -> int:
        """The largest JPEG whose answer, base64 and all, fits ``ctx.payload_budget``."""
        empty = CommandResult(request_id=ctx.request_id, ok=True, code=200,
                              result=_snapshot_result(camera_id, b""))
        # "bytes" grows by up to 9 digits from the empty result's 1; base64 takes 4 bytes per 3.
        room = ctx.payload_budget - len(empty.model_dump_json().encode()) - 9
        return max(0, room // 4 * 3)

    def _flush_outbox(self, args: dict[str, Any], _ctx: Context) -> dict[str, Any]:
        _args(NoArgs, args)
        return self._control.flush_outbox()


def set_config(control: AgentControl, a: SetConfigArgs, *, correlation_id: str | None) -> dict[str, Any]:
    """A versioned config patch, for the ``set_config`` command and the agent's page alike:
    CommandError 409 on a stale version, 403 for what only a local edit may change, 422 when
    the result is not a valid config."""
    try:
        return control.set_config(a.patch, a.expected_version, correlation_id=correlation_id)
    except VersionConflict as e:
        raise CommandError(409, str(e)) from e
    except ChangeForbidden as e:
        shown = e.paths[:MAX_LISTED_PATHS]
        more = f" and {len(e.paths) - len(shown)} more" if len(e.paths) > len(shown) else ""
        raise CommandError(403, f"a remote set_config may not change {', '.join(shown)}{more}: "
                                "edit the config file on the host", audit={"refused": shown}) from e
    except ConfigRejected as e:
        raise CommandError(422, "invalid config: " + "; ".join(e.problems)) from e


def _snapshot_result(camera_id: str, jpeg: bytes) -> dict[str, Any]:
    return {"camera_id": camera_id, "content_type": "image/jpeg", "bytes": len(jpeg),
            "jpeg_base64": base64.b64encode(jpeg).decode("ascii")}


def _request_id_of(raw: dict[str, Any]) -> str | None:
    """The request's id as the answer may echo it: a string of at most 128 characters."""
    rid = raw.get("request_id")
    return rid if isinstance(rid, str) and len(rid) <= 128 else None


def _check_correlation_data(properties: Any) -> None:
    data = _correlation_data(properties)
    if data is not None and len(data) > MAX_CORRELATION_BYTES:
        raise CommandError(400, f"correlation data longer than {MAX_CORRELATION_BYTES} bytes")


def _args(model: type[BaseModel], args: dict[str, Any]) -> Any:
    try:
        return model.model_validate(args)
    except ValidationError as e:
        raise CommandError(400, "bad args: " + _first_problems(e)) from e


def _first_problems(err: ValidationError, limit: int = 3) -> str:
    return "; ".join(problem_lines(err)[:limit])


def _peek_request_id(payload: bytes) -> str | None:
    if len(payload) > MAX_PAYLOAD_BYTES:
        return None
    try:
        raw = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return _request_id_of(raw) if isinstance(raw, dict) else None
