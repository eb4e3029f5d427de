"""The agent's loopback HTTP: liveness, metrics, status, and the local publish endpoint.

Local producers on the camera host (a door sensor script, a second analytics process) hand
events to the outbox here. A stdlib threading server keeps the idle agent small; the
bridge, with its auth and OpenAPI, uses FastAPI instead.
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, ValidationError

from . import metrics
from .config import STREAMS
from .envelope import Draft
from .outbox import Outbox, OutboxClosed, OutboxFull

log = logging.getLogger(__name__)
_MAX_BODY = 1_000_000


class PublishRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    topic: str
    message: dict[str, Any]
    key: str | None = None


def draft_from_publish(req: PublishRequest, correlation_id: str | None = None) -> Draft:
    """DESIGN: ``message`` becomes ``data``; ``type`` and ``camera_id`` come from the message when given."""
    msg = req.message
    type_ = msg["type"] if isinstance(msg.get("type"), str) and msg["type"] else "external"
    camera = msg.get("camera_id") if isinstance(msg.get("camera_id"), str) else None
    trace = msg.get("trace_id") if isinstance(msg.get("trace_id"), str) and len(msg["trace_id"]) == 32 else None
    return Draft(stream=req.topic, type=type_, data=msg, camera_id=camera,
                 correlation_id=correlation_id, trace_id=trace)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # The stdlib default listen backlog of 5 resets connections when a burst of local producers arrives.
    request_queue_size = 128


class AgentHttp:
    def __init__(self, host: str, port: int, outbox: Outbox, status: Callable[[], dict]):
        self.outbox = outbox
        self.status = status
        handler = type("Handler", (_Handler,), {"app": self})
        self.server = _Server((host, port), handler)
        self._thread = threading.Thread(target=self.server.serve_forever, name="agent-http", daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def publish(self, body: bytes, correlation_id: str | None) -> tuple[int, dict]:
        try:
            req = PublishRequest.model_validate_json(body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            return 400, {"status": "error", "error": f"{where}: {first['msg']}"}
        if req.topic not in STREAMS:
            return 400, {"status": "error", "error": f"topic must be one of {', '.join(STREAMS)}"}
        try:
            env = self.outbox.put(draft_from_publish(req, correlation_id))
        except OutboxFull as e:
            return 507, {"status": "error", "error": str(e)}
        except OutboxClosed:
            return 503, {"status": "error", "error": "agent is stopping"}
        return 200, {"status": "ok", "messageId": env.id, "seq": env.seq}


class _Handler(BaseHTTPRequestHandler):
    app: AgentHttp
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args) -> None:  # access logs stay at debug
        log.debug("http %s", fmt % args)

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, doc: Any) -> None:
        self._send(code, json.dumps(doc).encode())

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._json(200, {"status": "ok"})
        elif path == "/metrics":
            body, ctype = metrics.exposition()
            self._send(200, body, ctype)
        elif path == "/api/v1/status":
            self._json(200, self.app.status())
        else:
            self._json(404, {"status": "error", "error": "not found"})

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path != "/api/v1/queue/publish":
            self._json(404, {"status": "error", "error": "not found"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"status": "error", "error": "body too large"})
            return
        body = self.rfile.read(length)
        code, doc = self.app.publish(body, self.headers.get("X-Correlation-ID"))
        self._json(code, doc)
