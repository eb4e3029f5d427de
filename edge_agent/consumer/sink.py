"""What a sink is to the consumer loop: the item it is handed, and the three ways a write ends
besides success. The loop's rules follow from which one it gets:

- ``Poison`` (from ``prepare``): this record can never succeed; it goes to the dlq at once.
- ``SinkDown``: the sink is unreachable; nothing of the batch is known to be done, consumption
  pauses until the sink answers again. Never counts as an attempt (it must not flood the dlq).
- ``PartialFailure(done, error)``: ``items[:done]`` are committed, ``items[done]`` failed: with
  ``Poison`` it goes to the dlq, with ``SinkDown`` consumption pauses, with anything else it is
  retried with backoff while its partition is paused, then dead-lettered.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from edge_agent.common.envelope import Envelope


@dataclass(slots=True)
class Item:
    """One record with its envelope, on its way to the sink."""

    topic: str
    partition: int
    offset: int
    envelope: Envelope
    value: bytes
    prepared: Any = field(default=None)  # what the sink's prepare() made of it


class Poison(Exception):
    """The record can never succeed (``reason`` becomes its dlq-reason)."""

    def __init__(self, reason: str, error: str):
        super().__init__(error)
        self.reason = reason


class SinkDown(Exception):
    """The sink cannot be reached; nothing of the write is known to be committed."""


class PartialFailure(Exception):
    """``done`` items were committed; the next one failed with ``error``."""

    def __init__(self, done: int, error: BaseException):
        super().__init__(f"item {done} failed: {type(error).__name__}: {error}")
        self.done = done
        self.error = error


@dataclass(slots=True)
class WriteResult:
    applied: int  # records whose effect happened now
    duplicates: int  # records this group had processed before: no effect


class Sink(Protocol):
    def prepare(self, item: Item) -> None:
        """Check and convert one item; raise Poison when it can never be written."""

    def write(self, items: list[Item]) -> WriteResult:
        """Commit the effect of ``items``; raise SinkDown or PartialFailure."""

    def ping(self) -> None:
        """Raise SinkDown unless the sink answers."""

    def close(self) -> None: ...


def load_handler(name: str) -> Callable[[Envelope], Any]:
    """``package.module:function`` -> the function (ImportError/AttributeError name what is missing)."""
    module_name, _, attr = name.partition(":")
    fn = getattr(importlib.import_module(module_name), attr)
    if not callable(fn):
        raise TypeError(f"{name} is not callable")
    return fn


class HandlerSink:
    """A user function per record: at-least-once (it sees a record again after a crash or a retry).

    The function may raise ``Poison`` (dlq now) or ``SinkDown`` (pause); any other exception is a
    failure of that record, retried with backoff, then dead-lettered.
    """

    def __init__(self, fn: Callable[[Envelope], Any]):
        self.fn = fn

    def prepare(self, item: Item) -> None:
        pass

    def write(self, items: list[Item]) -> WriteResult:
        for done, item in enumerate(items):
            try:
                self.fn(item.envelope)
            except Exception as e:  # noqa: BLE001 - the user's code: any error is that record's
                raise PartialFailure(done, e) from e
        return WriteResult(applied=len(items), duplicates=0)

    def ping(self) -> None:
        pass

    def close(self) -> None:
        pass
