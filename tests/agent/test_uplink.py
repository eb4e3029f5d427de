"""Store and forward over a real Mosquitto, with the agent as a real child process.

The far end is a small acker standing in for the bridge (the bridge has its own tests over
Mosquitto and Kafka): it records what arrives and acks seqs the DESIGN way.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_testkit.agent import AgentApi, publish_many, write_agent_config
from edge_testkit.processes import wait_for

pytestmark = pytest.mark.timeout(240)

DEVICE = "gw-1"


class Acker:
    """Subscribes to every device's uplink in a persistent session and acks (when ``acking``)."""

    def __init__(self, host: str, port: int, *, acking: bool = True, client_id: str = "test-acker"):
        self.acking = acking
        self.lock = threading.Lock()
        self.arrivals: dict[str, list[dict]] = defaultdict(list)  # stream -> envelopes in arrival order
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("edge/+/up/#", qos=1)
        self.client.reconnect_delay_set(0.05, 0.5)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect(host, port, clean_start=False, properties=props)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        env = json.loads(msg.payload)
        stream = msg.topic.rsplit("/", 1)[1]
        with self.lock:
            self.arrivals[stream].append(env)
        if self.acking:
            client.publish(f"edge/{env['device_id']}/ack", json.dumps({"seq": [[env["seq"], env["seq"]]]}), qos=1)

    def envelopes(self, stream: str | None = None) -> list[dict]:
        with self.lock:
            if stream:
                return list(self.arrivals[stream])
            return [e for envs in self.arrivals.values() for e in envs]

    def seqs(self) -> set[int]:
        return {e["seq"] for e in self.envelopes()}

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def start_agent(agent_process, cfg_path: Path, http_port: int):
    proc = agent_process(["run", "-c", str(cfg_path)])
    api = AgentApi(http_port)
    api.wait_up(proc)
    return proc, api


def start_agent_then_lose_the_broker(agent_process, broker, cfg_path: Path, http_port: int):
    """The agent starts connected; then the broker goes away (a clean stop keeps its sessions)."""
    proc, api = start_agent(agent_process, cfg_path, http_port)
    wait_for(lambda: api.status()["mqtt"]["connected"], 20, message="agent connected")
    broker.stop()
    return proc, api


def test_backlog_from_an_outage_arrives_complete_and_in_order(tmp_path, mosquitto, agent_process, acker_factory):
    broker = mosquitto()
    acker = acker_factory(broker)
    cfg, port = write_agent_config(tmp_path, broker)
    proc, api = start_agent_then_lose_the_broker(agent_process, broker, cfg, port)
    ids = publish_many(api, "notifications", 0, 1200)
    assert api.status()["outbox"]["depth"] >= 1200
    broker.start()

    wait_for(lambda: api.status()["outbox"]["depth"] == 0, 90, message=lambda: f"drained: {api.status()}")
    notes = acker.envelopes("notifications")
    first_seen = list(dict.fromkeys(e["seq"] for e in notes))  # arrival order, resends dropped
    assert first_seen == sorted(first_seen), "seq strictly increasing within a stream"
    assert {e["id"] for e in notes} >= set(ids), "every durable message arrived"
    all_seqs = acker.seqs()
    assert all_seqs == set(range(1, max(all_seqs) + 1)), "no gap in seq"


def test_kill_9_during_outage_and_during_drain_loses_nothing(tmp_path, mosquitto, agent_process, acker_factory):
    broker = mosquitto()
    acker = acker_factory(broker)
    cfg, port = write_agent_config(tmp_path, broker, mqtt={"drain_rate": 300})
    proc, api = start_agent_then_lose_the_broker(agent_process, broker, cfg, port)
    ids = publish_many(api, "camera.events", 0, 600)
    proc.kill()  # kill -9 while the broker is away: the outbox is all there is
    proc, api = start_agent(agent_process, cfg, port)
    ids += publish_many(api, "camera.events", 600, 600)
    broker.start()

    # drain_rate keeps the drain slow enough to be killed in the middle of it
    wait_for(lambda: len(acker.seqs()) >= 200, 60, message="drain under way")
    assert api.status()["outbox"]["depth"] > 100, "killed mid-drain"
    proc.kill()
    proc, api = start_agent(agent_process, cfg, port)

    wait_for(lambda: api.status()["outbox"]["depth"] == 0, 120, message=lambda: f"drained: {api.status()}")
    received = acker.envelopes()
    assert {e["id"] for e in received} >= set(ids), "every message confirmed durable arrived"
    seqs = [e["seq"] for e in received]
    assert set(seqs) == set(range(1, max(seqs) + 1)), "no gap in seq across two crashes"
    duplicates = len(seqs) - len(set(seqs))
    print(f"duplicates after two kill -9: {duplicates} of {len(seqs)}")


