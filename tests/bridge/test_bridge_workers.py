"""``workers: N``: worker processes in one share group under the daemon, over the real wire."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.bridge.config import MAX_WORKERS, BridgeConfig, parse_bridge, worker_client_id
from edge_agent.bridge.daemon import run_bridge
from edge_agent.bridge.supervisor import WorkerProcesses, worker_config
from edge_agent.common.config import ConfigError
from edge_agent.common.supervised import Health
from edge_testkit.processes import free_port, wait_for
from test_bridge_wire import bridge_config, bridge_process, seqs_in_kafka, write_config


def with_workers(cfg: BridgeConfig, workers: int) -> BridgeConfig:
    return cfg.model_copy(update={"workers": workers,
                                  "http": cfg.http.model_copy(update={"listen": f"127.0.0.1:{free_port()}"})})


def join_share_group(cfg: BridgeConfig, client_id: str, subscription: str) -> None:
    """Make a worker's persistent session, subscribed, as its first run would: the broker queues its share."""
    subscribed = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    client.on_subscribe = lambda *_: subscribed.set()
    client.connect(cfg.mqtt.host, cfg.mqtt.port)
    client.loop_start()
    client.subscribe(subscription, qos=1)
    wait_for(subscribed.is_set, 10, message=f"SUBACK for {client_id}")
    client.disconnect()
    client.loop_stop()


def get(cfg: BridgeConfig, path: str) -> httpx.Response:
    host, port = cfg.http.host_port
    return httpx.get(f"http://{host}:{port}{path}", timeout=10)


def child_pid(cfg: BridgeConfig, worker: int) -> int | None:
    return get(cfg, "/healthz").json()["parts"][f"bridge-worker-{worker}"]["pid"]


def test_worker_client_ids_keep_the_first_workers_session() -> None:
    assert [worker_client_id("bridge-1", 3, i) for i in range(3)] == ["bridge-1", "bridge-1-w2", "bridge-1-w3"]
    with pytest.raises(ValueError):
        worker_client_id("bridge-1", 2, 2)


def test_two_workers_drain_a_backlog_and_serve_one_health_and_metrics_page(
        mqtt_broker: Any, kafka: Any, device_factory: Any, agent_process: Any, tmp_path: Path) -> None:
    cfg = with_workers(bridge_config(mqtt_broker, kafka), 2)
    subscription = f"$share/{cfg.mqtt.share_group}/{cfg.mqtt.topic_prefix}/+/up/#"
    for i in range(2):
        join_share_group(cfg, worker_config(cfg, i).mqtt.client_id, subscription)
    dev = device_factory(cfg)
    n = 2000
    for seq in range(1, n + 1):
        dev.send(seq)
    dev.wait_published(60)  # the backlog: Mosquitto queued half of it for each worker's session

    bridge_process(agent_process, write_config(cfg, tmp_path / "bridge.yaml"))
    dev.wait_acked(set(range(1, n + 1)), timeout=120)
    assert seqs_in_kafka(kafka, cfg.topics["camera.events"], set(range(1, n + 1))) >= set(range(1, n + 1))

    health = get(cfg, "/healthz").json()
    assert health["status"] == "ok"
    assert health["parts"]["bridge-worker-2"]["state"] == "running"
    assert child_pid(cfg, 2) not in (None, os.getpid())
    page = get(cfg, "/metrics").text
    # One page for both processes: the counters are summed, the in-flight gauge too (livesum).
    produced = [line for line in page.splitlines() if line.startswith("edge_bridge_produced_total{")]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in produced) >= n
    inflight = [line for line in page.splitlines() if line.startswith("edge_bridge_inflight")]
    assert len(inflight) == 1 and "pid=" not in inflight[0], inflight


def test_a_killed_worker_is_restarted_and_its_share_still_reaches_kafka(
        mqtt_broker: Any, kafka: Any, device_factory: Any, agent_process: Any, tmp_path: Path) -> None:
    cfg = with_workers(bridge_config(mqtt_broker, kafka), 2)
    bridge_process(agent_process, write_config(cfg, tmp_path / "bridge.yaml"))
    first = wait_for(lambda: child_pid(cfg, 2), 30, message="worker 2 runs")
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: child_pid(cfg, 2) not in (None, first), 30, message="worker 2 started again")
    part = get(cfg, "/healthz").json()["parts"]["bridge-worker-2"]
    assert (part["state"], part["restarts"]) == ("running", 1)
    assert "exited with code -9" in part["last_error"]

    dev = device_factory(cfg)
    for seq in range(1, 501):
        dev.send(seq)
    dev.wait_acked(set(range(1, 501)), timeout=60)  # half of them went through the restarted worker's session


def test_a_worker_that_keeps_dying_is_reported_dead(mqtt_broker: Any, kafka: Any) -> None:
    cfg = with_workers(bridge_config(mqtt_broker, kafka), 2)
    health = Health()
    workers = WorkerProcesses(cfg, health, restart_backoff_s=0.05, max_restarts=1)
    workers.start()
    try:
        for _ in range(2):
            pid = wait_for(lambda: health.report()["bridge-worker-2"]["pid"], 30, message="worker 2 runs")
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: health.report()["bridge-worker-2"]["pid"] != pid, 30, message="worker 2 gone")
        wait_for(lambda: health.dead() == ["bridge-worker-2"], 30, message="worker 2 reported dead")
        assert health.healthz()[0] == 503
    finally:
        assert workers.stop(timeout=30)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.one_of(st.integers(-10, 200), st.floats(allow_nan=True), st.text(max_size=8), st.none(),
                       st.lists(st.integers(), max_size=2)))
def test_any_workers_value_is_taken_or_refused_with_its_field_path(
        tmp_path: Path, capsys: pytest.CaptureFixture, value: Any) -> None:
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump({"workers": value}))
    try:
        cfg = parse_bridge({"workers": value})
    except ConfigError:
        assert run_bridge(path) == 2  # the daemon refuses it before starting anything
        assert "workers" in capsys.readouterr().err
        return
    assert 1 <= cfg.workers <= MAX_WORKERS
    ids = {worker_config(cfg, i).mqtt.client_id for i in range(cfg.workers)}
    assert len(ids) == cfg.workers  # one session each
