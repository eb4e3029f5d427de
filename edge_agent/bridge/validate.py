"""What one MQTT message is: a record for Kafka, or a dead letter with its reason.

Pure functions of the topic, the payload and the config: no client, no clock. The bridge's
loop calls ``classify`` for every message; the DLQ retry calls ``strict_envelope`` to refuse
letters that would only poison their topic again.
"""

from __future__ import annotations

from typing import NamedTuple

import pydantic_core
from pydantic import BaseModel, StrictInt, StrictStr, ValidationError

from edge_agent.bridge.config import BridgeConfig
from edge_agent.common import logs
from edge_agent.common.config import problem_lines
from edge_agent.common.envelope import Envelope
from edge_agent.common.wire import parse_uplink_topic

__all__ = ["Accepted", "NotStrictJson", "Rejected", "classify", "strict_envelope"]

# Topics are chosen by whoever may publish: a longer one is refused before it is parsed,
# cached or logged; the cache holds only topics that parse, and only this many.
MAX_TOPIC_CHARS = 512
TOPIC_CACHE_SIZE = 10_000
MAX_PROBLEMS = 5  # an invalid envelope's dlq-error names this many of its problems


class Accepted(NamedTuple):  # NamedTuples: built for every message, they cost least
    envelope: Envelope
    kafka_topic: str
    device: str


class Rejected(NamedTuple):
    reason: str  # invalid_json | invalid_envelope | device_mismatch | unmapped_topic | too_large | internal_error
    error: str
    device: str | None  # the topic's device, if the topic names one
    seq: int | None  # a seq that device may be waiting to see acked


def classify(topic: str, payload: bytes, cfg: BridgeConfig) -> Accepted | Rejected:
    """Decide what one MQTT message is: a record for Kafka or a dead letter (with its reason)."""
    if len(topic) > MAX_TOPIC_CHARS:
        return Rejected("unmapped_topic", f"topic of {len(topic)} characters > {MAX_TOPIC_CHARS}", None, None)
    parsed = _parse_cached(topic, cfg.mqtt.topic_prefix)
    device = parsed[0] if parsed else None
    if len(payload) > cfg.max_message_bytes:
        return Rejected("too_large", f"{len(payload)} bytes > max_message_bytes {cfg.max_message_bytes}",
                        device, _seq_of(payload, device))
    if parsed is None or parsed[1] not in cfg.topics:
        return Rejected("unmapped_topic", _unmapped(parsed, cfg), device, _seq_of(payload, device))
    try:
        env = strict_envelope(payload)
    except NotStrictJson as e:
        return Rejected("invalid_json", str(e), device, None)
    except ValidationError as e:
        return Rejected("invalid_envelope", "; ".join(problem_lines(e, root="(envelope)")[:MAX_PROBLEMS]), device,
                        _seq_of(payload, device))
    if env.device_id != device:
        # Spoofing or a misconfigured agent; its seq belongs to nobody we can ack.
        return Rejected("device_mismatch", f"payload device_id {env.device_id!r} != topic device {device!r}",
                        device, None)
    return Accepted(env, cfg.topics[parsed[1]], device)


class NotStrictJson(ValueError):
    """The payload is not strict JSON (RFC 8259): unparsable, too deep, or with NaN/Infinity."""


def strict_envelope(payload: bytes) -> Envelope:
    """The envelope in ``payload``, accepted only from strict JSON.

    Raises NotStrictJson, or ValidationError when the JSON is no envelope. Python's json
    and our parser take NaN and Infinity, which other consumers refuse: those are
    refused here (the ``in`` test keeps the common path at one scan of the bytes).
    """
    try:
        env = Envelope.model_validate_json(payload)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        if any(err["type"] == "json_invalid" for err in errors):
            raise NotStrictJson(errors[0]["msg"]) from None
        raise
    if b"NaN" in payload or b"Infinity" in payload:
        try:
            pydantic_core.from_json(payload, allow_inf_nan=False)
        except ValueError as e:
            raise NotStrictJson(str(e)) from None
    return env


def _unmapped(parsed: tuple[str, str] | None, cfg: BridgeConfig) -> str:
    # The topic itself is in the dlq-source-topic header and the log line's topic field.
    if parsed is None:
        return f"not a topic of the form {cfg.mqtt.topic_prefix}/<device>/up/<stream>"
    return f"no Kafka topic for stream {logs.clip(parsed[1])!r} (known streams: {', '.join(sorted(cfg.topics))})"


_TOPICS: dict[tuple[str, str], tuple[str, str]] = {}


def _parse_cached(topic: str, prefix: str) -> tuple[str, str] | None:
    """parse_uplink_topic, remembered: a fleet uses a few thousand topics over and over."""
    key = (topic, prefix)
    parsed = _TOPICS.get(key)
    if parsed is None:
        parsed = parse_uplink_topic(topic, prefix)
        if parsed is None:
            return None  # not cached: junk topics must not crowd out the fleet's
        if len(_TOPICS) >= TOPIC_CACHE_SIZE:
            _TOPICS.clear()
        _TOPICS[key] = parsed
    return parsed


class _SeqProbe(BaseModel):
    """The two fields that let a rejected payload's sender stop re-sending it."""

    device_id: StrictStr
    seq: StrictInt


def _seq_of(payload: bytes, device: str | None) -> int | None:
    """The seq of a rejected payload, when it is the topic device's own (so the device can stop re-sending).

    Parsed by pydantic's parser, which bounds nesting (json.loads raised RecursionError).
    """
    if device is None:
        return None
    try:
        probe = _SeqProbe.model_validate_json(payload)
    except ValidationError:
        return None
    return probe.seq if probe.device_id == device and probe.seq >= 1 else None
