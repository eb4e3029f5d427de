"""The bridge's HTTP API: liveness, metrics, and the token-guarded queue endpoints (DESIGN "HTTP").

``create_app(backend)`` takes the running Bridge (anything with ``config``, ``submit`` and
``health``) so that the app can be tested alone. Endpoints that block on Kafka are plain
``def`` functions: FastAPI runs them in its threadpool, so the event loop stays free.

Envelopes made here follow the agent's publish endpoint (``wire.publish_draft``): the
message is the data and its string ``type``, ``camera_id`` and ``trace_id`` name the
envelope's (a new trace id when it names none), ``correlation_id`` comes from the
``X-Correlation-ID`` request header. Only these two are the bridge's own: ``device_id`` is
``http.device_id`` (default: the bridge's MQTT client id) and ``seq`` counts API publishes
of this process from 1 (it restarts with the process; consumers drop duplicates by ``id``).
"""

# No "from __future__ import annotations": the endpoints use body models built per app at
# run time, which FastAPI must see as real classes, not as names to resolve later.
import hmac
import itertools
import json
import logging
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Literal, Protocol

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from edge_agent import __version__
from edge_agent.bridge.config import BridgeConfig
from edge_agent.bridge.queue_admin import QueueAdminError, RetryResult, TopicStatus
from edge_agent.bridge.supervisor import merged_exposition
from edge_agent.common import metrics
from edge_agent.common.config import env_secret, problem_lines
from edge_agent.common.envelope import Envelope, build, encode
from edge_agent.common.wire import PublishRequest, parse_uplink_topic, publish_draft

log = logging.getLogger(__name__)

Role = Literal["admin", "system", "auditor"]
PUBLISH_ROLES: tuple[Role, ...] = ("admin", "system")
STATUS_ROLES: tuple[Role, ...] = ("admin", "auditor")
RETRY_ROLES: tuple[Role, ...] = ("admin",)
CONFIRM_TIMEOUT_S = 30.0  # publish answers 504 when Kafka has not confirmed by then
# A publish body is the message plus a topic and a key: room for the JSON around the largest
# message the bridge forwards. The bound is checked before anything reads the body (413).
BODY_OVERHEAD_BYTES = 64 * 1024


class QueueBackend(Protocol):
    """What the API needs of the bridge."""

    config: BridgeConfig

    def submit(self, kafka_topic: str, envelope: Envelope, *, key: str | None = None) -> Future: ...

    def health(self) -> dict: ...


class QueueInspector(Protocol):
    """Broker-side reads and the DLQ retry (``queue_admin.KafkaQueueAdmin`` or ``rabbitmq_admin.RabbitQueueAdmin``)."""

    def status(self, topics: list[str]) -> list[TopicStatus]: ...

    def retry_dead_letters(self, topic: str, max_messages: int) -> RetryResult: ...

    def lags(self, topics: list[str]) -> list[TopicStatus]: ...


class LagExporter:
    """Keeps ``edge_bridge_consumer_lag`` fresh for the lag alert.

    A scrape finding the values older than ``max_age_s`` starts a refresh in the
    background and answers with what it has, so an unreachable Kafka never slows
    ``/metrics`` (the first scrape after start has no lag series yet).
    """

    def __init__(self, inspector: Callable[[], QueueInspector], topics: list[str], max_age_s: float = 15.0):
        self._inspector = inspector
        self.topics = topics
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._running = False
        self._at = float("-inf")

    def on_scrape(self) -> None:
        with self._lock:
            if self._running or time.monotonic() - self._at < self.max_age_s:
                return
            self._running = True
        threading.Thread(target=self.refresh, name="lag-exporter", daemon=True).start()

    def refresh(self) -> None:
        try:
            rows = self._inspector().lags(self.topics)
            metrics.BRIDGE_CONSUMER_LAG.clear()  # groups that went away must not linger
            for row in rows:
                for group in row.groups:
                    metrics.BRIDGE_CONSUMER_LAG.labels(row.topic, group.group).set(group.lag)
        except Exception as e:  # noqa: BLE001 - a failed refresh keeps the last values; the next scrape retries
            log.warning("consumer lag refresh failed: %s", e)
        finally:
            with self._lock:
                self._running = False
                self._at = time.monotonic()


def liveness(health: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """``/healthz``: 503 naming the parts that died for good, else 200 (also with a broker down)."""
    if health.get("dead"):
        return 503, {"status": "unhealthy", **health}
    return 200, {"status": "ok", **health}


# --- wire models -----------------------------------------------------------------------------

class PublishResponse(BaseModel):
    status: Literal["ok", "error"]
    messageId: str | None = None  # noqa: N815 - the wire name DESIGN fixes
    traceId: str | None = None  # noqa: N815
    error: str | None = None


class RetryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    topic: str  # narrowed per app to the mapped Kafka topics
    maxMessages: int = Field(100, ge=1, le=100_000)  # noqa: N815


class ErrorResponse(BaseModel):
    status: Literal["error"] = "error"
    error: str


_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 422, 503)}


# --- auth ------------------------------------------------------------------------------------

