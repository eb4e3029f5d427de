"""systemd's ``EnvironmentFile=`` format, read as systemd reads it (systemd.exec(5)).

The units keep their secrets in such a file (``/etc/edge-agent/agent.env``); ``check-config
--env-file`` reads it so that the ``*_env`` variables the service will see are checked too.

``KEY=VALUE`` per line; blank lines, lines starting with ``#`` or ``;`` and lines without ``=``
are ignored. Around an unquoted value whitespace is dropped and a backslash keeps the next
character (at the end of a line it joins the next line). A single-quoted value is literal; a
double-quoted one knows the escapes ``\\" \\\\ \\$ \\``` and backslash-newline. Both may span lines.
"""

from __future__ import annotations

import re
from pathlib import Path

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BLANK = " \t\r"
_DOUBLE_QUOTE_ESCAPES = '"\\`$'


class _Reader:
    """A small state machine over the whole text, like systemd's own parser."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.env: dict[str, str] = {}

    def _next(self) -> str | None:
        if self.pos >= len(self.text):
            return None
        c = self.text[self.pos]
        self.pos += 1
        return c

    def read(self) -> dict[str, str]:
        while self.pos < len(self.text):
            c = self._next()
            if c is None or c in _BLANK or c == "\n":
                continue
            if c in "#;":
                self._skip_line()
            else:
                self._assignment(c)
        return self.env

    def _skip_line(self) -> None:
        end = self.text.find("\n", self.pos)
        self.pos = len(self.text) if end < 0 else end + 1

    def _assignment(self, first: str) -> None:
        key = first
        while (c := self._next()) not in (None, "\n", "="):
            key += c
        if c != "=":  # a line without "=": ignored
            return
        value = self._value()
        key = key.strip(_BLANK)
        if _NAME.fullmatch(key):  # systemd ignores (with a warning) what is not a variable name
            self.env[key] = value

    def _value(self) -> str:
        """From after ``=`` to the end of the assignment (quotes may carry it over several lines).

        Quotes count only where a value starts (or right after a quoted part, as in systemd):
        inside an unquoted value they are ordinary characters.
        """
        value, trailing_blank, at_start = "", 0, True
        while (c := self._next()) not in (None, "\n"):
            if at_start and c in _BLANK:
                continue
            if at_start and c in "'\"":
                value += self._until_quote(c, escapes=_DOUBLE_QUOTE_ESCAPES if c == '"' else "")
                continue
            at_start = False
            if c == "\\":
                escaped = self._next()
                if escaped not in (None, "\n"):  # backslash-newline continues the value
                    value, trailing_blank = value + escaped, 0
            else:
                value += c
                trailing_blank = trailing_blank + 1 if c in _BLANK else 0
        return value[:len(value) - trailing_blank]

    def _until_quote(self, quote: str, *, escapes: str) -> str:
        out = ""
        while (c := self._next()) not in (None, quote):
            if c == "\\" and quote == '"':
                escaped = self._next()
                if escaped is None or escaped == "\n":
                    continue
                out += escaped if escaped in escapes else "\\" + escaped
            else:
                out += c
        return out


def parse_env_file(text: str) -> dict[str, str]:
    """The variables an ``EnvironmentFile=`` with this text sets."""
    return _Reader(text).read()


def read_env_file(path: Path) -> dict[str, str]:
    """The variables the ``EnvironmentFile=`` at ``path`` sets; OSError when it cannot be read."""
    return parse_env_file(Path(path).read_text(encoding="utf-8"))
