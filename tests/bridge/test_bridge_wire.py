"""The bridge over the real wire: real Mosquitto, real Kafka protocol (Tansu or EDGE_TEST_KAFKA).

A small paho "device" plays the agent's side: it publishes envelopes, listens to
its ack topic and, where a test says so, re-sends what stays unacked.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
import yaml
from prometheus_client import REGISTRY

from edge_agent.bridge.config import BridgeConfig
from edge_agent.bridge.daemon import run_bridge
from edge_agent.bridge.worker import Bridge
from edge_agent.common.envelope import Envelope, build, encode
from edge_agent.common.wire import STREAMS
from edge_testkit.kafka import ExternalKafka, TansuBroker, client_config
from edge_testkit.processes import free_port, wait_for
from edge_testkit.records import consume_all, read_topic

pytestmark = pytest.mark.timeout(180)


# --- helpers -----------------------------------------------------------------------------------

def kafka_section(kafka: Any) -> dict[str, Any]:
    """The bridge config's ``kafka`` section for a test broker (plain, TLS or an external SASL Kafka)."""
    conf = client_config(kafka)
    out: dict[str, Any] = {"bootstrap_servers": conf["bootstrap.servers"]}
    if "security.protocol" in conf:
        out["security_protocol"] = conf["security.protocol"]
    if "sasl.mechanism" in conf:
        out["sasl"] = {"mechanism": conf["sasl.mechanism"], "username": conf["sasl.username"],
                       "password_env": "EDGE_TEST_KAFKA_PASSWORD"}
    if "ssl.ca.location" in conf:
        out["ssl"] = {"ca": conf["ssl.ca.location"]}
    return out


