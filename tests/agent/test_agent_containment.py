"""Fault containment on the agent: no input stops it, nothing accepted is lost, health tells the truth.

Over a real Mosquitto, with a small acker standing in for the bridge. The agent runs as a
child process where the test only feeds it input, and in-process (``daemon.Agent``) where
the test kills one of its threads from inside to watch the supervision and the health.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from test_uplink import DEVICE, start_agent

from edge_agent.agent import daemon
from edge_agent.agent.config import AgentConfig, parse_agent
from edge_agent.agent.outbox import OutboxDiskFull
from edge_agent.agent.worker import CameraWorker
from edge_agent.common import metrics
from edge_agent.common.envelope import MAX_MESSAGE_BYTES, Draft
from edge_agent.common.supervised import SupervisedThread
from edge_agent.vision.config import CameraConfig, ModelConfig
from edge_agent.vision.count import Crossing
from edge_testkit.agent import AgentApi, write_agent_config
from edge_testkit.processes import free_port, wait_for

pytestmark = pytest.mark.timeout(240)


def publish_raw(broker, topic: str, payload: bytes) -> None:
    """One QoS 1 publish from a throw-away client (a hostile or buggy peer)."""
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()


def uplink_thread(api: AgentApi) -> dict:
    return api.status()["mqtt"]["thread"]


def delivered(acker, ids: set[str]) -> Callable[[], bool]:
    return lambda: ids <= {e["id"] for e in acker.envelopes()}


def connected_agent(tmp_path: Path, mosquitto, agent_process, acker_factory) -> tuple[Any, Any, Any, AgentApi]:
    """A broker, an acker and an agent process connected to it: (broker, acker, process, api)."""
    broker = mosquitto()
    acker = acker_factory(broker)
    cfg, port = write_agent_config(tmp_path, broker)
    proc, api = start_agent(agent_process, cfg, port)
    wait_for(lambda: api.status()["mqtt"]["connected"], 20, message="agent connected")
    return broker, acker, proc, api


# --- inputs that used to end the uplink ------------------------------------------------------

def test_a_nested_ack_does_not_stop_the_uplink(tmp_path, mosquitto, agent_process, acker_factory):
    broker, acker, proc, api = connected_agent(tmp_path, mosquitto, agent_process, acker_factory)
    for poison in (b"[" * 3000, b'{"a":' * 3000, b'{"seq": ' + b"[" * 5000 + b"]" * 5000 + b"}", b"\xff\xfe",
                   json.dumps({"seq": [[1, 10**30]]}).encode()):
        publish_raw(broker, f"edge/{DEVICE}/ack", poison)
    ids = {api.publish("notifications", {"type": "after.poison", "i": i}).json()["messageId"] for i in range(20)}
    wait_for(delivered(acker, ids), 30, message="publishes after the poison acks delivered")
    wait_for(lambda: api.status()["outbox"]["depth"] == 0, 30, message="all acked")
    assert uplink_thread(api) == {"state": "running", "restarts": 0, "last_error": None}
    assert "malformed ack ignored" in proc.output()


def test_a_damaged_outbox_row_does_not_stop_the_uplink(tmp_path, mosquitto, agent_process, acker_factory):
    broker, acker, proc, api = connected_agent(tmp_path, mosquitto, agent_process, acker_factory)
    broker.stop()  # the entries stay unsent until we have damaged one of them on disk
    wait_for(lambda: not api.status()["mqtt"]["connected"], 20, message="agent disconnected")
    answers = [api.publish("notifications", {"type": "kept", "i": i}).json() for i in range(6)]
    victim = answers[2]
    with sqlite3.connect(tmp_path / "outbox" / "cache.db", timeout=10) as db:
        db.execute("UPDATE Cache SET mode = 4, value = ? WHERE key = ?", (b"\x80\x05damaged", victim["seq"]))
    broker.start()
    ids = {a["messageId"] for a in answers} - {victim["messageId"]}
    wait_for(delivered(acker, ids), 30, message="the undamaged entries delivered")
    after = api.publish("notifications", {"type": "after.damage"}).json()["messageId"]
    wait_for(delivered(acker, {after}), 30, message="a publish after the damage delivered")
    assert victim["messageId"] not in {e["id"] for e in acker.envelopes()}
    assert uplink_thread(api)["restarts"] == 0
    assert api.metric('edge_outbox_dropped_total{reason="unreadable",stream="notifications"}') == 1
    assert f"outbox entry {victim['seq']} (notifications) is unreadable and dropped" in proc.output()


# --- one bad input fails alone ---------------------------------------------------------------

BAD_BODIES = [
    {"topic": "notifications", "message": {"type": "t" * 200}},
    {"topic": "notifications", "message": {"type": "x", "trace_id": "ABCDEF0123456789ABCDEF0123456789"}},
    {"topic": "notifications", "message": {"camera_id": "c" * 300}},
    {"topic": "notifications", "message": {"pad": "x" * (MAX_MESSAGE_BYTES - 100)}},
    {"topic": "dlq", "message": {}},
]


def send_bad(port: int, i: int) -> int:
    """One bad request of several kinds: envelope rules, sizes, framing. Returns the status code."""
    kind = i % (len(BAD_BODIES) + 2)
    if kind < len(BAD_BODIES):
        return httpx.post(f"http://127.0.0.1:{port}/api/v1/queue/publish", json=BAD_BODIES[kind], timeout=30).status_code
    framing = b"Content-Length: -1\r\n" if kind == len(BAD_BODIES) else b"Content-Length: abc\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /api/v1/queue/publish HTTP/1.1\r\nHost: a\r\n" + framing + b"\r\n")
        return int(s.recv(4096).split(b" ", 2)[1])


def test_concurrent_good_and_bad_publishes_fail_alone(tmp_path, mosquitto, agent_process, acker_factory):
    broker, acker, proc, api = connected_agent(tmp_path, mosquitto, agent_process, acker_factory)
    port = api.http.base_url.port
    stop = threading.Event()
    bad_codes: list[int] = []

    def bad_client() -> None:
        i = 0
        while not stop.is_set():
            bad_codes.append(send_bad(port, i))
            i += 1

    def good_client(c: int) -> list[str]:
        out = []
        for i in range(60):
            r = api.publish(["notifications", "camera.events", "ai.inference.results"][i % 3],
                            {"type": "good", "client": c, "i": i})
            assert r.status_code == 200, r.text
            out.append(r.json()["messageId"])
        return out

    with ThreadPoolExecutor(8) as ex:
        bad = ex.submit(bad_client)
        goods = [ex.submit(good_client, c) for c in range(7)]
        ids = {i for f in goods for i in f.result(timeout=120)}
        stop.set()
        bad.result(timeout=60)
    assert len(ids) == 7 * 60
    assert bad_codes and all(400 <= c < 500 for c in bad_codes), sorted(set(bad_codes))
    assert {400, 413} <= set(bad_codes)
    wait_for(delivered(acker, ids), 60, message="every good publish delivered")
    wait_for(lambda: api.status()["outbox"]["depth"] == 0, 30, message="every good publish acked")
    assert proc.alive


# --- threads killed from inside: supervision and health --------------------------------------

def in_process_agent(tmp_path: Path, broker, **extra: Any) -> daemon.Agent:
    cfg = parse_agent({"device_id": DEVICE, "outbox": {"path": str(tmp_path / "outbox")},
                       "mqtt": {"host": broker.host, "port": broker.port, "ack_timeout_s": 2, "reconnect_min_s": 0.1,
                                "reconnect_max_s": 1},
                       "http": {"listen": f"127.0.0.1:{free_port()}"}, "commands": {"enabled": False}, **extra})
    return daemon.Agent(cfg)


def quick_to_give_up(thread: SupervisedThread, max_restarts: int) -> None:
    """Shorter backoff and budget than production, so a test sees 'dead' in well under a second."""
    thread._backoff_min_s, thread._backoff_max_s, thread._max_restarts = 0.02, 0.05, max_restarts


class Pings:
    """Collects what the daemon tells systemd (the notify socket stands in)."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def notify(self, state: str) -> None:
        self.sent.append(state)

    def watchdog(self) -> int:
        return self.sent.count("WATCHDOG=1")


