"""The fixtures themselves work over the real wire: Mosquitto (plain, TLS, ACL), Tansu, stunnel."""

from __future__ import annotations

import os
import queue
import ssl
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_testkit.kafka import client_config, create_topics
from edge_testkit.processes import AgentProcess, free_port, wait_for
from edge_testkit.records import TopicRecorder, consume_all, read_topic

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[2]


class V5Client:
    """A paho MQTT v5 client that records what happens, for assertions."""

    def __init__(self, client_id: str | None = None):
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.connected = threading.Event()
        self.connect_reason: ReasonCode | None = None
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.pubacks: dict[int, ReasonCode] = {}
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, msg: self.messages.put(msg)
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = lambda c, u, mid, rcs, props: self.subacks.__setitem__(mid, rcs)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        self.connect_reason = reason
        self.connected.set()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: ReasonCode, props: Any) -> None:
        self.pubacks[mid] = reason

    def connect(self, host: str, port: int, *, username: str | None = None, password: str | None = None,
                tls: dict[str, Any] | None = None, timeout: float = 10.0) -> ReasonCode:
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls is not None:
            self.client.tls_set(**tls)
        self.client.connect(host, port, keepalive=30, clean_start=True)
        self.client.loop_start()
        wait_for(self.connected.is_set, timeout, message=f"CONNACK from {host}:{port}")
        assert self.connect_reason is not None
        return self.connect_reason

    def subscribe(self, topic: str, timeout: float = 10.0) -> list[ReasonCode]:
        _, mid = self.client.subscribe(topic, qos=1)
        return wait_for(lambda: self.subacks.get(mid), timeout, message=f"SUBACK for {topic}")

    def publish(self, topic: str, payload: bytes, timeout: float = 10.0, **kw: Any) -> ReasonCode:
        info = self.client.publish(topic, payload, qos=1, **kw)
        return wait_for(lambda: self.pubacks.get(info.mid), timeout, message=f"PUBACK for {topic}")

    def next_message(self, timeout: float = 10.0) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients() -> Any:
    made: list[V5Client] = []

    def make(client_id: str | None = None) -> V5Client:
        made.append(V5Client(client_id))
        return made[-1]

    yield make
    for c in made:
        c.close()


# --- Mosquitto -------------------------------------------------------------------------------

def test_plain_pubsub_v5(mqtt_broker: Any, clients: Any) -> None:
    sub, pub = clients(), clients()
    sub.connect(mqtt_broker.host, mqtt_broker.port)
    assert not sub.subscribe("edge/gw/up/#")[0].is_failure
    pub.connect(mqtt_broker.host, mqtt_broker.port)
    props = Properties(mqtt.PacketTypes.PUBLISH)
    props.UserProperty = [("trace", "abc")]
    assert pub.publish("edge/gw/up/camera.events", b'{"v":1}', properties=props).value == 0
    msg = sub.next_message()
    assert (msg.topic, msg.payload) == ("edge/gw/up/camera.events", b'{"v":1}')
    assert ("trace", "abc") in msg.properties.UserProperty


def test_tls_with_client_certificate(mosquitto: Any, clients: Any) -> None:
    broker = mosquitto(tls=True, require_certificate=True)
    cert, key = broker.client_cert("gw-001")
    ok = clients()
    assert ok.connect(broker.host, broker.tls_port, tls={"ca_certs": str(broker.ca_path), "certfile": str(cert),
                                                          "keyfile": str(key)}).value == 0
    ok.subscribe("x/#")
    assert ok.publish("x/y", b"over tls").value == 0
    assert ok.next_message().payload == b"over tls"

    # Without a client certificate the handshake is refused: the broker really checks.
    refused = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    refused.tls_set(ca_certs=str(broker.ca_path))
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        refused.connect(broker.host, broker.tls_port)
        # TLS 1.3 reports a missing client cert only on the first read.
        for _ in range(50):
            rc = refused.loop(0.1)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                raise ConnectionError(f"loop rc {rc}")


ACL = """\
user gw-001
topic write edge/gw-001/up/#
topic read edge/gw-001/ack

user bridge
topic read edge/+/up/#
topic write edge/+/ack
"""


