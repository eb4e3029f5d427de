"""The documented Mosquitto setup (docs/mosquitto/edge.conf + edge.acl), started as written, over TLS.

Only paths and the port are rewritten; the rules themselves are the shipped ones.
"""

from __future__ import annotations

import os
import queue
import shutil
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_testkit.mqtt import MOSQUITTO_BIN
from edge_testkit.processes import ManagedProcess, free_port, wait_for
from edge_testkit.tls import Pki

DOCS = Path(__file__).resolve().parents[2] / "docs" / "mosquitto"
USERS = {"gw-1": "pw-gw-1", "gw-2": "pw-gw-2", "bridge": "pw-bridge", "operator": "pw-operator"}


class Broker:
    def __init__(self, port: int, ca: Path, proc: ManagedProcess, log: Path):
        self.port, self.ca, self.proc, self.log = port, ca, proc, log


@pytest.fixture
def documented_broker(tmp_path: Path, pki: Pki) -> Iterator[Broker]:
    if os.environ.get("EDGE_TEST_MQTT"):
        pytest.skip("EDGE_TEST_MQTT is set: this test needs its own Mosquitto")
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd not installed")
    etc = tmp_path / "etc"
    (etc / "certs").mkdir(parents=True)
    shutil.copy(pki.ca_path, etc / "certs" / "ca.crt")
    cert, key = pki.server_cert
    shutil.copy(cert, etc / "certs" / "server.crt")
    shutil.copy(key, etc / "certs" / "server.key")
    shutil.copy(DOCS / "edge.acl", etc / "edge.acl")
    passwd = etc / "edge.passwd"
    passwd.write_text("")
    for user, password in USERS.items():  # as docs/mosquitto.md says to create them
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True, timeout=30)
    port = free_port()
    log = tmp_path / "mosquitto.log"
    conf = (DOCS / "edge.conf").read_text()
    conf = conf.replace("/etc/mosquitto/", f"{etc}/").replace("/var/lib/mosquitto/", f"{tmp_path}/")
    conf = conf.replace("listener 8883", f"listener {port} 127.0.0.1")
    conf += f"\nlog_dest file {log}\nlog_type all\n"
    if os.geteuid() == 0:  # as root mosquitto would drop to a user that cannot read pytest's tmp
        conf += "user root\n"
    (tmp_path / "edge.conf").write_text(conf)
    proc = ManagedProcess([MOSQUITTO_BIN, "-c", str(tmp_path / "edge.conf")], tmp_path / "mosquitto.out").start()
    try:
        proc.wait_listening("127.0.0.1", port, 15)
        yield Broker(port, pki.ca_path, proc, log)
    finally:
        proc.kill()


class Client:
    """A paho v5 client that records publish/subscribe reason codes and received messages."""

    def __init__(self, broker: Broker, user: str | None, password: str | None, client_id: str, *,
                 tls: bool = True):
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.acks: dict[int, int] = {}
        self.subacks: dict[int, list[int]] = {}
        self.connect_rc: int | None = None
        self.done = threading.Condition()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if tls:
            c.tls_set(ca_certs=str(broker.ca), cert_reqs=ssl.CERT_REQUIRED)
        if user:
            c.username_pw_set(user, password)
        c.on_connect = lambda cl, ud, fl, rc, pr: setattr(self, "connect_rc", rc.value)
        c.on_publish = lambda cl, ud, mid, rc, pr: self.acks.__setitem__(mid, rc.value)
        c.on_subscribe = lambda cl, ud, mid, rcs, pr: self.subacks.__setitem__(mid, [r.value for r in rcs])
        c.on_message = lambda cl, ud, msg: self.messages.put((msg.topic, msg.payload))
        c.on_disconnect = lambda cl, ud, fl, rc, pr: setattr(self, "connect_rc", self.connect_rc or -2)
        self.c = c
        try:
            c.connect("127.0.0.1", broker.port, keepalive=30)
        except (ssl.SSLError, OSError) as e:
            self.connect_rc = -1
            self.error = e
            return
        c.loop_start()
        # A refused TLS handshake ends in a disconnect, not a CONNACK.
        wait_for(lambda: self.connect_rc is not None, 10, message="CONNACK or disconnect")

    def publish(self, topic: str, payload: bytes = b"{}") -> int:
        info = self.c.publish(topic, payload, qos=1)
        wait_for(lambda: info.mid in self.acks, 10, message=f"PUBACK for {topic}")
        return self.acks[info.mid]

    def subscribe(self, topic: str) -> int:
        _, mid = self.c.subscribe(topic, qos=1)
        wait_for(lambda: mid in self.subacks, 10, message=f"SUBACK for {topic}")
        return self.subacks[mid][0]

    def received(self, timeout: float) -> tuple[str, bytes] | None:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        if self.connect_rc == 0:
            self.c.disconnect()
            self.c.loop_stop()