@pytest.fixture
def agents(monkeypatch):
    monkeypatch.setattr(daemon, "TICK_S", 0.01)
    monkeypatch.setenv("WATCHDOG_USEC", "40000")  # ping every 0.02 s
    made: list[tuple[daemon.Agent, threading.Thread | None]] = []

    def make(tmp_path: Path, broker, *, main_loop: bool = False) -> tuple[daemon.Agent, AgentApi, Pings]:
        agent = in_process_agent(tmp_path, broker)
        pings = Pings()
        agent._notify = pings
        agent.start()
        loop = threading.Thread(target=agent.run_until_stopped, daemon=True) if main_loop else None
        if loop is not None:
            loop.start()
        made.append((agent, loop))
        return agent, AgentApi(agent.http.port), pings

    yield make
    for agent, loop in made:
        agent.stop_requested.set()
        if loop is not None:
            loop.join(5)
        if not agent.outbox._closed:
            agent.shutdown("test")


def crash(times: int | None, original: Callable[[], None]) -> Callable[[], None]:
    """A body that raises the first ``times`` runs (always when None), then runs ``original``."""
    runs = {"n": 0}

    def body() -> None:
        runs["n"] += 1
        if times is None or runs["n"] <= times:
            raise RuntimeError(f"killed from the test (run {runs['n']})")
        original()

    return body


