"""The consumer's loopback HTTP: ``/healthz`` and ``/metrics`` only (no request bodies are read).

A stdlib threading server, like the agent's: the consumer has no API to document.
"""

from __future__ import annotations

import json
import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from edge_agent.common.metrics import exposition

log = logging.getLogger(__name__)

Healthz = Callable[[], tuple[int, dict[str, Any]]]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], healthz: Healthz):
        super().__init__(address, _Handler)
        self.healthz = healthz

    def handle_error(self, request, client_address) -> None:  # a client that hung up: not our error
        log.debug("HTTP client %s: error", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # a socket read never waits longer

    def log_message(self, fmt: str, *args) -> None:
        log.debug("http: " + fmt, *args)

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            code, doc = self.server.healthz()
            self._send(code, json.dumps(doc).encode(), "application/json")
        elif path == "/metrics":
            body, ctype = exposition()
            self._send(200, body, ctype)
        else:
            self._send(404, b'{"error": "not found"}', "application/json")

    do_HEAD = do_GET

    def _refuse(self) -> None:
        self.close_connection = True
        self._send(405, b'{"error": "method not allowed"}', "application/json")

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _refuse


def make_server(host: str, port: int, healthz: Healthz) -> _Server:
    return _Server((host, port), healthz)