def test_unacked_entries_stay_and_are_sent_again(tmp_path, mosquitto, agent_process, acker_factory):
    broker = mosquitto()
    acker = acker_factory(broker, acking=False)
    cfg, port = write_agent_config(tmp_path, broker, mqtt={"ack_timeout_s": 0.3})
    proc, api = start_agent(agent_process, cfg, port)
    publish_many(api, "audit.logs", 0, 5)

    def resent_each() -> bool:
        counts = defaultdict(int)
        for e in acker.envelopes("audit.logs"):
            counts[e["seq"]] += 1
        return len(counts) == 5 and min(counts.values()) >= 3

    wait_for(resent_each, 30, message="each entry sent at least three times")
    assert api.status()["outbox"]["by_stream"]["audit.logs"] == 5, "nothing leaves without an ack"
    assert api.metric("edge_resent_total") >= 10

    acker.acking = True
    wait_for(lambda: api.status()["outbox"]["depth"] == 0, 30, message="acked at last")


def test_byte_cap_drops_oldest_results_reports_them_and_keeps_audit(tmp_path, mosquitto, agent_process,
                                                                    acker_factory):
    broker = mosquitto()
    acker = acker_factory(broker)
    cfg, port = write_agent_config(tmp_path, broker, outbox={"max_bytes": 60_000})
    proc, api = start_agent_then_lose_the_broker(agent_process, broker, cfg, port)
    for i in range(20):
        assert api.publish("audit.logs", {"type": "test.audit", "i": i}).status_code == 200
    pad = "x" * 400
    result_seqs = []
    for i in range(300):
        r = api.publish("ai.inference.results", {"type": "test.result", "i": i, "pad": pad})
        assert r.status_code == 200
        result_seqs.append(r.json()["seq"])
    assert api.status()["outbox"]["bytes"] <= 60_000
    assert api.metric("edge_outbox_dropped_total") > 0

    broker.start()
    wait_for(lambda: api.status()["outbox"]["depth"] == 0, 60, message=lambda: f"drained: {api.status()}")
    assert len({e["seq"] for e in acker.envelopes("audit.logs")}) == 20, "audit entries are all kept"

    def reported() -> set[int]:
        reports = [e for e in acker.envelopes("camera.events") if e["type"] == "outbox.overflow"]
        return {s for r in reports for lo, hi in r["data"]["dropped"].get("ai.inference.results", [])
                for s in range(lo, hi + 1)}

    # The last report is coalesced and may trail the drain by a second; storing it may itself evict
    # a few more results (possibly ones already sent), so compare with the final counter.
    wait_for(lambda: len(reported()) == api.metric("edge_outbox_dropped_total"), 20,
             message=lambda: f"{len(reported())} reported of {api.metric('edge_outbox_dropped_total')} dropped")
    dropped = reported()
    delivered = {e["seq"] for e in acker.envelopes("ai.inference.results")}
    assert delivered | dropped == set(result_seqs), "every result arrived or is named as dropped"
    assert max(dropped) < min(delivered - dropped), "the oldest results went first"


def test_corrupt_outbox_does_not_stop_the_agent(tmp_path, mosquitto, agent_process, acker_factory):
    broker = mosquitto()
    acker = acker_factory(broker)
    box = tmp_path / "outbox"
    box.mkdir()
    (box / "cache.db").write_bytes(b"\x00garbage, not sqlite" * 500)
    cfg, port = write_agent_config(tmp_path, broker)
    proc, api = start_agent(agent_process, cfg, port)
    wait_for(lambda: any(e["type"] == "outbox.reset" for e in acker.envelopes("camera.events")), 30,
             message="outbox.reset reported")
    reset = next(e for e in acker.envelopes("camera.events") if e["type"] == "outbox.reset")
    assert Path(reset["data"]["moved_to"]).exists()
    assert "cannot be opened" in proc.output()
    assert api.publish("notifications", {"type": "after.reset"}).status_code == 200


ACL = """\
user gw-1
topic write edge/gw-1/up/camera.events
topic write edge/gw-1/up/notifications
topic write edge/gw-1/status
topic read edge/gw-1/ack
topic read edge/gw-1/cmd/#

user bridge
topic read edge/+/up/#
topic write edge/+/ack
"""