def test_an_uplink_killed_from_inside_restarts_and_delivers(tmp_path, mosquitto, acker_factory, agents):
    broker = mosquitto()
    acker = acker_factory(broker)
    agent, api, _ = agents(tmp_path, broker)
    wait_for(lambda: agent.uplink.connected, 20, message="uplink connected")
    ids = {api.publish("notifications", {"i": i}).json()["messageId"] for i in range(5)}
    wait_for(delivered(acker, ids), 20, message="first publishes delivered")
    agent.uplink._serve_connection = crash(2, agent.uplink._serve_connection)  # the next two connections crash
    agent.uplink._client.disconnect()  # end the current one, so the crashing body runs
    wait_for(lambda: agent.uplink.thread.restarts >= 2 and agent.uplink.connected, 30,
             message=lambda: f"uplink restarted twice and reconnected: {agent.uplink.thread.report()}")
    assert api.http.get("/healthz").status_code == 200  # restarting is not dead
    more = {api.publish("notifications", {"j": i}).json()["messageId"] for i in range(5)}
    wait_for(delivered(acker, more), 20, message="publishes after the restarts delivered")
    wait_for(lambda: api.status()["outbox"]["depth"] == 0, 20, message="all acked")
    assert "killed from the test" in api.status()["mqtt"]["thread"]["last_error"]


def test_an_uplink_that_cannot_restart_turns_health_503_stops_the_watchdog_and_a_restart_recovers(
        tmp_path, mosquitto, acker_factory, agents):
    broker = mosquitto()
    acker = acker_factory(broker)
    agent, api, pings = agents(tmp_path, broker, main_loop=True)
    wait_for(lambda: agent.uplink.connected and pings.watchdog() >= 2, 20, message="connected and pinging")
    quick_to_give_up(agent.uplink.thread, max_restarts=2)
    agent.uplink._serve_connection = crash(None, agent.uplink._serve_connection)
    agent.uplink._client.disconnect()
    wait_for(lambda: api.http.get("/healthz").status_code == 503, 20, message="/healthz 503")
    body = api.http.get("/healthz").json()
    assert body["dead"] == ["uplink"] and "killed from the test" in body["parts"]["uplink"]["last_error"]
    assert api.status()["health"]["parts"]["uplink"]["state"] == "dead"
    # Publishes are still taken durably; they wait in the outbox for the restarted process.
    waiting = {api.publish("notifications", {"k": i}).json()["messageId"] for i in range(5)}
    n = pings.watchdog()
    ticks = agent.supervisor.check
    counted = {"n": 0}
    agent.supervisor.check = lambda: (counted.__setitem__("n", counted["n"] + 1), ticks())[1]
    wait_for(lambda: counted["n"] >= 20, 10, message="main loop ticks")
    assert pings.watchdog() == n  # no ping while a part is dead: systemd restarts the process
    agent.stop_requested.set()
    agent.shutdown("test")
    # systemd's restart: a fresh process on the same outbox delivers what waited.
    again, api2, _ = agents(tmp_path, broker)
    assert api2.http.get("/healthz").status_code == 200
    wait_for(delivered(acker, waiting), 30, message="what waited is delivered after the restart")


