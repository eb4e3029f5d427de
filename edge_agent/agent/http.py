"""The agent's loopback HTTP: liveness, metrics, status, the local publish endpoint, and
for people the page with live camera views (page.py).

Local producers on the camera host (a door sensor script, a second analytics process) hand
events to the outbox here. A stdlib threading server keeps the idle agent small; the
bridge, with its auth and OpenAPI, uses FastAPI instead.

Bounded, because anything on the host can connect: a body's size is checked from its
Content-Length before it is read (413), a missing or malformed Content-Length is a 4xx,
every socket read has a timeout, and past ``max_connections`` a new connection gets 503
at once instead of a thread of its own. Every malformed request gets a JSON 4xx answer.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from pydantic import ValidationError

from edge_agent.agent.page import (
    CONFIG_PATH,
    PAGE_HEADERS,
    STREAM_FPS,
    PageControl,
    apply_config,
    camera_route,
    config_answer,
    foreign_host,
    foreign_origin,
    page_html,
    snapshot_answer,
    wants_raw,
)
from edge_agent.agent.outbox import (
    EnvelopeTooLarge,
    Outbox,
    OutboxClosed,
    OutboxFull,
    OutboxUnavailable,
)
from edge_agent.agent.supervisor import UnknownCamera
from edge_agent.common import metrics
from edge_agent.common.config import problem_lines
from edge_agent.common.envelope import MAX_MESSAGE_BYTES
from edge_agent.common.logs import clip
from edge_agent.common.supervised import SupervisedThread
from edge_agent.common.wire import STREAMS, PublishRequest, publish_draft

log = logging.getLogger(__name__)

Health = Callable[[], tuple[int, dict[str, Any]]]
_CONTENT_LENGTH = re.compile(r"[0-9]{1,12}")
# Where a field of the Draft/Envelope came from in the request, for a 400 that names it.
_REQUEST_FIELD = {"type": "message.type", "camera_id": "message.camera_id", "trace_id": "message.trace_id",
                  "data": "message", "correlation_id": "X-Correlation-ID"}
# http.server's own 5xx answers to what is really a client's mistake.
_CLIENT_CODE = {HTTPStatus.NOT_IMPLEMENTED: HTTPStatus.METHOD_NOT_ALLOWED,
                HTTPStatus.HTTP_VERSION_NOT_SUPPORTED: HTTPStatus.BAD_REQUEST}


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise ValueError("duplicate key in an object")
    return doc


def strict_json(body: bytes) -> Any:
    """The body as strict JSON: NaN, Infinity and duplicate keys are errors (ValueError), as is deep nesting.

    What a producer sends is what the envelope carries: pydantic's parser would take NaN (and
    store null) or keep the last of two keys.
    """
    try:
        return json.loads(body, parse_constant=_not_json, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _error(code: int, text: str) -> tuple[int, dict]:
    return code, {"status": "error", "error": text}


def _first_error(e: ValidationError, fields: dict[str, str] | None = None) -> str:
    """The first problem as ``problem_lines`` words it, its place named as the client sent it:
    a Draft field by the request field it came from, the whole document as ``body``."""
    line = problem_lines(e, root="body")[0]
    loc = e.errors()[0]["loc"]
    if not loc:
        return line
    head = str(loc[0])
    if fields and head in fields:
        return fields[head] + line[len(head):]
    return line


def _refuse_busy(sock: socket.socket) -> None:
    """Past the connection cap: a 503 written straight from the accept loop, never blocking it."""
    body = b'{"status": "error", "error": "too many connections"}'
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
    try:
        sock.setblocking(False)
        sock.send(head + body)  # a few bytes into an empty socket buffer: does not block
        sock.recv(65536)  # what the client already sent: closing on unread bytes would reset the answer
    except OSError:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # The stdlib default listen backlog of 5 resets connections when a burst of local producers arrives.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type, max_connections: int):
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            _refuse_busy(request)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # the client went away
            log.debug("http: connection from %s ended early", client_address)
            return
        log.exception("http: unexpected error serving %s", client_address)


class AgentHttp:
    def __init__(self, host: str, port: int, outbox: Outbox, status: Callable[[], dict], *,
                 health: Health | None = None, control: PageControl | None = None,
                 max_body: int = MAX_MESSAGE_BYTES, max_connections: int = 64, read_timeout_s: float = 10.0):
        self.outbox = outbox
        self.status = status
        self.control = control  # the page, pictures and config; None: those paths are 404
        self.stopping = threading.Event()  # ends the live streams
        self.health = health or (lambda: (200, {"status": "ok"}))
        self.max_body = max_body
        handler = type("Handler", (_Handler,), {"app": self, "timeout": read_timeout_s})
        self.server = _Server((host, port), handler, max_connections)
        self.thread = SupervisedThread("agent-http", self.server.serve_forever)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.stop_restarting()
        if self.thread.is_alive():  # shutdown() waits for serve_forever, which never ran otherwise
            self.server.shutdown()
        self.server.server_close()

    def publish(self, body: bytes, correlation_id: str | None) -> tuple[int, dict]:
        try:
            req = PublishRequest.model_validate(strict_json(body))
        except ValidationError as e:
            return _error(400, _first_error(e))
        except ValueError as e:  # not strict JSON (UnicodeDecodeError is one too)
            return _error(400, f"body: invalid JSON: {clip(str(e), 120)}")
        if req.topic not in STREAMS:
            return _error(400, f"topic must be one of {', '.join(STREAMS)}")
        try:
            env = self.outbox.put(publish_draft(req, correlation_id))
        except ValidationError as e:  # the envelope's own rules, before anything is queued
            return _error(400, _first_error(e, _REQUEST_FIELD))
        except EnvelopeTooLarge as e:
            return _error(413, str(e))
        except OutboxFull as e:  # the size cap refuses, or the disk is full
            return _error(507, str(e))
        except OutboxClosed:
            return _error(503, "agent is stopping")
        except (OutboxUnavailable, TimeoutError) as e:
            return _error(503, f"outbox unavailable: {e}")
        return 200, {"status": "ok", "messageId": env.id, "seq": env.seq}


class _Handler(BaseHTTPRequestHandler):
    app: AgentHttp
    protocol_version = "HTTP/1.1"
    # A two-word request line is HTTP/0.9 to the stdlib, which then answers without a status line.
    default_request_version = "HTTP/1.0"

    def log_message(self, fmt: str, *args) -> None:  # access logs stay at debug
        log.debug("http %s", clip(fmt % args))

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, headers, method) as JSON, never a 5xx."""
        status = HTTPStatus(_CLIENT_CODE.get(code, code))
        self.close_connection = True
        self._json(status, {"status": "error", "error": message or status.phrase})

    def _send(self, code: int, body: bytes, ctype: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, doc: Any) -> None:
        self._send(code, json.dumps(doc).encode())

    def _answer(self, code: int, doc: dict, *, close: bool = False) -> None:
        if close:  # the body was not read: what follows on the socket is not a request
            self.close_connection = True
        self._json(code, doc)

    def _has_body(self) -> bool:
        return bool(self.headers.get("Transfer-Encoding")) or self.headers.get("Content-Length", "0").strip() != "0"

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        path, _, query = self.path.partition("?")
        close = self._has_body()  # a GET body is not read: the connection cannot be reused
        try:
            if self._for_people(path) and not self._browser_allowed(close):
                return
            if path == "/healthz":
                self._answer(*self.app.health(), close=close)
            elif path == "/metrics":
                self.close_connection = self.close_connection or close
                body, ctype = metrics.exposition()
                self._send(200, body, ctype)
            elif path == "/api/v1/status":
                self._answer(200, self.app.status(), close=close)
            elif self.app.control is not None and self._get_for_people(path, query, close):
                pass
            else:
                self._answer(404, {"status": "error", "error": "not found"}, close=close)
        except (OSError, TimeoutError):
            raise  # the client went away: nothing to answer
        except Exception:  # noqa: BLE001 - a bug of ours answers 500, the connection is not just dropped
            log.exception("http: GET %s failed", clip(path))
            self._answer(500, {"status": "error", "error": "internal error"}, close=True)

    # --- for people: the page, camera pictures, the config it edits (page.py) ----------------

    def _for_people(self, path: str) -> bool:
        return self.app.control is not None and (path in ("/", CONFIG_PATH) or camera_route(path) is not None)

    def _browser_allowed(self, close: bool, *, for_people: bool = True) -> bool:
        """False once a 403 answered a request from another site, or (for the page, pictures and
        config) for another host name."""
        why = foreign_origin(self.headers) or (foreign_host(self.headers) if for_people else None)
        if why is not None:
            self._answer(403, {"status": "error", "error": why}, close=close)
        return why is None

    def _get_for_people(self, path: str, query: str, close: bool) -> bool:
        """Answer a GET of the page, a camera picture or the config; False when the path is none of them."""
        control = self.app.control
        assert control is not None
        route = camera_route(path)
        self.close_connection = self.close_connection or close
        if path == "/":
            self._send(200, page_html(), PAGE_HEADERS["Content-Type"], PAGE_HEADERS)
        elif path == CONFIG_PATH:
            self._answer(*config_answer(control))
        elif route is not None and route[1] == "snapshot.jpg":
            code, body = snapshot_answer(control, route[0], wants_raw(query))
            if isinstance(body, bytes):
                self._send(code, body, "image/jpeg", {"Cache-Control": "no-store"})
            else:
                self._answer(code, body)
        elif route is not None:
            self._stream(control, route[0])
        else:
            return False
        return True

    def _stream(self, control: PageControl, camera_id: str) -> None:
        """MJPEG of the camera's annotated live view until the client leaves or the agent stops.
        Frames are drawn and encoded only here, at most STREAM_FPS a second."""
        try:
            first = control.next_stream_jpeg(camera_id, 0, timeout=0)
        except UnknownCamera:
            self._answer(404, {"status": "error", "error": f"unknown camera {camera_id!r}"})
            return
        self.close_connection = True  # the stream is the rest of the connection
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        metrics.VIEW_STREAMS.inc()
        try:
            self._stream_frames(control, camera_id, first)
        except UnknownCamera:
            pass  # the camera was removed from the config: the stream ends
        finally:
            metrics.VIEW_STREAMS.dec()

    def _stream_frames(self, control: PageControl, camera_id: str, got: tuple[int, bytes] | None) -> None:
        after, gap = 0, 1.0 / STREAM_FPS
        while not self.app.stopping.is_set():
            if got is not None:
                after, jpeg = got
                # A client that stops reading blocks this write until the socket timeout ends it.
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s\r\n"
                                 % (len(jpeg), jpeg))
                sent = time.monotonic()
                self.app.stopping.wait(max(0.0, sent + gap - time.monotonic()))
            got = control.next_stream_jpeg(camera_id, after, timeout=1.0)

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path not in ("/api/v1/queue/publish", CONFIG_PATH) or (path == CONFIG_PATH and self.app.control is None):
            self._answer(404, {"status": "error", "error": "not found"}, close=True)
            return
        # A web page the operator opens may post to loopback too: only same-origin or non-browser clients.
        if not self._browser_allowed(True, for_people=self._for_people(path)):
            return
        length = self._body_length()
        if length is None:
            return
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            self._answer(*_error(408, f"body not received within {self.timeout} s"), close=True)
            return
        if len(body) < length:  # the client stopped sending (half-closed) before the whole body
            self._answer(*_error(400, f"body ended after {len(body)} of {length} bytes"), close=True)
            return
        try:
            if path == CONFIG_PATH:
                assert self.app.control is not None
                code, doc = apply_config(self.app.control, body)
            else:
                code, doc = self.app.publish(body, self.headers.get("X-Correlation-ID"))
        except Exception:  # noqa: BLE001 - a bug of ours answers 500, the connection is not just dropped
            log.exception("http: POST %s failed", path)
            code, doc = _error(500, "internal error")
        self._answer(code, doc)

    def _body_length(self) -> int | None:
        """The declared body length, or None once a 4xx has answered a missing, bad or too big one."""
        if self.headers.get("Transfer-Encoding"):
            self._answer(*_error(411, "send the body with a Content-Length (no chunked encoding)"), close=True)
            return None
        values = self.headers.get_all("Content-Length") or []
        if not values:
            self._answer(*_error(411, "Content-Length required"), close=True)
            return None
        if len({v.strip() for v in values}) != 1 or not _CONTENT_LENGTH.fullmatch(values[0].strip()):
            self._answer(*_error(400, f"bad Content-Length {clip(values[0], 40)!r}"), close=True)
            return None
        length = int(values[0])
        if length > self.app.max_body:
            self._answer(*_error(413, f"body of {length} bytes is over the limit of {self.app.max_body}"),
                         close=True)
            return None
        return length
