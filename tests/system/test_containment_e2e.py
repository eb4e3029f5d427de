"""Fault containment end to end: bad local publishes fail alone, every good one reaches Kafka.

Real processes on the real wire: ``edge-agent run`` and ``edge-agent bridge`` as children, a
private Mosquitto and the Kafka-protocol broker. Eight local producers publish at once; one of
them sends only bad requests. Each bad one gets its 4xx, no good one fails, and every good one
is in Kafka once the outbox has emptied (so the bridge acked it end to end).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from test_e2e import deploy_bridge_and_agent

from edge_testkit.agent import AgentApi
from edge_testkit.processes import wait_for
from edge_testkit.records import consume_all

pytestmark = pytest.mark.timeout(240)

GOOD_PER_CLIENT = 60
GOOD_CLIENTS = 7

# (what is wrong, request body, the status it must get)
BAD_REQUESTS: list[tuple[str, bytes, int]] = [
    ("type over 128 characters",
     json.dumps({"topic": "notifications", "message": {"type": "t" * 200}}).encode(), 400),
    ("upper-case trace_id",
     json.dumps({"topic": "notifications", "message": {"type": "x", "trace_id": "A" * 32}}).encode(), 400),
    ("camera_id over 128 characters",
     json.dumps({"topic": "camera.events", "message": {"camera_id": "c" * 300}}).encode(), 400),
    ("envelope over the bridge's limit",
     json.dumps({"topic": "notifications", "message": {"blob": "b" * 999_900}}).encode(), 413),
    ("not JSON", b"{\"topic\": ", 400),
    ("deeply nested message",
     b'{"topic": "notifications", "message": ' + b'{"a":' * 3000 + b"1" + b"}" * 3001, 400),
    ("unknown stream", json.dumps({"topic": "nope", "message": {}}).encode(), 400),
]


def _good(api: AgentApi, client: int) -> list[str]:
    ids = []
    for i in range(GOOD_PER_CLIENT):
        r = api.publish("notifications", {"type": "good.event", "client": client, "i": i})
        assert r.status_code == 200, f"a good publish failed beside bad ones: {r.status_code} {r.text}"
        ids.append(r.json()["messageId"])
    return ids


def _bad(port: int, rounds: int) -> list[tuple[str, int, int]]:
    """Sends every bad request ``rounds`` times; returns (what, expected, got) for each answer."""
    answers = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        for _ in range(rounds):
            for what, body, expected in BAD_REQUESTS:
                r = http.post("/api/v1/queue/publish", content=body,
                              headers={"Content-Type": "application/json"})
                answers.append((what, expected, r.status_code))
    return answers


def test_concurrent_good_and_bad_local_publishes_every_good_one_reaches_kafka(
        tmp_path: Any, mosquitto: Any, kafka: Any, agent_process: Any) -> None:
    d = deploy_bridge_and_agent(tmp_path, mosquitto, kafka, agent_process, "contain")
    topics, dlq, bridge, api, agent_port = d.topics, d.dlq, d.bridge, d.api, d.agent_port

    with ThreadPoolExecutor(GOOD_CLIENTS + 1) as pool:
        bad = pool.submit(_bad, agent_port, 6)
        goods = [pool.submit(_good, api, c) for c in range(GOOD_CLIENTS)]
        good_ids = [i for f in goods for i in f.result()]
        answers = bad.result()

    wrong = [a for a in answers if a[1] != a[2]]
    assert not wrong, f"bad requests got the wrong answer (what, expected, got): {wrong}"
    assert len(good_ids) == GOOD_CLIENTS * GOOD_PER_CLIENT
    wait_for(lambda: api.status()["outbox"]["depth"] == 0, 90,
             message=lambda: f"the bridge acked everything: {api.status()['outbox']}\n{bridge.output()[-2000:]}")
    records = consume_all(kafka, topics["notifications"], len(good_ids), timeout=60)
    got = {r.json()["id"] for r in records}
    assert got >= set(good_ids), f"{len(set(good_ids) - got)} good publishes are not in Kafka"
    assert not consume_all(kafka, dlq, 1, timeout=3), "nothing the agent accepted may be dead-lettered"
    health = httpx.get(f"http://127.0.0.1:{agent_port}/healthz", timeout=5)
    assert health.status_code == 200, health.text
