"""The message envelope: the same JSON on MQTT and as the Kafka record value."""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

import uuid6
from pydantic import BaseModel, ConfigDict, Field

ENVELOPE_VERSION = 1
# The largest envelope the bridge forwards whole (its max_message_bytes default); the agent
# refuses a bigger one up front instead of letting the bridge dead-letter it.
MAX_MESSAGE_BYTES = 1_000_000

# The envelope's field rules, shared by the Envelope and by the Draft a producer hands in,
# so that whatever the outbox accepts is a valid envelope.
EventType = Annotated[str, Field(min_length=1, max_length=128)]
TraceId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
CameraId = Annotated[str, Field(max_length=128)]


def new_id() -> str:
    """A UUIDv7: time ordered, so ids sort roughly by creation."""
    return str(uuid6.uuid7())


def new_trace_id() -> str:
    return os.urandom(16).hex()


def iso_utc(ts: float) -> str:
    """A Unix time as RFC 3339 UTC with milliseconds, e.g. 2026-11-26T06:00:00.123Z."""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_now_iso() -> str:
    return iso_utc(time.time())


class Envelope(BaseModel):
    # Extra keys are tolerated on input so that a newer minor producer does not land in the DLQ.
    model_config = ConfigDict(extra="allow")

    v: Literal[1] = ENVELOPE_VERSION
    id: str = Field(min_length=1, max_length=64)
    device_id: str = Field(min_length=1, max_length=128)
    camera_id: CameraId | None = None
    seq: int = Field(ge=1)
    type: EventType
    ts: str
    trace_id: TraceId
    correlation_id: str | None = None
    data: dict[str, Any] = {}

    @property
    def kafka_key(self) -> str:
        return f"{self.device_id}/{self.camera_id}" if self.camera_id else self.device_id

    def kafka_headers(self) -> list[tuple[str, bytes]]:
        return [
            ("message-id", self.id.encode()),
            ("device-id", self.device_id.encode()),
            ("type", self.type.encode()),
            ("trace-id", self.trace_id.encode()),
            ("seq", str(self.seq).encode()),
        ]


def build(device_id: str, seq: int, type_: str, data: dict[str, Any], *, camera_id: str | None = None,
          trace_id: str | None = None, correlation_id: str | None = None) -> Envelope:
    return Envelope(id=new_id(), device_id=device_id, camera_id=camera_id, seq=seq, type=type_,
                    ts=utc_now_iso(), trace_id=trace_id or new_trace_id(),
                    correlation_id=correlation_id, data=data)


def encode(env: Envelope) -> bytes:
    return env.model_dump_json().encode()


class Draft(BaseModel):
    """What a producer hands to the outbox; the outbox stamps id, seq and ts when it stores it."""

    model_config = ConfigDict(extra="forbid")

    stream: str
    type: EventType
    data: dict[str, Any] = {}
    camera_id: CameraId | None = None
    trace_id: TraceId | None = None
    correlation_id: str | None = None
