"""The guarantee end to end: agent outbox -> Mosquitto -> bridge -> Kafka -> ack -> outbox empty.

Real processes on the real wire: ``edge-agent run`` and ``edge-agent bridge`` as children,
a private Mosquitto, and the Kafka-protocol broker (or EDGE_TEST_KAFKA's).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from edge_testkit.agent import AgentApi, publish_many, write_agent_config
from edge_testkit.kafka import create_topics
from edge_testkit.processes import free_port, wait_for
from edge_testkit.records import consume_all

pytestmark = pytest.mark.timeout(240)

STREAMS = ("camera.events", "ai.inference.results", "notifications", "audit.logs")


def write_bridge_config(tmp_path, broker, kafka, topics: dict[str, str], dlq: str) -> tuple:
    http_port = free_port()
    cfg = {
        "mqtt": {"host": broker.host, "port": broker.port, "client_id": f"e2e-{uuid.uuid4().hex[:6]}"},
        "kafka": {"bootstrap_servers": kafka.bootstrap},
        "topics": topics,
        "dlq": {"topic": dlq},
        "http": {"listen": f"127.0.0.1:{http_port}"},
        "log": {"level": "INFO"},
    }
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, http_port


@dataclass
class Deployment:
    """A bridge and an agent on one private Mosquitto, with Kafka topics of their own."""

    topics: dict[str, str]
    dlq: str
    bridge: Any
    agent_port: int
    api: AgentApi


def deploy_bridge_and_agent(tmp_path, mosquitto, kafka, agent_process, name: str) -> Deployment:
    if getattr(kafka, "sasl", False):
        pytest.skip("this test writes a PLAINTEXT bridge config")
    tag = uuid.uuid4().hex[:8]
    topics = {s: f"{name}-{tag}-{s}" for s in STREAMS}
    dlq = f"{name}-{tag}-dlq"
    create_topics(kafka, [*topics.values(), dlq])
    broker = mosquitto()
    bridge_cfg, bridge_port = write_bridge_config(tmp_path, broker, kafka, topics, dlq)
    bridge = agent_process(["bridge", "-c", str(bridge_cfg)])
    bridge.wait_listening("127.0.0.1", bridge_port, 30)
    agent_cfg, agent_port = write_agent_config(tmp_path, broker)
    agent = agent_process(["run", "-c", str(agent_cfg)])
    api = AgentApi(agent_port)
    api.wait_up(agent)
    return Deployment(topics, dlq, bridge, agent_port, api)


def test_outbox_empties_only_once_kafka_has_every_message(tmp_path, mosquitto, kafka, agent_process):
    d = deploy_bridge_and_agent(tmp_path, mosquitto, kafka, agent_process, "e2e")
    topics, bridge, api = d.topics, d.bridge, d.api
    ids = publish_many(api, "notifications", 0, 300)
    ids += publish_many(api, "audit.logs", 300, 50)
    wait_for(lambda: api.status()["outbox"]["depth"] == 0, 90,
             message=lambda: f"the bridge acked everything: {api.status()['outbox']}\n{bridge.output()[-2000:]}")

    notes = consume_all(kafka, topics["notifications"], 300, timeout=60)
    audits = consume_all(kafka, topics["audit.logs"], 50, timeout=60)
    got = {r.json()["id"] for r in notes + audits}
    assert got >= set(ids), f"{len(set(ids) - got)} acked messages are not in Kafka"
    rec = notes[0]
    env = rec.json()
    assert rec.key == b"gw-1", "no camera: the key is the device id"
    assert rec.headers["message-id"] == env["id"].encode()
    assert rec.headers["device-id"] == b"gw-1"
    assert rec.headers["seq"] == str(env["seq"]).encode()
    assert rec.headers["trace-id"] == env["trace_id"].encode()
    assert rec.headers["type"] == b"test.event"
    # agent.started went to camera.events and was acked too
    started = consume_all(kafka, topics["camera.events"], 1, timeout=30)
    assert any(r.json()["type"] == "agent.started" for r in started)
