"""Logging as JSON lines (one object per line, for journald and log shippers).

``trace_id`` and ``correlation_id`` given in ``extra=`` land as fields of their own.
"""

from __future__ import annotations

import json
import logging
import re
import sys

from edge_agent.common.envelope import iso_utc

# scheme://user:password@host -> scheme://***@host (camera URLs carry credentials).
# Bounded repeats: log text is untrusted and may be long, the scan stays linear.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]{0,31}://)[^/@\s]{1,512}@")
CLIP_CHARS = 200  # untrusted text (topics, device ids, errors) is cut to this in log lines


def mask_userinfo(text: str) -> str:
    """Every ``scheme://user:pass@`` in ``text`` with the user info replaced by ``***``."""
    return _USERINFO.sub(r"\g<scheme>***@", text) if "://" in text else text


def clip(text: object, limit: int = CLIP_CHARS) -> str:
    """Untrusted text made safe for one log line: at most ``limit`` characters, with the cut said."""
    s = text if isinstance(text, str) else repr(text)
    return s if len(s) <= limit else f"{s[:limit]}…(+{len(s) - limit} chars)"


_FIELDS = ("trace_id", "correlation_id", "device_id", "camera_id", "command", "seq", "stream", "topic")


class MaskedText(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return mask_userinfo(super().format(record))


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": iso_utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": mask_userinfo(record.getMessage()),
        }
        for name in _FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = clip(value) if isinstance(value, str) else value
        if record.exc_info:
            out["exc"] = mask_userinfo(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False, default=str)


def setup(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if fmt == "json" else
                         MaskedText("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # paho and urllib chatter stays out of INFO
    logging.getLogger("paho").setLevel(logging.WARNING)