def bridge_config(mqtt_broker: Any, kafka: Any, **over: Any) -> BridgeConfig:
    """Unique prefix, share group and topics per test: safe on shared (external) brokers."""
    tag = uuid.uuid4().hex[:8]
    data: dict[str, Any] = {
        "mqtt": {"host": mqtt_broker.host, "port": mqtt_broker.port, "topic_prefix": f"t{tag}",
                 "share_group": f"g{tag}", "client_id": f"bridge-{tag}"},
        "kafka": kafka_section(kafka),
        "topics": {s: f"{tag}.{s}" for s in STREAMS},
        "dlq": {"topic": f"{tag}.dlq"},
        "http": {"listen": f"127.0.0.1:{free_port()}"},
        "ack_interval_ms": 20,
        "stall_timeout_s": 3,
        "log": {"level": "INFO", "format": "text"},
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return BridgeConfig.model_validate(data)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@contextmanager
def running(cfg: BridgeConfig) -> Iterator[Bridge]:
    bridge = Bridge(cfg)
    bridge.start()
    try:
        wait_for(lambda: bridge.health()["mqtt"]["connected"], 15, message="bridge connected to MQTT")
        yield bridge
    finally:
        bridge.stop(timeout=15)


class Device:
    """The agent's side of the contract, in a few lines of paho: publish envelopes, collect e2e acks."""

    def __init__(self, cfg: BridgeConfig, device_id: str = "gw-1", *, port: int | None = None,
                 auth: tuple[str, str] | None = None):
        self.prefix = cfg.mqtt.topic_prefix
        self.device_id = device_id
        self.acked: set[int] = set()
        self.ack_messages: list[dict[str, Any]] = []
        self.sent: dict[int, tuple[str, bytes, float]] = {}  # seq -> (topic, payload, last sent)
        self.unconfirmed: list[mqtt.MQTTMessageInfo] = []
        self._lock = threading.Lock()
        self.subacks = 0  # one per (re)connection: on_connect subscribes to the ack topic
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"dev-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(1000)
        self.client.on_message = self._on_ack
        self.client.on_subscribe = lambda *_: setattr(self, "subacks", self.subacks + 1)
        self.client.on_connect = lambda c, *_: c.subscribe(f"{self.prefix}/{device_id}/ack", qos=1)
        if auth is not None:
            self.client.username_pw_set(*auth)
        self.client.connect(cfg.mqtt.host, port or cfg.mqtt.port)
        self.client.loop_start()
        wait_for(lambda: self.subacks, 10, message="device subscribed to its ack topic")

    def _on_ack(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        body = json.loads(msg.payload)
        with self._lock:
            self.ack_messages.append(body)
            for lo, hi in body["seq"]:
                self.acked.update(range(lo, hi + 1))

    def topic(self, stream: str = "camera.events") -> str:
        return f"{self.prefix}/{self.device_id}/up/{stream}"

    def send(self, seq: int, stream: str = "camera.events", camera: str | None = "cam-1") -> Envelope:
        env = build(self.device_id, seq, "camera.online", {"n": seq}, camera_id=camera)
        self.send_raw(self.topic(stream), encode(env), seq)
        return env

    def send_raw(self, topic: str, payload: bytes, seq: int | None = None) -> None:
        if seq is not None:
            with self._lock:
                self.sent[seq] = (topic, payload, time.monotonic())
        self.unconfirmed.append(self.client.publish(topic, payload, qos=1))

    def wait_published(self, timeout: float) -> None:
        """Every publish so far has its PUBACK from the broker (it holds them now)."""
        wait_for(lambda: all(info.is_published() for info in self.unconfirmed), timeout,
                 message="PUBACKs from the broker")
        self.unconfirmed.clear()

    def resend_unacked(self, older_than_s: float) -> int:
        """What the agent's outbox does: send again whatever stays unacked too long."""
        now = time.monotonic()
        with self._lock:
            due = [(s, t, p) for s, (t, p, at) in self.sent.items() if s not in self.acked and now - at > older_than_s]
        for seq, topic, payload in due:
            self.send_raw(topic, payload, seq)
        return len(due)

    def acked_now(self) -> set[int]:
        with self._lock:
            return set(self.acked)

    def wait_acked(self, seqs: set[int], timeout: float, resend_after_s: float | None = None) -> None:
        def done() -> bool:
            if resend_after_s is not None:
                self.resend_unacked(resend_after_s)
            return seqs <= self.acked_now()
        wait_for(done, timeout, interval=0.05,
                 message=lambda: f"acks for {len(seqs)} seqs (missing {len(seqs - self.acked_now())})")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def seqs_of(records: list[Any]) -> list[int]:
    return [int(r.headers["seq"]) for r in records]


def seqs_in_kafka(kafka: Any, topic: str, want: set[int], timeout: float = 60) -> set[int]:
    """The seqs in ``topic`` once they include ``want`` (bounded). Reads the whole topic each time:
    with duplicates in it, the first N records need not hold N distinct seqs."""
    found: set[int] = set()

    def covered() -> bool:
        found.clear()
        found.update(seqs_of(read_topic(kafka, topic, idle_s=0.3, timeout=timeout)))
        return want <= found
    wait_for(covered, timeout, interval=0.2, message=lambda: f"{len(want - found)} of {len(want)} seqs in {topic}")
    return found


def write_config(cfg: BridgeConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def bridge_process(agent_process: Any, path: Path) -> Any:
    """``edge-agent bridge -c PATH`` as a child, once it reads MQTT and answers HTTP."""
    proc = agent_process(["bridge", "-c", str(path)])
    proc.wait_for_output("MQTT connected", 60)
    proc.wait_for_output("HTTP API listening", 60)
    return proc


# --- the happy path ----------------------------------------------------------------------------

def test_thousands_of_envelopes_reach_kafka_with_key_and_headers_and_every_seq_is_acked(
        mqtt_broker: Any, kafka: Any, device_factory: Any) -> None:
    cfg = bridge_config(mqtt_broker, kafka)
    n = 3000
    with running(cfg) as bridge:
        dev = device_factory(cfg)
        sent: dict[int, Envelope] = {}
        for seq in range(1, n + 1):
            stream = "camera.events" if seq % 3 else "ai.inference.results"
            sent[seq] = dev.send(seq, stream, camera="cam-a" if seq % 2 else None)
        # Resend like the agent does: on a loaded machine Mosquitto may drop what exceeds its
        # queue for the bridge (max_queued_messages, 1000 by default) before the bridge reads it.
        dev.wait_acked(set(range(1, n + 1)), timeout=90, resend_after_s=15)
        assert wait_for(lambda: bridge.health()["inflight"] == 0, 10, message="nothing left in flight")
        assert bridge.health()["kafka"]["connected"] is True

    events = consume_all(kafka, cfg.topics["camera.events"], expect_n=n - n // 3, timeout=60)
    results = consume_all(kafka, cfg.topics["ai.inference.results"], expect_n=n // 3, timeout=60)
    assert sorted(seqs_of(events)) == [s for s in range(1, n + 1) if s % 3]
    assert sorted(seqs_of(results)) == [s for s in range(1, n + 1) if not s % 3]
    for rec in events + results:
        env = sent[int(rec.headers["seq"])]
        assert rec.key == env.kafka_key.encode()  # gw-1/cam-a, or gw-1 without a camera
        assert rec.headers == {"message-id": env.id.encode(), "device-id": b"gw-1", "type": b"camera.online",
                               "trace-id": env.trace_id.encode(), "seq": str(env.seq).encode()}
        assert Envelope.model_validate_json(rec.value) == env  # the value is the envelope, unchanged
    # acks come as merged ranges, batched: far fewer ack messages than seqs
    assert len(dev.ack_messages) < n / 5


# --- dead letters ------------------------------------------------------------------------------

def test_each_kind_of_poison_lands_in_the_dlq_with_its_reason_and_is_acked(
        mqtt_broker: Any, kafka: Any, device_factory: Any) -> None:
    cfg = bridge_config(mqtt_broker, kafka, max_message_bytes=4000)
    received_before = metric("edge_bridge_received_total")
    with running(cfg):
        dev = device_factory(cfg)
        good = json.loads(encode(build("gw-1", 1, "camera.online", {})))
        poison = {
            "invalid_json": (dev.topic(), b"{this is not json", None),
            "invalid_envelope": (dev.topic(), json.dumps({**good, "seq": 11, "v": 9}).encode(), 11),
            "device_mismatch": (dev.topic(), json.dumps({**good, "seq": 12, "device_id": "gw-evil"}).encode(), None),
            "unmapped_topic": (dev.topic("no.such.stream"), json.dumps({**good, "seq": 13}).encode(), 13),
            "too_large": (dev.topic(), json.dumps({**good, "seq": 14, "data": {"x": "y" * 5000}}).encode(), 14),
        }
        for reason, (topic, payload, seq) in poison.items():
            dev.send_raw(topic, payload, seq)
        dev.send(1)  # a good one after the poison: the bridge is not stuck
        dev.wait_acked({1, 11, 13, 14}, timeout=30)

        dlq = consume_all(kafka, cfg.dlq.topic, expect_n=len(poison), timeout=30)
        by_reason = {r.headers["dlq-reason"].decode(): r for r in dlq}
        assert sorted(by_reason) == sorted(poison)
        for reason, (topic, payload, _seq) in poison.items():
            rec = by_reason[reason]
            assert rec.headers["dlq-source-topic"] == topic.encode()
            assert rec.headers["dlq-error"]
            assert rec.headers["dlq-attempts"] == b"0"
            assert rec.headers["dlq-first-failed-at"].endswith(b"Z")
            assert rec.value == payload  # the original is kept (all of it: < 64 KiB)
        assert by_reason["too_large"].headers["dlq-original-bytes"] == str(len(poison["too_large"][1])).encode()
        assert dev.acked_now().isdisjoint({12})  # a spoofed seq is acked to nobody
    assert metric("edge_bridge_received_total") - received_before == len(poison) + 1

    # Every poison message was PUBACKed: a new bridge on the same persistent session gets none of them
    # again. The broker re-sends unacked messages first, so once the sentinel is through, none came.
    received_before = metric("edge_bridge_received_total")
    with running(cfg):
        dev.send(2)
        dev.wait_acked({2}, timeout=30)
    assert metric("edge_bridge_received_total") - received_before == 1


def test_a_record_kafka_refuses_for_good_goes_to_the_dlq_with_its_headers(
        mqtt_broker: Any, kafka: Any, device_factory: Any) -> None:
    cfg = bridge_config(mqtt_broker, kafka)
    cfg.topics["notifications"] = "not a valid topic!"  # the broker answers TOPIC_EXCEPTION
    rejected_before = metric("edge_bridge_dlq_total", reason="rejected")
    with running(cfg):
        dev = device_factory(cfg)
        env = dev.send(5, "notifications")
        dev.wait_acked({5}, timeout=30)
    [rec] = consume_all(kafka, cfg.dlq.topic, expect_n=1, timeout=30)
    assert rec.headers["dlq-reason"] == b"rejected"
    assert rec.headers["dlq-source-topic"] == dev.topic("notifications").encode()
    assert rec.headers["dlq-attempts"] == b"1"
    assert rec.headers["message-id"] == env.id.encode() and rec.key == b"gw-1/cam-1"
    assert metric("edge_bridge_dlq_total", reason="rejected") - rejected_before == 1


# --- dedupe --------------------------------------------------------------------------------------

def test_recent_duplicates_are_dropped_counted_and_still_acked(mqtt_broker: Any, kafka: Any,
                                                               device_factory: Any) -> None:
    cfg = bridge_config(mqtt_broker, kafka)
    dups_before = metric("edge_bridge_duplicates_total")
    with running(cfg) as bridge:
        dev = device_factory(cfg)
        env = dev.send(1)
        for _ in range(2):  # likely while the first is still in flight
            dev.send_raw(dev.topic(), encode(env), 1)
        dev.wait_acked({1}, timeout=30)
        acks_before = len(dev.ack_messages)
        dev.send_raw(dev.topic(), encode(env), 1)  # after Kafka has it: acked again, not forwarded
        wait_for(lambda: len(dev.ack_messages) > acks_before, 15, message="the duplicate acked again")
        dev.send(2)
        dev.wait_acked({2}, timeout=30)
        wait_for(lambda: bridge.health()["inflight"] == 0, 10, message="all settled")
    assert metric("edge_bridge_duplicates_total") - dups_before == 3
    records = read_topic(kafka, cfg.topics["camera.events"], idle_s=1.0)
    assert sorted(seqs_of(records)) == [1, 2]


# --- crashes and outages -------------------------------------------------------------------------

def test_kill_9_mid_stream_loses_nothing_with_a_resending_device(
        mqtt_broker: Any, kafka: Any, device_factory: Any, agent_process: Any, tmp_path: Path) -> None:
    cfg = bridge_config(mqtt_broker, kafka)
    path = write_config(cfg, tmp_path / "bridge.yaml")
    bridge = bridge_process(agent_process, path)
    dev = device_factory(cfg)
    n = 3000
    for seq in range(1, n + 1):
        dev.send(seq)
        if seq == 1000:
            wait_for(lambda: len(dev.acked_now()) >= 300, 30, message="some acks before the crash")
            bridge.kill()
    assert len(dev.acked_now()) < n
    bridge = agent_process(["bridge", "-c", str(path)])
    dev.wait_acked(set(range(1, n + 1)), timeout=120, resend_after_s=3.0)
    found = seqs_in_kafka(kafka, cfg.topics["camera.events"], set(range(1, n + 1)))
    assert found == set(range(1, n + 1))  # duplicates allowed, loss not


def test_kafka_killed_and_restarted_the_bridge_holds_acks_and_recovers_by_itself(
        mqtt_broker: Any, kafka_factory: Any, device_factory: Any) -> None:
    tansu: TansuBroker = kafka_factory()
    cfg = bridge_config(mqtt_broker, tansu, max_inflight=100)
    dead_letters = lambda: sum(metric("edge_bridge_dlq_total", reason=r)  # noqa: E731
                               for r in ("retries_exhausted", "rejected"))
    dlq_before = dead_letters()
    with running(cfg) as bridge:
        dev = device_factory(cfg)
        for seq in range(1, 201):
            dev.send(seq)
        dev.wait_acked(set(range(1, 201)), timeout=60)

        tansu.kill()
        received_before = metric("edge_bridge_received_total")
        for seq in range(201, 701):
            dev.send(seq)
        # It reads up to its own bound and no further, acks nothing, dead-letters nothing:
        # once the broker holds all 500, the bridge has still read only 100 of them.
        wait_for(lambda: bridge.health()["inflight"] == 100, 30, message="bridge filled its in-flight bound")
        dev.wait_published(30)
        assert bridge.health()["inflight"] == 100
        assert metric("edge_bridge_received_total") - received_before == 100
        assert dev.acked_now() == set(range(1, 201))
        wait_for(lambda: not bridge.health()["kafka"]["connected"], 15, message="health says Kafka is down")

        tansu.start()
        dev.wait_acked(set(range(1, 701)), timeout=120)
        assert bridge.health()["kafka"]["connected"] is True
    # Tansu forgets everything on restart: what is there now is what came after the outage.
    assert set(range(201, 701)) <= seqs_in_kafka(tansu, cfg.topics["camera.events"], set(range(201, 701)))
    assert dead_letters() == dlq_before  # an outage is not poison


def test_no_puback_before_kafka_has_it_so_a_crash_while_kafka_is_down_loses_nothing(
        mqtt_broker: Any, kafka_factory: Any, device_factory: Any, agent_process: Any, tmp_path: Path) -> None:
    # The device does NOT re-send here: only the broker's session can bring these back,
    # and it does only for messages the crashed bridge never PUBACKed.
    tansu: TansuBroker = kafka_factory()
    tansu.kill()
    cfg = bridge_config(mqtt_broker, tansu)
    path = write_config(cfg, tmp_path / "bridge.yaml")
    bridge = bridge_process(agent_process, path)
    port = cfg.http.host_port[1]
    dev = device_factory(cfg)
    for seq in range(1, 301):
        dev.send(seq)
    wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()["inflight"] == 300, 30,
             message="the bridge holds all 300, waiting for Kafka")
    bridge.kill()
    tansu.start()
    agent_process(["bridge", "-c", str(path)])
    dev.wait_acked(set(range(1, 301)), timeout=90)
    assert seqs_in_kafka(tansu, cfg.topics["camera.events"], set(range(1, 301))) == set(range(1, 301))


def test_a_producer_stuck_after_a_quick_broker_restart_is_replaced(
        mqtt_broker: Any, kafka_factory: Any, device_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    # Without the watchdog this producer retries UNKNOWN_PRODUCER_ID for good (checked by hand
    # with stall_timeout_s=60: nothing delivered in 40 s) while a new producer delivers at once.
    tansu: TansuBroker = kafka_factory()
    cfg = bridge_config(mqtt_broker, tansu, stall_timeout_s=2)
    with running(cfg):
        dev = device_factory(cfg)
        for seq in range(1, 101):
            dev.send(seq)
        dev.wait_acked(set(range(1, 101)), timeout=60)
        tansu.kill()
        tansu.start()
        for seq in range(101, 301):
            dev.send(seq)
        dev.wait_acked(set(range(101, 301)), timeout=60)
    assert "new Kafka producer" in caplog.text
    assert set(range(101, 301)) <= seqs_in_kafka(tansu, cfg.topics["camera.events"], set(range(101, 301)))


def test_mqtt_broker_restart_the_bridge_reconnects_to_its_session(mosquitto: Any, kafka: Any,
                                                                   device_factory: Any) -> None:
    broker = mosquitto()
    cfg = bridge_config(broker, kafka)
    with running(cfg) as bridge:
        dev = device_factory(cfg)
        for seq in range(1, 101):
            dev.send(seq)
        dev.wait_acked(set(range(1, 101)), timeout=60)
        broker.stop()
        wait_for(lambda: not bridge.health()["mqtt"]["connected"], 15, message="bridge noticed the broker left")
        broker.start()
        wait_for(lambda: bridge.health()["mqtt"]["connected"] and dev.subacks >= 2, 60,
                 message="bridge reconnected, device reconnected and subscribed again")
        for seq in range(101, 301):
            dev.send(seq)
        dev.wait_acked(set(range(101, 301)), timeout=60)
    assert seqs_in_kafka(kafka, cfg.topics["camera.events"], set(range(1, 301))) == set(range(1, 301))


def test_the_bridge_starts_before_its_mqtt_broker_and_connects_when_it_comes(
        mosquitto: Any, kafka: Any, device_factory: Any) -> None:
    broker = mosquitto()
    broker.stop()
    cfg = bridge_config(broker, kafka, mqtt={"reconnect_max_s": 2})
    bridge = Bridge(cfg)
    bridge.start()
    try:
        assert bridge.health()["mqtt"]["connected"] is False
        broker.start()
        wait_for(lambda: bridge.health()["mqtt"]["connected"], 30, message="bridge connected once the broker came")
        dev = device_factory(cfg)
        for seq in range(1, 51):
            dev.send(seq)
        dev.wait_acked(set(range(1, 51)), timeout=60)
    finally:
        bridge.stop(timeout=15)


# --- the API's entry point -------------------------------------------------------------------------

def test_submit_resolves_when_kafka_confirms_or_with_the_dead_letter(mqtt_broker: Any, kafka: Any) -> None:
    from edge_agent.bridge.inflight import DeadLettered

    cfg = bridge_config(mqtt_broker, kafka)
    env = build("api-1", 1, "config.changed", {"k": "v"})
    bad = build("api-1", 2, "config.changed", {})
    with running(cfg) as bridge:
        where = bridge.submit(cfg.topics["audit.logs"], env, key="custom-key").result(timeout=30)
        assert where["topic"] == cfg.topics["audit.logs"] and where["offset"] >= 0
        with pytest.raises(DeadLettered) as refused:
            bridge.submit("not a valid topic!", bad).result(timeout=30)
        assert refused.value.reason == "rejected"
        assert bridge.health()["inflight"] == 0
    [rec] = consume_all(kafka, cfg.topics["audit.logs"], expect_n=1, timeout=30)
    assert rec.key == b"custom-key" and rec.headers["message-id"] == env.id.encode()
    [dead] = consume_all(kafka, cfg.dlq.topic, expect_n=1, timeout=30)
    assert dead.headers["dlq-source-topic"] == b"api" and dead.headers["message-id"] == bad.id.encode()


# --- several bridges, shutdown, security ---------------------------------------------------------

def test_two_bridges_share_one_stream(mqtt_broker: Any, kafka: Any, device_factory: Any,
                                      agent_process: Any, tmp_path: Path) -> None:
    cfg = bridge_config(mqtt_broker, kafka)
    ports, procs = [], []
    for i in range(2):
        port = free_port()
        one = cfg.model_copy(update={"mqtt": cfg.mqtt.model_copy(update={"client_id": f"{cfg.mqtt.client_id}-{i}"}),
                                     "http": cfg.http.model_copy(update={"listen": f"127.0.0.1:{port}"})})
        procs.append(bridge_process(agent_process, write_config(one, tmp_path / f"b{i}.yaml")))
        ports.append(port)
    dev = device_factory(cfg)
    n = 2000
    for seq in range(1, n + 1):
        dev.send(seq)
    dev.wait_acked(set(range(1, n + 1)), timeout=90)

    def received(port: int) -> float:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        line = next(x for x in text.splitlines() if x.startswith("edge_bridge_received_total "))
        return float(line.split()[1])

    counts = [received(p) for p in ports]
    assert all(c > 0 for c in counts), counts
    assert sum(counts) >= n
    health = httpx.get(f"http://127.0.0.1:{ports[0]}/healthz", timeout=5).json()
    assert health["mqtt"]["connected"] and health["kafka"]["connected"]
    assert seqs_in_kafka(kafka, cfg.topics["camera.events"], set(range(1, n + 1))) == set(range(1, n + 1))


def test_sigterm_stops_reading_flushes_acks_and_exits_0(mqtt_broker: Any, kafka: Any, device_factory: Any,
                                                         agent_process: Any, tmp_path: Path) -> None:
    cfg = bridge_config(mqtt_broker, kafka)
    path = write_config(cfg, tmp_path / "bridge.yaml")
    bridge = bridge_process(agent_process, path)
    dev = device_factory(cfg)
    n = 2000
    for seq in range(1, n + 1):
        dev.send(seq)
        if seq == 1000:
            wait_for(lambda: len(dev.acked_now()) >= 200, 30, message="acks before SIGTERM")
            assert bridge.stop(signal.SIGTERM, timeout=30) == 0
    assert "bridge stopped" in bridge.output()
    # What the stopped bridge put in Kafka was all acked end to end before it left (flushed,
    # not dropped with the process) ...
    in_kafka = set(seqs_of(read_topic(kafka, cfg.topics["camera.events"], idle_s=0.5)))
    wait_for(lambda: in_kafka <= dev.acked_now(), 10,
             message=lambda: f"e2e acks for {len(in_kafka - dev.acked_now())} seqs the bridge put in Kafka")
    acked_by_first = dev.acked_now()
    # ... and every seq acked is in Kafka (the e2e guarantee) ...
    assert acked_by_first <= seqs_in_kafka(kafka, cfg.topics["camera.events"], acked_by_first)
    # ... and the rest comes through the next bridge: from the persistent session, and
    # from the device's re-sends for what the broker dropped past its queue limit
    # (max_queued_messages, 1000 by default) while no bridge was there.
    agent_process(["bridge", "-c", str(path)])
    dev.wait_acked(set(range(1, n + 1)), timeout=90, resend_after_s=3.0)


def test_kafka_over_tls_through_stunnel(mqtt_broker: Any, tls_kafka: Any, device_factory: Any) -> None:
    cfg = bridge_config(mqtt_broker, tls_kafka)
    assert cfg.kafka.security_protocol == "SSL" and cfg.kafka.ssl is not None
    with running(cfg):
        dev = device_factory(cfg)
        for seq in range(1, 301):
            dev.send(seq)
        dev.wait_acked(set(range(1, 301)), timeout=60)
    records = consume_all(tls_kafka, cfg.topics["camera.events"], expect_n=300, timeout=60)
    assert sorted(seqs_of(records)) == list(range(1, 301))


def test_mqtt_over_tls_with_a_password_from_the_environment(mosquitto: Any, kafka: Any, device_factory: Any,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    broker = mosquitto(tls=True, passwords={"bridge": "bridge-pw", "gw-1": "dev-pw"}, allow_anonymous=False)
    cfg = bridge_config(broker, kafka, mqtt={"port": broker.tls_port, "tls": {"ca": str(broker.ca_path)},
                                             "username": "bridge", "password_env": "T_BRIDGE_MQTT_PW"})
    monkeypatch.setenv("T_BRIDGE_MQTT_PW", "wrong")
    refused = Bridge(cfg)
    refused.start()
    try:
        wait_for(lambda: "refused the connection" in caplog.text, 15, message="a clear error for a bad password")
        assert refused.health()["mqtt"]["connected"] is False
    finally:
        refused.stop(timeout=5)
    monkeypatch.setenv("T_BRIDGE_MQTT_PW", "bridge-pw")
    with running(cfg):
        dev = device_factory(cfg, port=broker.port, auth=("gw-1", "dev-pw"))
        for seq in range(1, 51):
            dev.send(seq)
        dev.wait_acked(set(range(1, 51)), timeout=60)
    records = consume_all(kafka, cfg.topics["camera.events"], expect_n=50, timeout=60)
    assert sorted(seqs_of(records)) == list(range(1, 51))


def test_kafka_with_sasl(mqtt_broker: Any, kafka: Any, device_factory: Any) -> None:
    if not (isinstance(kafka, ExternalKafka) and kafka.sasl):
        pytest.skip("needs EDGE_TEST_KAFKA with SASL (the test broker's build has no SASL)")
    cfg = bridge_config(mqtt_broker, kafka)
    assert cfg.kafka.sasl is not None
    with running(cfg):
        dev = device_factory(cfg)
        for seq in range(1, 101):
            dev.send(seq)
        dev.wait_acked(set(range(1, 101)), timeout=60)
    records = consume_all(kafka, cfg.topics["camera.events"], expect_n=100, timeout=60)
    assert sorted(seqs_of(records)) == list(range(1, 101))


def test_a_bad_config_file_is_refused_with_the_field_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "bridge.yaml"
    path.write_text("kafka: {bootstrap_servers: x:1, security_protocol: SASL_SSL}\nretry: {max_attempts: 0}\n")
    assert run_bridge(path) == 2
    err = capsys.readouterr().err
    assert "kafka: Value error, security_protocol SASL_SSL needs a sasl section" in err
    assert "retry.max_attempts" in err