def test_password_and_acl(mosquitto: Any, clients: Any) -> None:
    """Finding: mosquitto 2.0.11 answers an ACL-denied QoS 1 publish from a v5 client with
    PUBACK reason 0x87 (Not authorized); the message is not delivered. A v3.1.1 client gets a
    plain PUBACK and cannot tell (test_acl_denial_is_invisible_to_a_v311_client)."""
    broker = mosquitto(passwords={"gw-001": "pw1", "bridge": "pw2"}, acl=ACL, allow_anonymous=False)

    bad = clients()
    # 2.0.11 answers a wrong password with CONNACK 0x87 (Not authorized), not 0x86.
    assert bad.connect(broker.host, broker.port, username="gw-001", password="wrong").value == 0x87

    bridge = clients()
    assert bridge.connect(broker.host, broker.port, username="bridge", password="pw2").value == 0
    bridge.subscribe("edge/+/up/#")

    device = clients()
    assert device.connect(broker.host, broker.port, username="gw-001", password="pw1").value == 0
    allowed = device.publish("edge/gw-001/up/camera.events", b"mine")
    denied = device.publish("edge/gw-002/up/camera.events", b"spoofed")
    assert allowed.value == 0
    assert denied.value >= 0x80 and denied.getName() == "Not authorized", denied

    assert bridge.next_message().payload == b"mine"
    # Sentinel after the denied publish: if "spoofed" had been delivered it would come first.
    assert device.publish("edge/gw-001/up/camera.events", b"sentinel").value == 0
    assert bridge.next_message().payload == b"sentinel"
    assert "gw-001" in broker.log_text()


def test_acl_denial_is_invisible_to_a_v311_client(mosquitto: Any, clients: Any) -> None:
    """MQTT 3.1.1 has no PUBACK reason code: the denied publish looks acknowledged but is
    dropped. Only a v5 client can tell (see test_password_and_acl)."""
    broker = mosquitto(passwords={"gw-001": "pw1", "bridge": "pw2"}, acl=ACL, allow_anonymous=False)
    bridge = clients()
    assert bridge.connect(broker.host, broker.port, username="bridge", password="pw2").value == 0
    bridge.subscribe("edge/+/up/#")

    acks: dict[int, Any] = {}
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    c.on_publish = lambda cl, u, mid, rc, props: acks.__setitem__(mid, rc)
    c.username_pw_set("gw-001", "pw1")
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        denied = c.publish("edge/gw-002/up/camera.events", b"spoofed", qos=1)
        assert wait_for(lambda: acks.get(denied.mid), 10, message="PUBACK").is_failure is False
        c.publish("edge/gw-001/up/camera.events", b"sentinel", qos=1)
        assert bridge.next_message().payload == b"sentinel"  # "spoofed" never arrived
    finally:
        c.disconnect()
        c.loop_stop()


def test_restart_on_same_port_keeps_persistent_session(mosquitto: Any) -> None:
    broker = mosquitto()
    port = broker.port
    received: queue.Queue[bytes] = queue.Queue()

    def session_client() -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="persistent-1", protocol=mqtt.MQTTv5)
        c.on_message = lambda cl, u, m: received.put(m.payload)
        props = Properties(mqtt.PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        c.connect(broker.host, port, clean_start=False, properties=props)
        return c

    sub = session_client()
    sub.loop_start()
    wait_for(sub.is_connected, 10, message="subscriber connected")
    subacked = threading.Event()
    sub.on_subscribe = lambda *args: subacked.set()
    sub.subscribe("q/#", qos=1)
    wait_for(subacked.is_set, 10, message="SUBACK")
    sub.disconnect()
    sub.loop_stop()

    pub = V5Client()
    pub.connect(broker.host, port)
    assert pub.publish("q/1", b"queued while away").value == 0
    pub.close()

    broker.stop()
    assert not broker.alive
    broker.start()
    assert broker.port == port

    sub = session_client()
    sub.loop_start()
    try:
        assert received.get(timeout=10) == b"queued while away"
    finally:
        sub.disconnect()
        sub.loop_stop()


def test_bad_broker_config_fails_fast_with_the_brokers_own_message(mosquitto: Any) -> None:
    """A typo in extra_conf must not turn into a 15 s readiness timeout with no clue."""
    with pytest.raises(RuntimeError, match="Unknown configuration variable \"bogus_option\""):
        mosquitto(extra_conf="bogus_option 1")


def test_kill_then_start(mosquitto: Any, clients: Any) -> None:
    broker = mosquitto()
    broker.kill()
    assert not broker.alive
    broker.start()
    c = clients()
    assert c.connect(broker.host, broker.port).value == 0


# --- Kafka (Tansu) ---------------------------------------------------------------------------

def _produce(target: Any, topic: str, n: int, extra: dict[str, Any] | None = None) -> None:
    from confluent_kafka import Producer

    producer = Producer({**client_config(target), "enable.idempotence": True, "acks": "all", "linger.ms": 5,
                         **(extra or {})})
    errors: list[Any] = []
    for i in range(n):
        producer.produce(topic, key=f"gw-001/cam-{i % 2}".encode(), value=f'{{"seq": {i + 1}}}'.encode(),
                         headers=[("message-id", str(uuid.uuid4()).encode()), ("seq", str(i + 1).encode())],
                         on_delivery=lambda err, msg: errors.append(err) if err else None)
    assert producer.flush(30) == 0
    assert errors == []


def test_kafka_round_trip_with_headers(kafka: Any, unique_topic: str) -> None:
    create_topics(kafka, [unique_topic], partitions=3)
    _produce(kafka, unique_topic, 50)
    records = consume_all(kafka, unique_topic, expect_n=50, timeout=30, settle_s=0.3)
    assert len(records) == 50  # settle_s: no extras either
    assert sorted(int(r.headers["seq"]) for r in records) == list(range(1, 51))
    assert {r.key for r in records} == {b"gw-001/cam-0", b"gw-001/cam-1"}
    # One key stays in one partition, in order.
    for key in (b"gw-001/cam-0", b"gw-001/cam-1"):
        mine = [r for r in records if r.key == key]
        assert len({r.partition for r in mine}) == 1
        assert [r.json()["seq"] for r in mine] == sorted(r.json()["seq"] for r in mine)
    assert len(read_topic(kafka, unique_topic)) == 50


def test_a_dead_session_broker_is_revived_before_the_next_test(tmp_path: Path) -> None:
    """One crash of the shared Tansu must not fail every later Kafka test of the session."""
    (tmp_path / "test_revive.py").write_text(
        "def test_kills_it(kafka):\n"
        "    kafka.kill()\n"
        "def test_still_has_kafka(kafka):\n"
        "    from edge_testkit.kafka import create_topics\n"
        "    from edge_testkit.records import consume_all\n"
        "    from confluent_kafka import Producer\n"
        "    create_topics(kafka, ['after'])\n"
        "    p = Producer(kafka.client_config()); p.produce('after', b'x'); assert p.flush(20) == 0\n"
        "    assert len(consume_all(kafka, 'after', 1, timeout=20)) == 1\n")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "conftest", "-p", "no:cacheprovider",
                          str(tmp_path / "test_revive.py")], check=False, cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env=_inner_pytest_env())
    assert run.returncode == 0, run.stdout[-3000:]
    assert "session Tansu had died (exit -9)" in run.stdout


