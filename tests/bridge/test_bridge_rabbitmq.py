"""The bridge with a ``rabbitmq`` section, over the real wire (issue 15): Mosquitto, a private
``rabbitmq-server`` node (or ``EDGE_TEST_AMQP``), the bridge in-process or as ``edge-agent bridge``.

The guarantee is Kafka's: a device's message is acked (PUBACK, e2e ack) only once RabbitMQ
confirmed it; poison goes to ``dlq.queue`` with its reason; a killed bridge, a killed broker or
a memory alarm delays messages, never loses them. Each test has a vhost of its own.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_bridge_wire import bridge_config, bridge_process, metric, running, write_config

from edge_agent.bridge.config import BridgeConfig
from edge_agent.bridge.daemon import serve_http
from edge_agent.common.wire import STREAMS
from edge_testkit.processes import wait_for
from edge_testkit.rabbitmq import RabbitNode, connect, drain

pytestmark = pytest.mark.timeout(240)

QUEUES = {"camera.events": "camera.queue", "ai.inference.results": "ai.queue",
          "notifications": "notification.queue", "audit.logs": "audit.queue"}


@pytest.fixture
def vhost(rabbit: Any) -> str:
    if not isinstance(rabbit, RabbitNode):
        return rabbit.vhost
    name = f"v{uuid.uuid4().hex[:8]}"
    rabbit.add_vhost(name)
    return name


def rabbit_config(mqtt_broker: Any, rabbit: Any, vhost: str, **over: Any) -> BridgeConfig:
    cfg = bridge_config(mqtt_broker, "unused:9092", **over)  # its kafka section is dropped below
    data = cfg.model_dump(mode="json", exclude={"kafka"})
    data["topics"] = {s: s for s in STREAMS}  # the specified exchange names
    data["dlq"] = {"topic": "dlq"}
    data["rabbitmq"] = {"url": rabbit.url(vhost=vhost)}
    if getattr(rabbit, "external", False):
        data["rabbitmq"]["password_env"] = "EDGE_TEST_AMQP_PASSWORD"
    return BridgeConfig.model_validate(data)


def seqs_in(rabbit: Any, vhost: str, queue: str = "camera.queue") -> list[int]:
    return [int(props.headers["seq"]) for _m, props, _b in drain(rabbit, queue, vhost)]


def test_every_stream_reaches_its_queue_with_properties_and_is_acked_after_the_confirm(
        mqtt_broker: Any, rabbit: Any, vhost: str, device_factory: Any) -> None:
    cfg = rabbit_config(mqtt_broker, rabbit, vhost)
    with running(cfg) as bridge:
        assert bridge.health()["rabbitmq"]["connected"] or wait_for(
            lambda: bridge.health()["rabbitmq"]["connected"], 30, message="RabbitMQ connected")
        dev = device_factory(cfg)
        sent = {stream: dev.send(i + 1, stream) for i, stream in enumerate(QUEUES)}
        dev.wait_acked({1, 2, 3, 4}, timeout=30)
    for stream, env in sent.items():
        [(method, props, body)] = drain(rabbit, QUEUES[stream], vhost)
        assert json.loads(body)["id"] == env.id == props.message_id
        assert method.routing_key == f"{dev.device_id}.cam-1" and props.delivery_mode == 2
        assert props.content_type == "application/json" and props.correlation_id == env.trace_id
        assert props.headers["device-id"] == dev.device_id and props.headers["seq"] == str(env.seq)
        assert props.headers["type"] == env.type and props.headers["message-id"] == env.id


def test_poison_goes_to_dlq_queue_with_its_reason_and_good_messages_still_pass(
        mqtt_broker: Any, rabbit: Any, vhost: str, device_factory: Any) -> None:
    cfg = rabbit_config(mqtt_broker, rabbit, vhost)
    with running(cfg):
        dev = device_factory(cfg)
        dev.send_raw(dev.topic(), b"{not json")
        dev.send_raw(dev.topic("no.such.stream"), b"{}")
        dev.send(1)
        dev.wait_acked({1}, timeout=30)
        wait_for(lambda: (rabbit.queue_depths(vhost).get("dlq.queue", 0) if isinstance(rabbit, RabbitNode)
                          else 2) >= 2, 30, message="two dead letters")
    letters = drain(rabbit, "dlq.queue", vhost)
    assert sorted(props.headers["dlq-reason"] for _m, props, _b in letters) == ["invalid_json", "unmapped_topic"]
    assert all(props.headers["dlq-source-topic"].startswith(cfg.mqtt.topic_prefix) for _m, props, _b in letters)
    assert seqs_in(rabbit, vhost) == [1]


def test_unroutable_messages_are_retried_then_dead_lettered_and_the_api_retries_them(
        mqtt_broker: Any, rabbit: Any, vhost: str, device_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T_RMQ_ADMIN", "rmq-admin")
    cfg = rabbit_config(mqtt_broker, rabbit, vhost, retry={"max_attempts": 2, "delay_s": 0.05, "backoff": "linear"},
                        http={"tokens": [{"token_env": "T_RMQ_ADMIN", "role": "admin"}]})
    with running(cfg) as bridge:
        wait_for(lambda: bridge.health()["rabbitmq"]["connected"], 30, message="RabbitMQ connected")
        admin_conn = connect(rabbit, vhost)
        admin_conn.channel().queue_unbind("camera.queue", "camera.events", "#")
        dev = device_factory(cfg)
        dev.send(1)
        dev.wait_acked({1}, timeout=30)  # acked once its dead letter is confirmed
        admin_conn.channel().queue_bind("camera.queue", "camera.events", "#")
        admin_conn.close()
        stop_http = serve_http(bridge)
        try:
            base, auth = f"http://127.0.0.1:{cfg.http.host_port[1]}", {"Authorization": "Bearer rmq-admin"}
            [status] = httpx.get(f"{base}/api/v1/queue/status", params={"topic": "camera.events"},
                                 headers=auth, timeout=10).json()
            assert (status["topic"], status["lag"], status["dlqSize"]) == ("camera.events", 0, 1)
            answer = httpx.post(f"{base}/api/v1/queue/dlq/retry", json={"topic": "camera.events"},
                                headers=auth, timeout=30).json()
            assert answer["retried"] == 1 and answer["errors"] == 0
            assert httpx.get(f"{base}/api/v1/queue/status", headers=auth, timeout=10).json()[0]["dlqSize"] == 0
        finally:
            stop_http()
    [(_m, props, _b)] = drain(rabbit, "camera.queue", vhost)
    assert props.headers["dlq-reason"] == "retries_exhausted" and "dlq-retried-at" in props.headers


def test_memory_alarm_holds_the_acks_and_nothing_is_lost_when_it_clears(
        mqtt_broker: Any, rabbit: Any, vhost: str, device_factory: Any) -> None:
    if not isinstance(rabbit, RabbitNode):
        pytest.skip("EDGE_TEST_AMQP: cannot raise an alarm there")
    cfg = rabbit_config(mqtt_broker, rabbit, vhost)
    with running(cfg) as bridge:
        dev = device_factory(cfg)
        dev.send(1)
        dev.wait_acked({1}, timeout=30)
        rabbit.set_memory_alarm(True)
        try:
            for seq in range(2, 52):
                dev.send(seq)
            wait_for(lambda: bridge.health()["rabbitmq"]["blocked"], 30, message="connection blocked")
            wait_for(lambda: metric("edge_bridge_broker_up", broker="rabbitmq") == 0, 10, message="broker_up 0")
            dev.wait_published(15)  # Mosquitto has them; the bridge must not ack them yet
            assert dev.acked_now() == {1}, "acked while RabbitMQ was blocking publishes"
        finally:
            rabbit.set_memory_alarm(False)
        dev.wait_acked(set(range(1, 52)), timeout=60)
        assert metric("edge_bridge_broker_up", broker="rabbitmq") == 1
    assert sorted(set(seqs_in(rabbit, vhost))) == list(range(1, 52))


def test_rabbitmq_killed_and_restarted_mid_stream_loses_nothing(
        mqtt_broker: Any, rabbit: Any, vhost: str, device_factory: Any) -> None:
    if not isinstance(rabbit, RabbitNode):
        pytest.skip("EDGE_TEST_AMQP: cannot kill it")
    cfg = rabbit_config(mqtt_broker, rabbit, vhost)
    with running(cfg) as bridge:
        dev = device_factory(cfg)
        for seq in range(1, 1001):
            dev.send(seq)
            if seq == 300:
                rabbit.kill()
        wait_for(lambda: not bridge.health()["rabbitmq"]["connected"], 30, message="bridge saw RabbitMQ go")
        rabbit.start()
        dev.wait_acked(set(range(1, 1001)), timeout=120, resend_after_s=5)
    stored = seqs_in(rabbit, vhost)
    assert set(stored) == set(range(1, 1001)), f"lost: {sorted(set(range(1, 1001)) - set(stored))[:10]}"


def test_bridge_killed_mid_stream_with_a_resending_device_loses_nothing(
        mqtt_broker: Any, rabbit: Any, vhost: str, device_factory: Any, agent_process: Any, tmp_path: Path) -> None:
    cfg = rabbit_config(mqtt_broker, rabbit, vhost)
    path = write_config(cfg, tmp_path / "bridge.yaml")
    proc = bridge_process(agent_process, path)
    dev = device_factory(cfg)
    for seq in range(1, 2001):
        dev.send(seq)
        if seq == 800:
            proc.kill()
    bridge_process(agent_process, path)  # the same persistent session: Mosquitto kept the rest
    dev.wait_acked(set(range(1, 2001)), timeout=120, resend_after_s=5)
    stored = seqs_in(rabbit, vhost)
    assert set(stored) == set(range(1, 2001))
    duplicates = len(stored) - len(set(stored))
    assert duplicates >= 0  # allowed (at least once); the count is what the bridge's dedupe left
    print(f"duplicates after kill -9: {duplicates}")


def test_tls_with_client_certificate_and_password_from_env(
        mqtt_broker: Any, rabbit: Any, device_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    if not isinstance(rabbit, RabbitNode) or rabbit.pki is None:
        pytest.skip("needs the private node's TLS listener")
    vhost = f"v{uuid.uuid4().hex[:8]}"
    rabbit.add_vhost(vhost)
    rabbit.add_user(f"u{vhost}", "tls-secret", vhost)
    monkeypatch.setenv("T_RMQ_PW", "tls-secret")
    cert, key = rabbit.pki.client_cert("edge-bridge")
    cfg = rabbit_config(mqtt_broker, rabbit, vhost)
    data = cfg.model_dump(mode="json", exclude={"kafka"})
    data["rabbitmq"] = {"url": rabbit.url(user=f"u{vhost}", tls=True, vhost=vhost), "password_env": "T_RMQ_PW",
                        "tls": {"ca": str(rabbit.pki.ca_path), "cert": str(cert), "key": str(key)}}
    cfg = BridgeConfig.model_validate(data)
    with running(cfg):
        dev = device_factory(cfg)
        dev.send(1)
        dev.wait_acked({1}, timeout=30)
    assert seqs_in(rabbit, vhost) == [1]