def test_tls_with_password_and_acl_refusal_is_logged_and_the_entry_kept(tmp_path, mosquitto, agent_process):
    broker = mosquitto(tls=True, passwords={"gw-1": "device-pw", "bridge": "bridge-pw"}, acl=ACL,
                       allow_anonymous=False)
    bridge = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="acl-bridge",
                         protocol=mqtt.MQTTv5)
    bridge.username_pw_set("bridge", "bridge-pw")
    got: list[dict] = []

    def on_message(client, userdata, msg) -> None:
        env = json.loads(msg.payload)
        got.append(env)
        client.publish(f"edge/{env['device_id']}/ack", json.dumps({"seq": [[env["seq"], env["seq"]]]}), qos=1)

    bridge.on_message = on_message
    bridge.connect(broker.host, broker.port)
    bridge.subscribe("edge/+/up/#", qos=1)
    bridge.loop_start()
    try:
        cfg, port = write_agent_config(
            tmp_path, broker,
            mqtt={"port": broker.tls_port, "tls": {"ca": str(broker.ca_path)}, "username": "gw-1",
                  "password_env": "EDGE_TEST_MQTT_PW", "ack_timeout_s": 0.5})
        proc = agent_process(["run", "-c", str(cfg)], env={"EDGE_TEST_MQTT_PW": "device-pw"})
        api = AgentApi(port)
        api.wait_up(proc)
        assert api.publish("notifications", {"type": "allowed"}).status_code == 200
        assert api.publish("audit.logs", {"type": "forbidden"}).status_code == 200

        wait_for(lambda: any(e["type"] == "allowed" for e in got), 30, message="allowed topic flows over TLS")
        wait_for(lambda: api.metric("edge_publish_refused_total") >= 2, 30, message="refusals counted")
        assert "refused publish" in proc.output() and "Not authorized" in proc.output()
        st = api.status()
        assert st["outbox"]["by_stream"]["audit.logs"] == 1, "a refused entry is kept, not dropped"
        assert st["mqtt"]["refused_total"] >= 2
        assert not any(e["type"] == "forbidden" for e in got)
    finally:
        bridge.loop_stop()
        bridge.disconnect()


class StatusWatcher:
    """Follows the retained status topic of a device."""

    def __init__(self, broker, device: str = DEVICE):
        self.states: list[dict] = []
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = lambda c, u, m: self.states.append(json.loads(m.payload)) if m.payload else None
        self.client.reconnect_delay_set(0.05, 0.5)
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(f"edge/{device}/status", qos=1)
        self.client.loop_start()

    def last(self) -> str | None:
        return self.states[-1]["state"] if self.states else None

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_retained_status_online_then_offline_by_will_and_by_sigterm(tmp_path, mosquitto, agent_process):
    broker = mosquitto()
    watcher = StatusWatcher(broker)
    try:
        cfg, port = write_agent_config(tmp_path, broker, mqtt={"keepalive_s": 5})
        proc, api = start_agent(agent_process, cfg, port)
        wait_for(lambda: watcher.last() == "online", 20, message="online status")
        proc.kill()  # no goodbye: the broker publishes the will
        wait_for(lambda: watcher.last() == "offline", 30, message="offline will after kill -9")

        proc, api = start_agent(agent_process, cfg, port)
        wait_for(lambda: watcher.last() == "online", 20, message="online again")
        assert proc.stop() == 0, proc.output()[-2000:]  # SIGTERM: a clean exit
        wait_for(lambda: watcher.last() == "offline", 20, message="offline on SIGTERM")
        assert watcher.states[-1].get("reason") == "shutdown"
        assert '"agent gw-1 stopped"' in proc.output() or "agent gw-1 stopped" in proc.output()
    finally:
        watcher.close()
    # a late subscriber sees the retained status
    late = StatusWatcher(broker)
    try:
        wait_for(lambda: late.last() == "offline", 10, message="retained status")
    finally:
        late.close()


def test_client_certificate_authentication(tmp_path, mosquitto, agent_process, acker_factory):
    broker = mosquitto(tls=True, require_certificate=True)
    cert, key = broker.client_cert("gw-1")
    plain_acker = acker_factory(broker)  # the plain listener stays open for the stand-in bridge
    cfg, port = write_agent_config(tmp_path, broker, mqtt={
        "port": broker.tls_port, "tls": {"ca": str(broker.ca_path), "cert": str(cert), "key": str(key)}})
    proc, api = start_agent(agent_process, cfg, port)
    assert api.publish("notifications", {"type": "over.mtls"}).status_code == 200
    wait_for(lambda: any(e["type"] == "over.mtls" for e in plain_acker.envelopes("notifications")), 30,
             message="published over mutual TLS")
    wait_for(lambda: api.status()["outbox"]["depth"] == 0, 30, message="acked")
