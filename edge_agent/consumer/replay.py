"""``edge-agent consume -c FILE --from TS [--to TS]``: re-read a time window and apply it again.

The window is found by timestamp (``offsets_for_times``) and bounded by the end offsets seen at
the start, so a replay ends even while devices keep producing. It reads by assignment under a
Kafka group of its own (it never takes partitions from the live group and commits nothing), and
applies records under the live group's name in ``processed``: what the live group already
applied is a no-op, so replaying a day twice leaves the database as it was. Records whose
timestamp lies outside the window are skipped (a broker may answer an earlier offset). An
``audit.logs`` record says who replayed what.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from confluent_kafka import Consumer, Message, TopicPartition

from edge_agent.common import logs
from edge_agent.common.config import ConfigError, print_problems
from edge_agent.common.wire import AUDIT_STREAM
from edge_agent.consumer.auditor import publish_audit, who
from edge_agent.consumer.config import ConsumerConfig
from edge_agent.consumer.daemon import load_or_exit, make_sink
from edge_agent.consumer.kafka import consumer_config
from edge_agent.consumer.loop import ConsumerLoop
from edge_agent.consumer.postgres import parse_ts
from edge_agent.consumer.sink import Sink

log = logging.getLogger(__name__)
METADATA_TIMEOUT_S = 15.0


def replay_group(cfg: ConsumerConfig, from_ms: int, to_ms: int) -> str:
    return f"{cfg.group}.replay.{from_ms}-{to_ms}.{uuid.uuid4().hex[:8]}"


class ReplayLoop(ConsumerLoop):
    """A ConsumerLoop over an assigned window that ends at the start's end offsets."""

    def __init__(self, cfg: ConsumerConfig, sink: Sink, stop: threading.Event, from_ms: int, to_ms: int):
        super().__init__(cfg, sink, stop)
        self.from_ms, self.to_ms = from_ms, to_ms
        self.group = replay_group(cfg, from_ms, to_ms)
        self.ends: dict[tuple[str, int], int] = {}
        self.starts: dict[tuple[str, int], int] = {}
        self.read = self.skipped = 0

    def kafka_consumer(self) -> Consumer:
        conf = {**consumer_config(self.cfg, self.group), "enable.auto.commit": False}
        return Consumer(conf, logger=log)

    def begin(self, consumer: Consumer) -> None:
        metadata = consumer.list_topics(timeout=METADATA_TIMEOUT_S)
        tps = [TopicPartition(t, p, self.from_ms) for t in self.cfg.topics if t in metadata.topics
               for p in metadata.topics[t].partitions]
        starts = consumer.offsets_for_times(tps, timeout=METADATA_TIMEOUT_S) if tps else []
        assign = []
        for tp in starts:
            _low, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition),
                                                        timeout=METADATA_TIMEOUT_S)
            start = tp.offset if tp.offset >= 0 else high  # -1: no record at or after from
            if start < high:
                self.starts[(tp.topic, tp.partition)] = start
                self.ends[(tp.topic, tp.partition)] = high
                assign.append(TopicPartition(tp.topic, tp.partition, start))
        consumer.assign(assign)
        publish_audit(self.producer, AUDIT_STREAM, self.cfg.group, "consumer.replay",
                      {"by": who(), "group": self.group, "effect_group": self.cfg.group, "topics": self.cfg.topics,
                       "from": _iso(self.from_ms), "to": _iso(self.to_ms),
                       "partitions": {f"{t}[{p}]": [self.starts[(t, p)], self.ends[(t, p)]] for t, p in self.ends}})
        log.info("replaying %s from %s to %s over %d partitions as %s", ", ".join(self.cfg.topics),
                 _iso(self.from_ms), _iso(self.to_ms), len(assign), self.group)

    def accept(self, records: list[Message]) -> list[Message]:
        keep = []
        for m in records:
            end = self.ends.get((m.topic(), m.partition()))
            if end is None or m.offset() >= end:
                continue  # produced after the replay began: the live group has it
            self.read += 1
            if self.from_ms <= m.timestamp()[1] <= self.to_ms:
                keep.append(m)
            else:
                self.skipped += 1
        return keep

    def handle(self, records: list[Message]) -> None:
        if records:
            super().handle(records)

    def store(self, offsets: list[TopicPartition]) -> None:
        pass  # a replay commits nothing: running it again reads the window again

    def finished(self) -> bool:
        consumer = self.consumer
        if consumer is None or self.paused_until or self.sink_state.down_since is not None:
            return False
        if not self.ends:
            return True
        positions = consumer.position([TopicPartition(t, p) for t, p in self.ends])
        return all(tp.offset >= self.ends[(tp.topic, tp.partition)] for tp in positions)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat().replace("+00:00", "Z")


def window(from_ts: str | None, to_ts: str | None) -> tuple[int, int]:
    """(from, to) in Unix milliseconds; ValueError naming the bad argument."""
    def ms(text: str, name: str) -> int:
        try:
            return int(parse_ts(text).timestamp() * 1000)
        except ValueError:
            raise ValueError(f"--{name}: not an RFC 3339 time: {text!r} (e.g. 2026-12-01T00:00:00Z)") from None
    start = ms(from_ts, "from") if from_ts else 0
    end = ms(to_ts, "to") if to_ts else int(time.time() * 1000)
    if start > end:
        raise ValueError("--from is after --to")
    return start, end


def replay_command(path: Path, from_ts: str | None, to_ts: str | None) -> int:
    """Replay the window to its end; print one JSON summary line; exit 0 (1 if stopped early)."""
    cfg = load_or_exit(path)
    if isinstance(cfg, int):
        return cfg
    try:
        from_ms, to_ms = window(from_ts, to_ts)
        sink = make_sink(cfg)
    except ValueError as e:
        print(f"edge-agent consume: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        return print_problems(e.problems)
    logs.setup(cfg.log.level, cfg.log.format)
    stop = threading.Event()
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    loop = ReplayLoop(cfg, sink, stop, from_ms, to_ms)
    try:
        loop.run()
    finally:
        sink.close()
    print(json.dumps({"group": loop.group, "from": _iso(from_ms), "to": _iso(to_ms), "read": loop.read,
                      "outside_window": loop.skipped, "stopped_early": stop.is_set()}))
    return 1 if stop.is_set() else 0