@pytest.fixture
def connect(documented_broker: Broker) -> Iterator:
    clients: list[Client] = []

    def factory(user: str | None, client_id: str | None = None, *, password: str | None = None,
                tls: bool = True) -> Client:
        cl = Client(documented_broker, user, password if password is not None else USERS.get(user or ""),
                    client_id or f"{user}-{len(clients)}", tls=tls)
        clients.append(cl)
        return cl

    yield factory
    for cl in clients:
        cl.close()


NOT_AUTHORIZED = 0x87
ACCEPTED = (0x00, 0x10)  # success, or success with no subscriber yet
GRANTED_QOS1 = 1


@pytest.mark.timeout(60)
def test_device_publishes_only_under_its_own_prefix(connect) -> None:
    gw1 = connect("gw-1")
    assert gw1.connect_rc == 0
    assert gw1.publish("edge/gw-1/up/camera.events") in ACCEPTED
    assert gw1.publish("edge/gw-1/status") in ACCEPTED
    assert gw1.publish("edge/gw-2/up/camera.events") == NOT_AUTHORIZED
    assert gw1.publish("edge/gw-1/ack") == NOT_AUTHORIZED  # only the bridge acks
    assert gw1.publish("edge/gw-2/cmd/ping") == NOT_AUTHORIZED  # devices do not command each other


def assert_only_own_arrives(snoop: Client, sender: Client, forbidden: str, own: str) -> None:
    """Mosquitto 2.0 grants any SUBSCRIBE and applies read rules per message: check delivery.

    The forbidden message is published first; the snoop's first delivery being its own
    message proves the forbidden one was withheld (one publisher, delivered in order).
    """
    marker = os.urandom(8).hex().encode()
    assert sender.publish(forbidden, b"secret") in ACCEPTED
    assert sender.publish(own, marker) in ACCEPTED
    while True:  # overlapping filters deliver earlier messages again: skip those, never a secret
        got = snoop.received(10)
        assert got is not None, f"{own} never arrived"
        assert got[1] != b"secret", f"{forbidden} leaked as {got[0]}"
        if got == (own, marker):
            return


@pytest.mark.timeout(60)
def test_device_reads_only_its_own_cmd_and_ack(connect) -> None:
    gw1, gw2, op, bridge = connect("gw-1"), connect("gw-2"), connect("operator"), connect("bridge")
    assert gw2.subscribe("edge/gw-2/cmd/#") == GRANTED_QOS1
    for snoop_filter in ("edge/gw-2/cmd/#", "edge/+/cmd/#", "edge/gw-1/cmd/#"):
        assert gw1.subscribe(snoop_filter) == GRANTED_QOS1
    assert_only_own_arrives(gw1, op, "edge/gw-2/cmd/ping", "edge/gw-1/cmd/ping")
    assert gw2.received(10) == ("edge/gw-2/cmd/ping", b"secret")  # the real addressee got it
    assert gw1.subscribe("edge/+/ack") == GRANTED_QOS1
    assert_only_own_arrives(gw1, bridge, "edge/gw-2/ack", "edge/gw-1/ack")
    assert gw1.subscribe("edge/+/up/#") == GRANTED_QOS1
    assert gw2.publish("edge/gw-2/up/camera.events", b"x") in ACCEPTED
    assert_only_own_arrives(gw1, op, "edge/gw-2/cmd/restart_camera", "edge/gw-1/cmd/x")


