"""``edge-agent topics ensure``: the central topics with their partitions, replication and
retention; existing topics converge by incremental config changes (only the keys we own are
touched, an operator's other settings stay), and partitions only grow (Kafka cannot shrink them).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewPartitions,
    NewTopic,
)

from edge_agent.bridge.kafka import kafka_client_config
from edge_agent.common.config import ConfigError, print_problems
from edge_agent.common.wire import STREAMS
from edge_agent.consumer.config import ConsumerConfig, load_consumer

log = logging.getLogger(__name__)
TIMEOUT_S = 30.0


@dataclass
class TopicPlan:
    topic: str
    create: dict[str, Any] | None = None  # partitions, replication_factor, configs
    add_partitions: int | None = None  # the new total
    set_configs: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def changes(self) -> bool:
        return bool(self.create or self.add_partitions or self.set_configs)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"topic": self.topic}
        if self.create:
            out["create"] = self.create
        if self.add_partitions:
            out["partitions"] = self.add_partitions
        if self.set_configs:
            out["set"] = self.set_configs
        if self.problems:
            out["problems"] = self.problems
        return out


def central_topics(cfg: ConsumerConfig) -> list[str]:
    """The uplink streams, the dlq, and any other topic the consumer reads or the file configures."""
    names = [*STREAMS, cfg.dlq.topic, *cfg.topics, *cfg.central_topics.overrides]
    return list(dict.fromkeys(names))


def wanted(cfg: ConsumerConfig, topic: str) -> tuple[int, int, dict[str, str]]:
    s = cfg.central_topics.settings(topic, dlq=topic == cfg.dlq.topic)
    configs = {k: str(v) for k, v in s.items() if "." in k}
    return s["partitions"], s["replication_factor"], configs


def plan(admin: AdminClient, cfg: ConsumerConfig) -> list[TopicPlan]:
    metadata = admin.list_topics(timeout=TIMEOUT_S)
    names = central_topics(cfg)
    existing = [t for t in names if t in metadata.topics and metadata.topics[t].error is None]
    current = _current_configs(admin, existing)
    plans = []
    for topic in names:
        partitions, replication, configs = wanted(cfg, topic)
        p = TopicPlan(topic)
        if topic not in existing:
            p.create = {"partitions": partitions, "replication_factor": replication, "configs": configs}
        else:
            have = len(metadata.topics[topic].partitions)
            if have < partitions:
                p.add_partitions = partitions
            elif have > partitions:
                p.problems.append(f"has {have} partitions, more than {partitions}: Kafka cannot remove partitions")
            p.set_configs = {k: v for k, v in configs.items() if current[topic].get(k) != v}
        plans.append(p)
    return plans


def _current_configs(admin: AdminClient, topics: list[str]) -> dict[str, dict[str, str]]:
    if not topics:
        return {}
    resources = [ConfigResource("topic", t) for t in topics]
    futures = admin.describe_configs(resources, request_timeout=TIMEOUT_S)
    return {r.name: {k: e.value for k, e in futures[r].result(TIMEOUT_S).items()} for r in resources}


def apply(admin: AdminClient, plans: list[TopicPlan]) -> list[str]:
    """Carry out the plans; problem lines (empty when all went through)."""
    problems = [f"{p.topic}: {text}" for p in plans for text in p.problems]
    new = [NewTopic(p.topic, num_partitions=p.create["partitions"], replication_factor=p.create["replication_factor"],
                    config=p.create["configs"]) for p in plans if p.create]
    grow = [NewPartitions(p.topic, p.add_partitions) for p in plans if p.add_partitions]
    alter = [ConfigResource("topic", p.topic, incremental_configs=[
        ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in p.set_configs.items()])
        for p in plans if p.set_configs]
    calls = [(admin.create_topics, new, "create"), (admin.create_partitions, grow, "add partitions"),
             (admin.incremental_alter_configs, alter, "set configs")]
    for call, items, what in calls:
        if not items:
            continue
        for key, fut in call(items, request_timeout=TIMEOUT_S).items():
            name = key.name if isinstance(key, ConfigResource) else key
            try:
                fut.result(TIMEOUT_S)
            except KafkaException as e:
                problems.append(f"{name}: cannot {what}: {e.args[0].str() if e.args else e}")
    return problems


def ensure(client_config: dict[str, Any], cfg: ConsumerConfig, *, dry_run: bool = False) -> tuple[list[TopicPlan], list[str]]:
    admin = AdminClient(client_config)
    plans = plan(admin, cfg)
    problems = [] if dry_run else apply(admin, plans)
    if dry_run:
        problems = [f"{p.topic}: {text}" for p in plans for text in p.problems]
    return plans, problems


def ensure_command(path: Path, *, dry_run: bool = False) -> int:
    """Print one JSON line per topic that changes (or would), then a summary; exit 1 on a problem."""
    try:
        cfg = load_consumer(path)
        client = kafka_client_config(cfg.kafka)
    except ConfigError as e:
        return print_problems(e.problems)
    try:
        plans, problems = ensure(client, cfg, dry_run=dry_run)
    except KafkaException as e:
        print(f"topics ensure: Kafka: {e}", file=sys.stderr)
        return 1
    for p in plans:
        if p.changes or p.problems:
            print(json.dumps(p.describe()))
    for line in problems:
        print(line, file=sys.stderr)
    changed = [p.topic for p in plans if p.changes]
    print(json.dumps({"changed": changed, "unchanged": [p.topic for p in plans if not p.changes],
                      "dry_run": dry_run, "problems": len(problems)}))
    return 1 if problems else 0
