"""The agent's HTTP for people: the page, camera pictures, and the config it edits.

``GET /`` is one static HTML file (``static/index.html``, plain JavaScript, no build step).
It shows each camera's live view (``stream.mjpg``), counters and health from
``/api/v1/status``, and turns two clicks on a frame into a line that ``POST /api/v1/config``
applies through the same versioned path as the ``set_config`` command (409 on a stale
version, 403 for what only a local edit may change).

A page on loopback is still reachable from any web page the operator's browser opens, so the
guards are about browsers: a request that carries an ``Origin`` other than the agent's own is
refused (cross-site posts), and the page, pictures and config answer only to a ``Host`` that
is an address or a name of this machine (DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from email.message import Message
from functools import cache
from importlib import resources
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from pydantic import ValidationError

from edge_agent.agent.commands import CommandError, SetConfigArgs, set_config
from edge_agent.agent.liveconfig import redact
from edge_agent.agent.supervisor import UnknownCamera
from edge_agent.common.config import problem_lines

_CAMERA_PATH = re.compile(r"/api/v1/cameras/([A-Za-z0-9_.-]{1,128})/(snapshot\.jpg|stream\.mjpg)")
STREAM_FPS = 5.0  # live view rate: enough to watch people walk, little CPU per viewer
CONFIG_PATH = "/api/v1/config"


class PageControl(Protocol):
    """What the page needs from the daemon (``daemon.Agent``)."""

    def config_document(self) -> tuple[str, dict[str, Any]]: ...

    def set_config(self, patch: dict[str, Any], expected_version: str, *,
                   correlation_id: str | None) -> dict[str, Any]: ...

    def snapshot(self, camera_id: str, *, raw: bool = False) -> bytes | None:
        """Raises UnknownCamera."""

    def next_stream_jpeg(self, camera_id: str, after: int, timeout: float) -> tuple[int, bytes] | None:
        """Raises UnknownCamera."""


@cache
def page_html() -> bytes:
    return resources.files("edge_agent.agent").joinpath("static/index.html").read_bytes()


PAGE_HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    "Cache-Control": "no-store",
    # Everything the page loads comes from the agent itself; no framing (click-jacking a line apply).
    "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
                               "style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
}


def camera_route(path: str) -> tuple[str, str] | None:
    """``(camera_id, "snapshot.jpg" | "stream.mjpg")`` for a camera picture path, else None."""
    m = _CAMERA_PATH.fullmatch(path)
    return (m.group(1), m.group(2)) if m else None


def wants_raw(query: str) -> bool:
    values = parse_qs(query).get("raw", [])
    return bool(values) and values[-1].lower() in ("1", "true", "yes")


def snapshot_answer(control: PageControl, camera_id: str, raw: bool) -> tuple[int, bytes | dict[str, Any]]:
    """200 with the JPEG, or 404 with a JSON error (unknown camera, no frame yet)."""
    try:
        jpeg = control.snapshot(camera_id, raw=raw)
    except UnknownCamera:
        return 404, {"status": "error", "error": f"unknown camera {camera_id!r}"}
    if jpeg is None:
        return 404, {"status": "error", "error": f"camera {camera_id!r} has no frame yet"}
    return 200, jpeg


def config_answer(control: PageControl) -> tuple[int, dict[str, Any]]:
    """What ``get_config`` answers: the version and the document with secrets hidden."""
    version, document = control.config_document()
    return 200, {"version": version, "config": redact(document)}


def apply_config(control: PageControl, body: bytes) -> tuple[int, dict[str, Any]]:
    """``{"patch", "expected_version"}`` -> the ``set_config`` result or its refusal, as (code, JSON)."""
    try:
        args = SetConfigArgs.model_validate_json(body)
    except ValidationError as e:
        return 400, {"status": "error", "error": problem_lines(e, root="body")[0]}
    try:
        return 200, {"status": "ok", **set_config(control, args, correlation_id=None)}
    except CommandError as e:
        return e.code, {"status": "error", "error": str(e)}


def foreign_origin(headers: Message) -> str | None:
    """Why a browser request comes from another site, or None: an ``Origin`` header (browsers send
    it on cross-site and on POST requests) must name the host the request was sent to."""
    origin = headers.get("Origin")
    if origin is None:
        return None  # not a browser's cross-site request (curl, scripts, same-origin GET)
    if origin == "null" or urlsplit(origin).netloc.lower() != (headers.get("Host") or "").lower():
        return f"requests from origin {origin[:100]!r} are not accepted"
    return None


def foreign_host(headers: Message) -> str | None:
    """Why the ``Host`` is not this machine, or None: an IP address, localhost, or this host's name.
    A page of another site whose name was made to resolve to 127.0.0.1 carries its own name here."""
    host = (headers.get("Host") or "").strip().lower()
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]")
    if not name:
        return "a Host header is required"
    if name in _own_names():
        return None
    try:
        ipaddress.ip_address(name)
        return None
    except ValueError:
        return f"Host {host[:100]!r} is not a name of this machine"


@cache
def _own_names() -> frozenset[str]:
    names = {"localhost", socket.gethostname().lower()}
    try:
        names.add(socket.getfqdn().lower())
    except OSError:
        pass
    return frozenset(names)