def test_consume_all_returns_short_on_timeout(kafka: Any, unique_topic: str) -> None:
    create_topics(kafka, [unique_topic])
    _produce(kafka, unique_topic, 3)
    assert len(consume_all(kafka, unique_topic, expect_n=10, timeout=1.5)) == 3


def test_kafka_restart_on_same_port(kafka_factory: Any) -> None:
    """Tansu keeps data in memory: after a restart the topic is empty but the port is the same."""
    broker = kafka_factory()
    bootstrap = broker.bootstrap
    with TopicRecorder(broker, ["outage"]) as recorder:
        _produce(broker, "outage", 5)
        recorder.wait_count(5, timeout=20)
        broker.kill()
        assert not broker.alive
        broker.start()
        assert broker.bootstrap == bootstrap
        create_topics(broker, ["outage"])
        _produce(broker, "outage", 3)
        # The recorder rewinds after the restart and sees the new records too.
        records = recorder.wait_count(8, timeout=30)
    assert len(records) == 8
    assert len(read_topic(broker, "outage")) == 3  # the old 5 are gone with the old process


def test_kafka_tls_through_stunnel(tls_kafka: Any) -> None:
    conf = tls_kafka.client_config()
    assert conf["security.protocol"] == "SSL"
    create_topics(conf, ["secure"])
    _produce(conf, "secure", 10)
    assert len(consume_all(conf, "secure", expect_n=10, timeout=30)) == 10


def test_stunnel_refuses_plaintext(tls_kafka: Any) -> None:
    """The TLS port really is TLS: a PLAINTEXT client gets no metadata through it."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": tls_kafka.bootstrap})
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=3)


def _inner_pytest_env() -> dict[str, str]:
    """Environment for a pytest run inside a test: our conftest as a plugin, private brokers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_TEST_")}
    return {**env, "PYTHONPATH": str(REPO / "tests")}


def test_a_failed_test_shows_its_broker_and_agent_logs(tmp_path: Path) -> None:
    """Debugging a red wire test starts with the broker's and the child's own words."""
    (tmp_path / "test_fails.py").write_text(
        "def test_fails(mqtt_broker, agent_process, tmp_path):\n"
        "    agent_process(['check-config', '-c', str(tmp_path / 'missing.yaml')]).wait_exit(30)\n"
        "    assert False, 'deliberate'\n"
        "def test_passes(mqtt_broker):\n"
        "    pass\n")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                          str(tmp_path / "test_fails.py")], check=False, cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env=_inner_pytest_env())
    assert run.returncode == 1, run.stdout[-3000:]
    assert "1 failed, 1 passed" in run.stdout
    assert run.stdout.count("----- mosquitto log") == 1  # only for the failed test
    assert "mosquitto version 2." in run.stdout
    assert "----- edge-agent #0 check-config -c" in run.stdout and "(file): cannot read" in run.stdout


