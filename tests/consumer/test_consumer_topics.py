"""``edge-agent topics ensure`` against a private broker (the central topic names are fixed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from confluent_kafka.admin import AdminClient, ConfigResource

from edge_agent.consumer.config import DAY_MS, DLQ_RETENTION_MS


def ensure(tmp_path: Path, bootstrap: str, extra: dict | None = None) -> subprocess.CompletedProcess:
    cfg = tmp_path / "consumer.yaml"
    cfg.write_text(yaml.safe_dump({"kafka": {"bootstrap_servers": bootstrap}, "sink": {"handler": "x.y:z"},
                                   "central_topics": {"partitions": 3, "retention_ms": 259200000,
                                                      **(extra or {})}}))
    return subprocess.run([sys.executable, "-m", "edge_agent", "topics", "ensure", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=120)


def configs(bootstrap: str, topic: str) -> dict[str, str]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    r = ConfigResource("topic", topic)
    return {k: v.value for k, v in admin.describe_configs([r])[r].result(20).items()}


def test_ensure_creates_then_is_a_no_op_then_converges_a_change(kafka_factory, tmp_path: Path) -> None:
    broker = kafka_factory()
    first = ensure(tmp_path, broker.bootstrap)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout.splitlines()[-1])
    assert set(summary["changed"]) == {"camera.events", "ai.inference.results", "notifications", "audit.logs", "dlq"}
    dlq = configs(broker.bootstrap, "dlq")
    assert (dlq["retention.ms"], dlq["segment.ms"]) == (str(DLQ_RETENTION_MS), str(DAY_MS))
    assert configs(broker.bootstrap, "camera.events")["retention.ms"] == "259200000"
    topics = AdminClient({"bootstrap.servers": broker.bootstrap}).list_topics(timeout=10).topics
    assert len(topics["notifications"].partitions) == 3

    second = ensure(tmp_path, broker.bootstrap)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["changed"] == []  # one line: nothing to do

    third = ensure(tmp_path, broker.bootstrap, {"overrides": {"audit.logs": {"retention_ms": 2592000000}}})
    assert third.returncode == 0, third.stderr
    lines = [json.loads(line) for line in third.stdout.splitlines()]
    assert lines[0] == {"topic": "audit.logs", "set": {"retention.ms": "2592000000"}}
    assert lines[-1]["changed"] == ["audit.logs"]
    assert configs(broker.bootstrap, "audit.logs")["retention.ms"] == "2592000000"
    assert configs(broker.bootstrap, "dlq")["retention.ms"] == str(DLQ_RETENTION_MS)  # untouched


def test_fewer_partitions_than_exist_is_reported_not_applied(kafka_factory, tmp_path: Path) -> None:
    broker = kafka_factory()
    assert ensure(tmp_path, broker.bootstrap).returncode == 0
    shrink = ensure(tmp_path, broker.bootstrap, {"overrides": {"notifications": {"partitions": 1}}})
    assert shrink.returncode == 1
    assert "notifications: has 3 partitions, more than 1" in shrink.stderr
