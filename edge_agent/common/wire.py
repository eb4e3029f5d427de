"""The DESIGN wire contract in one place: streams and their priority, MQTT topics, the end-to-end
ack's seq ranges, dead-letter header names, and the local publish request both daemons take."""

from __future__ import annotations

import json
from typing import Any, Iterable

from pydantic import BaseModel, ConfigDict, Field

from edge_agent.common.envelope import Draft

STREAMS: tuple[str, ...] = ("camera.events", "ai.inference.results", "notifications", "audit.logs")
# Lowest priority first: an overflowing outbox drops from the front of this list.
STREAM_PRIORITY: tuple[str, ...] = ("ai.inference.results", "camera.events", "notifications", "audit.logs")
AUDIT_STREAM = "audit.logs"

# Dead-letter headers (DESIGN "Envelope"), beside the record's own.
DLQ_REASON = "dlq-reason"
DLQ_ERROR = "dlq-error"
DLQ_SOURCE_TOPIC = "dlq-source-topic"
DLQ_ATTEMPTS = "dlq-attempts"
DLQ_FIRST_FAILED_AT = "dlq-first-failed-at"
DLQ_ORIGINAL_BYTES = "dlq-original-bytes"
DLQ_RETRIED_AT = "dlq-retried-at"
MAX_ACK_RANGE = 1_000_000  # an ack naming more seqs in one range than this is malformed


# --- MQTT topics (DESIGN "MQTT topics") ---------------------------------------------------------

def device_topic(prefix: str, device: str) -> str:
    """``<prefix>/<device>``: every topic of one device lies under it."""
    return f"{prefix}/{device}"


def uplink_topic(prefix: str, device: str, stream: str) -> str:
    return f"{prefix}/{device}/up/{stream}"


def ack_topic(prefix: str, device: str) -> str:
    return f"{prefix}/{device}/ack"


def status_topic(prefix: str, device: str) -> str:
    return f"{prefix}/{device}/status"


def command_base(prefix: str, device: str) -> str:
    """``<prefix>/<device>/cmd/``: a request's topic is this plus the command's name."""
    return f"{prefix}/{device}/cmd/"


def uplink_subscription(prefix: str, share_group: str) -> str:
    """The bridges' shared subscription to every device's uplink streams."""
    return f"$share/{share_group}/{prefix}/+/up/#"


# --- the end-to-end ack: {"seq": [[from, to], ...]} -------------------------------------------

def seq_ranges(seqs: Iterable[int]) -> list[list[int]]:
    """[1,2,3,7,8] -> [[1,3],[7,8]]."""
    out: list[list[int]] = []
    for s in sorted(set(seqs)):
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


def parse_uplink_topic(topic: str, prefix: str) -> tuple[str, str] | None:
    """``<prefix>/<device>/up/<stream>`` -> (device, stream); anything else -> None."""
    head = prefix + "/"
    if not topic.startswith(head):
        return None
    parts = topic[len(head):].split("/")
    if len(parts) != 3 or parts[1] != "up" or not parts[0] or not parts[2]:
        return None
    return parts[0], parts[2]


def encode_ack(ranges: list[list[int]]) -> bytes:
    return json.dumps({"seq": ranges}, separators=(",", ":")).encode()


def parse_ack(payload: bytes) -> list[tuple[int, int]]:
    """``{"seq": [[from, to], ...]}`` -> ranges; raises ValueError on anything else."""
    try:
        doc = json.loads(payload)
    except RecursionError:  # deeply nested junk: malformed like any other
        raise ValueError("ack nested too deeply") from None
    ranges = doc.get("seq") if isinstance(doc, dict) else None
    if not isinstance(ranges, list):
        raise ValueError("ack without a seq list")
    out = []
    for r in ranges:
        if (not isinstance(r, list) or len(r) != 2 or not all(type(x) is int for x in r)
                or r[0] > r[1] or r[0] < 1 or r[1] - r[0] > MAX_ACK_RANGE):
            raise ValueError(f"bad seq range {r!r}"[:200])
        out.append((r[0], r[1]))
    return out


# --- the local publish request (DESIGN "HTTP": the agent's and the bridge's) --------------------

class PublishRequest(BaseModel):
    """``POST /api/v1/queue/publish``: the same body on the agent and on the bridge."""

    model_config = ConfigDict(extra="forbid")

    topic: str = Field(description="an uplink stream: camera.events, ai.inference.results, notifications, audit.logs")
    message: dict[str, Any] = Field(description="becomes the envelope's data; its string `type`, `camera_id` and "
                                                "`trace_id` name the envelope's")
    key: str | None = Field(None, max_length=1024, description="Kafka record key (default: device/camera)")


def publish_draft(req: PublishRequest, correlation_id: str | None = None) -> Draft:
    """DESIGN: ``message`` becomes ``data``; its string ``type`` (else ``external``), ``camera_id`` and
    ``trace_id`` name the envelope's. Raises pydantic's ValidationError when one breaks the
    envelope's rules (a 200-character type, an upper-case trace id): the caller answers 4xx."""
    msg = req.message

    def text(name: str) -> str | None:
        value = msg.get(name)
        return value if isinstance(value, str) and value else None

    return Draft(stream=req.topic, type=text("type") or "external", data=msg, camera_id=text("camera_id"),
                 trace_id=text("trace_id"), correlation_id=correlation_id)