# --- helpers ---------------------------------------------------------------------------------

def test_wait_for_returns_value_and_times_out() -> None:
    assert wait_for(lambda: 42, timeout=1) == 42
    with pytest.raises(AssertionError, match="timed out after 0.1s waiting for: never"):
        wait_for(lambda: False, timeout=0.1, message="never")


def test_free_port_is_bindable() -> None:
    import socket

    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50  # never handed out twice
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert all(p < low for p in ports)  # outgoing connections can never take them
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[0]))


def test_agent_process_runs_cli_and_is_killed(tmp_path: Path, agent_process: Any) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("device_id: gw\nbogus_key: 1\n")
    proc = agent_process(["check-config", "-c", str(bad)])
    assert proc.wait_exit(30) == 2
    assert "bogus_key: unknown key" in proc.output()

    # A long-running child in its own group: stop() ends the whole group.
    sleeper = AgentProcess([], tmp_path / "sleep.log")
    sleeper.argv = ["bash", "-c", "sleep 300 & sleep 300; wait"]
    sleeper.start()
    assert sleeper.alive
    with pytest.raises(AssertionError, match="still running after 0.1s"):
        sleeper.wait_exit(0.1)
    assert sleeper.kill() == -9
    assert not sleeper.alive


def test_agent_process_kills_the_whole_group(tmp_path: Path) -> None:
    """Grandchildren die too: a killed daemon must not leave a helper holding a port."""
    pidfile = tmp_path / "grandchild.pid"
    proc = AgentProcess([], tmp_path / "group.log")
    proc.argv = ["bash", "-c", f"sleep 300 & echo $! > {pidfile}; wait"]
    proc.start()
    grandchild = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, message="pid file"))
    proc.stop(timeout=5)
    wait_for(lambda: _gone(grandchild), 10, message=f"grandchild {grandchild} gone")


@pytest.mark.timeout(60)
def test_brokers_die_with_a_killed_test_process(tmp_path: Path) -> None:
    """A pytest killed by `timeout` runs no finalizers; its brokers must not outlive it."""
    script = (
        "import sys, time; from pathlib import Path;"
        "from edge_testkit.mqtt import start_mosquitto;"
        "b = start_mosquitto(Path(sys.argv[2])); print(b.process.pid, flush=True); time.sleep(300)"
    )
    holder = subprocess.Popen([sys.executable, "-c", script, str(REPO / "tests"), str(tmp_path / "m")],
                              stdout=subprocess.PIPE, text=True)
    try:
        broker_pid = int(holder.stdout.readline())  # type: ignore[union-attr]
        assert not _gone(broker_pid)
        holder.kill()
        wait_for(lambda: _gone(broker_pid), 10, message=f"mosquitto {broker_pid} gone with its test process")
    finally:
        holder.kill()
        holder.wait(10)


def _gone(pid: int) -> bool:
    """Dead or a zombie (reaping orphans is PID 1's job, not ours)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


# --- shared data -----------------------------------------------------------------------------

def test_model_and_footage_fixtures(model_path: Path, footage: Any) -> None:
    import cv2
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    clip = footage("PETS09-S2L1")
    cap = cv2.VideoCapture(str(clip))
    try:
        ok, frame = cap.read()
    finally:
        cap.release()
    assert ok and frame.shape == (576, 768, 3)
    # Never committed: the model and footage stay outside the repository.
    assert REPO not in model_path.parents and REPO not in clip.parents


def test_missing_footage_skips(footage: Any) -> None:
    with pytest.raises(pytest.skip.Exception, match="footage no-such-clip missing"):
        footage("no-such-clip")


# --- install and CI plumbing -----------------------------------------------------------------

def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test   #" in readme and "make demo   #" in readme
    assert "set -euo pipefail" in ci
    assert ci.strip().splitlines()[-1] == "make test"
    assert os.access(REPO / ".ci" / "run", os.X_OK)


def test_make_test_sets_up_then_runs_the_whole_suite() -> None:
    dry = subprocess.run(["make", "--no-print-directory", "-n", "test"], check=False, cwd=REPO, capture_output=True, text=True, timeout=30)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == ["scripts/setup_env.sh", "env -u MAKELEVEL -u MAKEFLAGS -u MFLAGS .venv/bin/pytest -q"]


@pytest.mark.timeout(600)
def test_setup_env_is_idempotent() -> None:
    """Run twice (as `make test` does every time): both succeed, the second changes nothing."""
    for _ in range(2):
        run = subprocess.run(["bash", "scripts/setup_env.sh"], check=False, cwd=REPO, capture_output=True, text=True, timeout=540)
        assert run.returncode == 0, run.stderr
    assert "installing" not in run.stdout  # Debian packages already there: apt was not touched
    assert run.stdout.strip().startswith("setup_env: ready (Python 3.1")
