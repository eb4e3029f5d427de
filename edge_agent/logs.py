"""Logging as JSON lines (one object per line, for journald and log shippers).

``trace_id`` and ``correlation_id`` given in ``extra=`` land as fields of their own.
"""

from __future__ import annotations

import json
import logging
import sys

from .envelope import iso_utc

_FIELDS = ("trace_id", "correlation_id", "device_id", "camera_id", "command", "seq", "stream", "topic")


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": iso_utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in _FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def setup(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # paho and urllib chatter stays out of INFO
    logging.getLogger("paho").setLevel(logging.WARNING)
