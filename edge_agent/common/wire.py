"""The DESIGN wire contract in one place: streams and their priority, topics, ack ranges."""

from __future__ import annotations

from typing import Iterable

STREAMS: tuple[str, ...] = ("camera.events", "ai.inference.results", "notifications", "audit.logs")


# Lowest priority first: an overflowing outbox drops from the front of this list.
STREAM_PRIORITY: tuple[str, ...] = ("ai.inference.results", "camera.events", "notifications", "audit.logs")


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