@pytest.mark.timeout(60)
def test_a_device_borrowing_another_client_id_gets_nothing_of_it(connect) -> None:
    # %u, not %c: gw-2 connecting with client id "gw-1" is still gw-2.
    spoof, op = connect("gw-2", client_id="gw-1"), connect("operator")
    assert spoof.connect_rc == 0
    assert spoof.subscribe("edge/gw-1/cmd/#") == GRANTED_QOS1
    assert spoof.subscribe("edge/gw-2/cmd/#") == GRANTED_QOS1
    assert_only_own_arrives(spoof, op, "edge/gw-1/cmd/ping", "edge/gw-2/cmd/ping")
    assert spoof.publish("edge/gw-1/up/camera.events") == NOT_AUTHORIZED


@pytest.mark.timeout(60)
def test_operator_commands_reach_the_device_and_results_come_back(connect) -> None:
    gw1, op = connect("gw-1"), connect("operator")
    assert gw1.subscribe("edge/gw-1/cmd/#") == GRANTED_QOS1
    assert op.subscribe("edge/gw-1/cmd/+/result") == GRANTED_QOS1
    assert op.subscribe("edge/gw-1/reply/#") == GRANTED_QOS1
    assert op.publish("edge/gw-1/cmd/ping", b'{"request_id": "r1"}') in ACCEPTED
    assert gw1.received(10) == ("edge/gw-1/cmd/ping", b'{"request_id": "r1"}')
    assert gw1.publish("edge/gw-1/cmd/ping/result", b"ok") in ACCEPTED
    assert op.received(10) == ("edge/gw-1/cmd/ping/result", b"ok")
    assert gw1.publish("edge/gw-1/reply/op-7", b"ok2") in ACCEPTED
    assert op.received(10) == ("edge/gw-1/reply/op-7", b"ok2")
    assert op.publish("edge/gw-1/up/camera.events") == NOT_AUTHORIZED  # operators do not forge data
    assert op.subscribe("edge/gw-1/up/#") == GRANTED_QOS1
    assert_only_own_arrives(op, gw1, "edge/gw-1/up/camera.events", "edge/gw-1/reply/op-8")


@pytest.mark.timeout(60)
def test_bridge_shares_the_uplink_and_acks_devices(connect) -> None:
    gw1, bridge = connect("gw-1"), connect("bridge", client_id="bridge-1")
    assert bridge.subscribe("$share/bridge/edge/+/up/#") == GRANTED_QOS1
    assert gw1.subscribe("edge/gw-1/ack") == GRANTED_QOS1
    assert gw1.publish("edge/gw-1/up/audit.logs", b"env") in ACCEPTED
    assert bridge.received(10) == ("edge/gw-1/up/audit.logs", b"env")
    assert bridge.publish("edge/gw-1/ack", b'{"seq": [[1, 1]]}') in ACCEPTED
    assert gw1.received(10) == ("edge/gw-1/ack", b'{"seq": [[1, 1]]}')
    assert bridge.publish("edge/gw-1/cmd/ping") == NOT_AUTHORIZED


@pytest.mark.timeout(60)
def test_no_anonymous_no_wrong_password_no_clear_text(connect) -> None:
    assert connect(None, "anon").connect_rc not in (0, None)
    assert connect("gw-1", password="wrong").connect_rc not in (0, None)
    assert connect("gw-1", tls=False).connect_rc != 0  # the only listener speaks TLS
