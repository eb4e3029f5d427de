"""Who may command the agent: HMAC signatures, the request's time and a replay cache of nonces
(DESIGN "Commands over MQTT"). The operator side signs with ``sign_request``; the agent checks
with ``RequestVerifier``."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections import OrderedDict
from datetime import datetime
from typing import Any, Callable

# Enough for a busy operator within one window on a host whose memory is finite.
NONCE_CACHE_MAX = 100_000
# RFC 3339 date-time: a T (not a space), seconds, an offset; ASCII digits only.
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})", re.ASCII)


class Unauthorized(Exception):
    """A request whose signature, time or nonce does not hold (answered 401); the text says which."""


def canonical(request: dict[str, Any]) -> bytes:
    body = {k: v for k, v in request.items() if k != "sig"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def signature(secret: bytes, topic: str, request: dict[str, Any]) -> str:
    return hmac.new(secret, topic.encode("utf-8") + b"\n" + canonical(request), hashlib.sha256).hexdigest()


def sign_request(secret: bytes, topic: str, request: dict[str, Any]) -> dict[str, Any]:
    """The operator side: the request with ``sig`` set (ts and nonce must be in it already)."""
    return {**request, "sig": signature(secret, topic, request)}


def parse_rfc3339(ts: str) -> float:
    """Seconds since the epoch of an RFC 3339 date-time such as ``2026-11-26T06:00:00.123Z``."""
    if not _RFC3339.fullmatch(ts):
        raise ValueError("not an RFC 3339 date-time (YYYY-MM-DDTHH:MM:SS[.fff] and Z or ±HH:MM)")
    return datetime.fromisoformat(ts.upper().replace("Z", "+00:00")).timestamp()


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


class RequestVerifier:
    """Checks a request signed with the shared secret: signature, then time, then nonce."""

    def __init__(self, secret: bytes, window_s: float, clock: Callable[[], float] = time.time):
        self._secret = secret
        self._window_s = window_s
        self._clock = clock
        self._replay = ReplayCache(window_s)

    def verify(self, topic: str, raw: dict[str, Any], *, sig: str | None, ts: str | None,
               nonce: str | None) -> None:
        """Raises Unauthorized unless ``raw`` (the request as received) is signed for ``topic``,
        recent and not seen before. ``ts`` must already be a valid RFC 3339 time when given."""
        if not sig:
            raise Unauthorized("missing signature")
        # Signature first: unsigned junk must not fill the nonce cache. Bytes, because
        # compare_digest refuses a str that is not ASCII.
        if not hmac.compare_digest(sig.lower().encode("utf-8"), signature(self._secret, topic, raw).encode("ascii")):
            raise Unauthorized("bad signature")
        if not ts:
            raise Unauthorized("missing ts")
        sent = parse_rfc3339(ts)
        now = self._clock()
        if abs(now - sent) > self._window_s:
            raise Unauthorized(f"stale request: ts is {now - sent:+.0f} s from the agent's clock")
        if not nonce:
            raise Unauthorized("missing nonce")
        refused = self._replay.check_and_add(nonce, now)
        if refused:
            raise Unauthorized(refused)