def test_the_http_server_thread_restarts_and_a_dead_one_is_reported(tmp_path, mosquitto, agents):
    broker = mosquitto()
    agent, api, pings = agents(tmp_path, broker, main_loop=True)
    server = agent.http.server
    original = server.service_actions
    server.service_actions = crash(2, original)  # serve_forever calls it every turn: it raises twice
    wait_for(lambda: agent.http.thread.restarts == 2 and agent.http.thread.state == "running", 20,
             message=lambda: f"http restarted: {agent.http.thread.report()}")
    assert api.publish("notifications", {"after": "restart"}).status_code == 200
    quick_to_give_up(agent.http.thread, max_restarts=3)
    server.service_actions = crash(None, original)
    wait_for(lambda: agent.health.dead() == ["agent-http"], 20, message="agent-http dead")
    n = pings.watchdog()
    wait_for(lambda: agent.health.healthz()[0] == 503, 5)
    counted = {"n": 0}
    ticks = agent.supervisor.check
    agent.supervisor.check = lambda: (counted.__setitem__("n", counted["n"] + 1), ticks())[1]
    wait_for(lambda: counted["n"] >= 20, 10, message="main loop ticks")
    assert pings.watchdog() == n


def test_a_crashed_outbox_writer_fails_only_its_batch_and_restarts(tmp_path, mosquitto, agents):
    broker = mosquitto()
    agent, api, _ = agents(tmp_path, broker)
    box = agent.outbox
    box._apply_deletes = crash(1, box._apply_deletes)
    r = api.publish("notifications", {"first": True})
    assert r.status_code == 503 and "outbox" in r.json()["error"], r.text
    wait_for(lambda: box.thread.restarts == 1 and box.thread.state == "running", 10,
             message=lambda: f"writer restarted: {box.thread.report()}")
    assert api.publish("notifications", {"second": True}).status_code == 200
    assert api.http.get("/healthz").status_code == 200


# --- a camera's events when the outbox cannot take them --------------------------------------

class _NoDetector:
    names = ["person"]


def test_a_camera_event_the_outbox_refuses_is_counted_and_its_crossing_reaches_the_next_report(tmp_path):
    camera = CameraConfig(id="cam-full", source=str(tmp_path / "none.avi"),
                          lines=[{"id": "door", "points": [[0.5, 0], [0.5, 1]]}])
    stored: list[Draft] = []
    disk_full = {"on": True}

    def emit(draft: Draft) -> None:
        if disk_full["on"]:
            raise OutboxDiskFull("disk full")
        stored.append(draft)

    worker = CameraWorker(camera, ModelConfig(), emit, device_id="gw-1", report_interval_s=60,
                          state_dir=tmp_path, detector=_NoDetector())
    dropped = metrics.OUTBOX_DROPPED.labels(stream="ai.inference.results", reason="disk_full")
    before = dropped._value.get()
    worker._record_crossings([Crossing("door", "in", "person", 7, 1, 0.0)])
    worker.flush_report()  # refused too: its counts go back into the running interval
    assert dropped._value.get() - before == 2 and not stored
    disk_full["on"] = False
    worker._record_crossings([Crossing("door", "in", "person", 8, 2, 0.0)])
    worker.flush_report()
    report = [d for d in stored if d.type == "counting.interval"][-1]
    assert report.data["lines"]["door"]["in"] == 2  # the refused crossing is still in the interval
    assert report.data["lines"]["door"]["cumulative"]["in"] == 2


def test_defaults_keep_the_agent_bound_at_the_bridge_limit() -> None:
    cfg = AgentConfig(device_id="gw-1")
    assert cfg.outbox.max_message_bytes == MAX_MESSAGE_BYTES
    assert cfg.http.max_connections == 64 and cfg.http.read_timeout_s == 10