def load_tokens(cfg: BridgeConfig) -> dict[str, Role]:
    """token -> role, read once from the environment; a named but unset variable is skipped."""
    tokens: dict[str, Role] = {}
    for t in cfg.http.tokens:
        secret = env_secret(t.token_env)
        if secret:
            tokens[secret] = t.role
        else:
            log.warning("API token variable %s is not set: that role has no token", t.token_env)
    return tokens


def _role_of(tokens: dict[str, Role], presented: str) -> Role | None:
    # Compare against every token in constant time so timing does not reveal a prefix.
    found: Role | None = None
    for token, role in tokens.items():
        if hmac.compare_digest(token.encode(), presented.encode()):
            found = role
    return found


def _auth_dependency(tokens: dict[str, Role]) -> Callable[..., Callable[..., Role]]:
    bearer = HTTPBearer(auto_error=False)

    def require(*allowed: Role) -> Callable[..., Role]:
        def check(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Role:
            role = _role_of(tokens, creds.credentials) if creds else None
            if role is None:
                metrics.BRIDGE_API_DENIED.labels(code="401").inc()  # the unauthorised-access alert
                raise HTTPException(401, "missing or unknown bearer token",
                                    headers={"WWW-Authenticate": "Bearer"})
            if role not in allowed:
                metrics.BRIDGE_API_DENIED.labels(code="403").inc()
                raise HTTPException(403, f"role {role} may not do this")
            return role
        return check

    return require


# --- the app ---------------------------------------------------------------------------------

class BadMessage(ValueError):
    """The message cannot become a valid envelope (the API answers 422 naming why)."""


def _envelope_for(req: PublishRequest, device_id: str, seq: int, correlation_id: str | None) -> Envelope:
    """The envelope of a publish: the agent's draft of it (``wire.publish_draft``), as this bridge's device."""
    _require_strict_json(req.message)
    try:
        draft = publish_draft(req, correlation_id)
    except ValidationError as e:  # type, camera_id or trace_id break the envelope's rules
        raise BadMessage(f"message.{problem_lines(e)[0]}") from None
    return build(device_id, seq, draft.type, draft.data, camera_id=draft.camera_id, trace_id=draft.trace_id,
                 correlation_id=draft.correlation_id)


def _require_strict_json(msg: dict[str, Any]) -> None:
    # The request parser takes NaN and Infinity; stored, they would turn into null on the way out.
    try:
        json.dumps(msg, allow_nan=False)
    except ValueError as e:
        raise BadMessage(f"message: {e}") from None


def _with_topics(model: type[BaseModel], topics: list[str], description: str) -> type[BaseModel]:
    """``model`` whose ``topic`` must be one of ``topics``: the OpenAPI spec then lists them for clients."""
    return create_model(model.__name__, __base__=model,
                        topic=(Literal[tuple(topics)], Field(description=description)))  # type: ignore[valid-type]


def _error(code: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=code, content={"status": "error", "error": message, **extra})


def dead_letter_source_resolver(cfg: BridgeConfig) -> Callable[[str], str | None]:
    """``dlq-source-topic`` -> Kafka topic: the bridge records the MQTT topic a letter came in on."""
    kafka_topics = set(cfg.topics.values())

    def resolve(source: str) -> str | None:
        if source in kafka_topics:
            return source
        parsed = parse_uplink_topic(source, cfg.mqtt.topic_prefix)
        return cfg.topics.get(parsed[1]) if parsed else None

    return resolve


def _default_inspector(cfg: BridgeConfig) -> QueueInspector:
    if cfg.rabbitmq is not None:
        from edge_agent.bridge.rabbitmq_admin import RabbitQueueAdmin

        return RabbitQueueAdmin(cfg.rabbitmq, source_topic=dead_letter_source_resolver(cfg))
    from edge_agent.bridge.kafka import (
        kafka_client_config,  # the bridge's librdkafka settings, security included
    )
    from edge_agent.bridge.queue_admin import KafkaQueueAdmin

    return KafkaQueueAdmin(kafka_client_config(cfg.kafka), cfg.dlq.topic,
                           source_topic=dead_letter_source_resolver(cfg))


def create_app(backend: QueueBackend, inspector: QueueInspector | None = None, *,
               confirm_timeout_s: float = CONFIRM_TIMEOUT_S) -> FastAPI:
    cfg = backend.config
    require = _auth_dependency(load_tokens(cfg))
    device_id = cfg.http.device_id or cfg.mqtt.client_id
    seq_counter = itertools.count(1)
    seq_lock = threading.Lock()
    inspector_box: list[QueueInspector | None] = [inspector]
    streams = sorted(cfg.topics)
    kafka_topics = sorted(set(cfg.topics.values()))
    status_topics = sorted(set(kafka_topics) | {cfg.dlq.topic})
    Publish = _with_topics(PublishRequest, streams, "an uplink stream; the bridge maps it to its Kafka topic")
    Retry = _with_topics(RetryRequest, kafka_topics, "the Kafka topic whose dead letters are re-sent")
    StatusTopic = Literal[tuple(status_topics)]  # type: ignore[valid-type]
    lag_exporter = LagExporter(lambda: get_inspector(), kafka_topics)

    def get_inspector() -> QueueInspector:
        # Built on first use: an app that only publishes never opens admin connections.
        if inspector_box[0] is None:
            inspector_box[0] = _default_inspector(cfg)
        return inspector_box[0]

    docs = cfg.http.docs  # off by default: the spec tells a stranger every route and field
    app = FastAPI(title="edge-agent bridge", version=__version__,
                  description="Publish to the bridge's Kafka topics, read queue status, retry dead letters.",
                  max_body_size=cfg.max_message_bytes + BODY_OVERHEAD_BYTES,
                  openapi_url="/openapi.json" if docs else None, docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None)

    # Starlette's base class: also catches the framework's own errors (unparsable body, 404, 405).
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, headers=exc.headers,
                            content={"status": "error", "error": str(exc.detail)})

    @app.exception_handler(RequestValidationError)
    async def _bad_body(_req: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's error has pydantic's errors(): the same "loc: msg" lines as a config file's.
        lines = problem_lines(exc, root="request")
        return _error(422, lines[0] if lines else "request: invalid request")

    @app.get("/healthz", summary="liveness; says what is connected; 503 naming a part that died for good",
             responses={503: {"description": "a long-lived part died and could not be restarted"}})
    def healthz() -> JSONResponse:
        # 200 while the process works, also with a broker down: holding acks is normal operation.
        try:
            code, body = liveness(backend.health())
        except Exception as e:  # noqa: BLE001 - liveness must answer even when health() breaks
            log.exception("health() failed")
            code, body = 200, {"status": "ok", "health_error": str(e)}
        return JSONResponse(status_code=code, content=body)

    @app.get("/metrics", summary="Prometheus text exposition", response_class=Response)
    def prometheus_metrics() -> Response:
        lag_exporter.on_scrape()
        body, ctype = merged_exposition() or metrics.exposition()  # workers: N merges every process's
        return Response(content=body, media_type=ctype)

    @app.post("/api/v1/queue/publish", response_model=PublishResponse,
              responses={**_ERRORS, 502: {"model": PublishResponse}, 504: {"model": PublishResponse}},
              summary="wrap a message in an envelope and send it to Kafka; answers once Kafka confirms")
    def publish(body: Publish, response: Response,  # type: ignore[valid-type]
                x_correlation_id: str | None = Header(None, max_length=256),
                _role: Role = Depends(require(*PUBLISH_ROLES))) -> Any:
        kafka_topic = cfg.topics[body.topic]
        try:
            env = _envelope_for(body, device_id, 1, x_correlation_id)
        except BadMessage as e:
            return _error(422, str(e))
        if len(encode(env)) > cfg.max_message_bytes:  # checked before taking a seq: no gap for a refusal
            return _error(413, f"message larger than {cfg.max_message_bytes} bytes")
        with seq_lock:
            env = env.model_copy(update={"seq": next(seq_counter)})
        ids = {"messageId": env.id, "traceId": env.trace_id}
        where = {"trace_id": env.trace_id, "correlation_id": x_correlation_id, "topic": kafka_topic}
        try:
            fut = backend.submit(kafka_topic, env, key=body.key)
        except RuntimeError as e:  # the bridge is shutting down
            return _error(503, str(e), **ids)
        try:
            fut.result(timeout=confirm_timeout_s)
        except FutureTimeout:
            log.warning("api publish not confirmed in time", extra=where)
            return _error(504, f"Kafka has not confirmed within {confirm_timeout_s:g} s; the bridge keeps trying",
                          **ids)
        except Exception as e:  # noqa: BLE001 - the delivery error goes back to the caller
            log.warning("api publish failed: %s", e, extra=where)
            return _error(502, f"Kafka refused the record: {e}", **ids)
        log.info("api publish", extra=where)
        response.headers["X-Trace-ID"] = env.trace_id
        return PublishResponse(status="ok", **ids)

    @app.get("/api/v1/queue/status", response_model=list[TopicStatus], responses=_ERRORS,
             summary="per topic: consumer-group lag, consumers, dead letters")
    def queue_status(topic: StatusTopic | None = Query(None, description="one topic; default: every mapped topic"),  # type: ignore[valid-type]
                     _role: Role = Depends(require(*STATUS_ROLES))) -> Any:
        topics = [topic] if topic is not None else kafka_topics
        try:
            return get_inspector().status(topics)
        except QueueAdminError as e:
            return _error(503, str(e))

    @app.post("/api/v1/queue/dlq/retry", response_model=RetryResult, responses=_ERRORS,
              summary="re-publish a topic's dead letters to it (each letter once)")
    def dlq_retry(body: Retry, _role: Role = Depends(require(*RETRY_ROLES))) -> Any:  # type: ignore[valid-type]
        try:
            result = get_inspector().retry_dead_letters(body.topic, body.maxMessages)
        except QueueAdminError as e:
            return _error(503, str(e))
        log.info("dlq retry: %d re-sent, %d errors", result.retried, result.errors, extra={"topic": body.topic})
        return result

    return app
