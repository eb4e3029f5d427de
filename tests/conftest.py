"""Fixtures: real brokers (Mosquitto, Tansu, stunnel), shared model/footage, agent child processes.

Every fixture that starts something stops it in its finalizer, also when the test fails.
Env overrides:
  EDGE_TEST_MQTT=host:port   use that (plain, anonymous) broker; TLS/ACL/restart tests skip
  EDGE_TEST_KAFKA=host:port  use that Kafka (+ EDGE_TEST_KAFKA_SECURITY_PROTOCOL, _SASL_MECHANISM,
                             _USERNAME, _PASSWORD, _CA); broker restart tests skip
  EDGE_SHARED_DIR            where models/ and footage/ live (default <repo>/../shared)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_testkit.kafka import ExternalKafka, TansuBroker, TlsKafka, start_tls_kafka
from edge_testkit.mqtt import ExternalMqtt, MosquittoBroker, start_mosquitto
from edge_testkit.processes import AgentProcess, ManagedProcess, parse_host_port
from edge_testkit.processes import shared_dir as _shared_dir
from edge_testkit.tls import Pki, start_stunnel


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the item so fixtures can tell at teardown whether the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    report = getattr(request.node, "rep_call", None)
    return report is None or report.failed  # no call report: setup failed


def _dump_on_failure(request: pytest.FixtureRequest, name: str, text: str, tail: int = 4000) -> None:
    """Print a process's log tail at teardown of a failed test (pytest shows it under 'Captured stdout teardown')."""
    if _failed(request) and text:
        print(f"----- {name} (last {tail} chars) -----\n{text[-tail:]}")


def _external_mqtt() -> ExternalMqtt | None:
    value = os.environ.get("EDGE_TEST_MQTT")
    return ExternalMqtt(*parse_host_port(value)) if value else None


# --- TLS material ----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """One CA + server cert for the whole session (RSA keygen is slow-ish); client certs on demand."""
    return Pki(tmp_path_factory.mktemp("pki"))


# --- Mosquitto -------------------------------------------------------------------------------

@pytest.fixture
def mosquitto(tmp_path: Path, pki: Pki, request: pytest.FixtureRequest) -> Iterator[Callable[..., MosquittoBroker]]:
    """Factory: ``mosquitto(tls=…, require_certificate=…, passwords=…, acl=…, allow_anonymous=…, extra_conf=…)``.

    Each call starts a new broker on free ports; all are stopped after the test.
    Skips when EDGE_TEST_MQTT names an external broker (it cannot be configured).
    """
    if _external_mqtt() is not None:
        pytest.skip("EDGE_TEST_MQTT is set: tests that configure their own Mosquitto are skipped")
    started: list[MosquittoBroker] = []

    def factory(**kwargs: Any) -> MosquittoBroker:
        kwargs.setdefault("pki", pki)
        broker = start_mosquitto(tmp_path / f"mosquitto-{len(started)}", **kwargs)
        started.append(broker)
        return broker

    yield factory
    for i, broker in enumerate(started):
        broker.kill()
        _dump_on_failure(request, f"mosquitto #{i} log", broker.log_text())


@pytest.fixture
def mqtt_broker(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[MosquittoBroker | ExternalMqtt]:
    """A plain anonymous broker for this test (or EDGE_TEST_MQTT's)."""
    external = _external_mqtt()
    if external is not None:
        yield external
        return
    broker = start_mosquitto(tmp_path / "mosquitto")
    yield broker
    broker.kill()
    _dump_on_failure(request, "mosquitto log", broker.log_text())


# --- Kafka (Tansu) ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuBroker | ExternalKafka]:
    """One Kafka-protocol broker for the session: Tansu, or EDGE_TEST_KAFKA's cluster.

    Shared: use unique topic names per test (e.g. ``unique_topic``). Never stop it
    in a test; use ``kafka_factory`` for outage tests.
    """
    if os.environ.get("EDGE_TEST_KAFKA"):
        yield ExternalKafka.from_env()
        return
    broker = TansuBroker(tmp_path_factory.mktemp("tansu")).start()
    yield broker
    broker.kill()


@pytest.fixture(autouse=True)
def _session_kafka_alive(request: pytest.FixtureRequest) -> None:
    """A session Tansu that died (crash, or a test that killed it by mistake) is restarted on
    its port before the next test that uses it, instead of failing every later Kafka test."""
    if "kafka" not in request.fixturenames:
        return
    broker = request.getfixturevalue("kafka")
    if isinstance(broker, TansuBroker) and not broker.alive:
        print(f"session Tansu had died (exit {broker.process.returncode}); restarting it empty:\n"
              f"{broker.log_text()[-2000:]}")
        broker.start()


@pytest.fixture
def kafka_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[[], TansuBroker]]:
    """Factory of private Tansu brokers a test may stop/kill/restart (same port). Skips on EDGE_TEST_KAFKA."""
    if os.environ.get("EDGE_TEST_KAFKA"):
        pytest.skip("EDGE_TEST_KAFKA is set: broker restart tests need a private Tansu")
    started: list[TansuBroker] = []

    def factory() -> TansuBroker:
        broker = TansuBroker(tmp_path / f"tansu-{len(started)}").start()
        started.append(broker)
        return broker

    yield factory
    for i, broker in enumerate(started):
        broker.kill()
        _dump_on_failure(request, f"tansu #{i} log", broker.log_text())


@pytest.fixture
def tls_kafka(tmp_path: Path, pki: Pki, request: pytest.FixtureRequest) -> Iterator[TlsKafka]:
    """Tansu behind stunnel (SSL listener, CA at ``.ca_path``). Skips on EDGE_TEST_KAFKA."""
    if os.environ.get("EDGE_TEST_KAFKA"):
        pytest.skip("EDGE_TEST_KAFKA is set: the stunnel setup needs a private Tansu")
    tls = start_tls_kafka(tmp_path / "tls-kafka", pki)
    yield tls
    tls.stunnel.kill()
    tls.tansu.kill()
    _dump_on_failure(request, "stunnel log", tls.stunnel.output())
    _dump_on_failure(request, "tansu log", tls.tansu.log_text())


@pytest.fixture
def stunnel(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., ManagedProcess]]:
    """Factory: ``stunnel(accept_port, "host:port", cert, key)``; all stopped after the test."""
    started: list[ManagedProcess] = []

    def factory(accept_port: int, connect_host_port: str, cert: Path, key: Path) -> ManagedProcess:
        proc = start_stunnel(tmp_path / "stunnel", accept_port, connect_host_port, cert, key)
        started.append(proc)
        return proc

    yield factory
    for i, proc in enumerate(started):
        proc.kill()
        _dump_on_failure(request, f"stunnel #{i} log", proc.output())


@pytest.fixture
def unique_topic(request: pytest.FixtureRequest) -> str:
    """A topic name no other test uses on the shared broker."""
    import uuid

    return f"t-{request.node.name[:40].replace('[', '-').replace(']', '')}-{uuid.uuid4().hex[:8]}"


# --- shared model and footage ----------------------------------------------------------------

@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = _shared_dir()
    if not path.is_dir():
        pytest.skip(f"shared dir {path} missing (set EDGE_SHARED_DIR)")
    return path


@pytest.fixture(scope="session")
def model_path(shared_dir: Path) -> Path:
    path = shared_dir / "models" / "yolox_nano.onnx"
    if not path.is_file():
        pytest.skip(f"model {path} missing")
    return path


@pytest.fixture(scope="session")
def footage(shared_dir: Path) -> Callable[[str], Path]:
    """``footage("PETS09-S2L1")`` -> the clip's video file (``.avi``/``.mp4`` in its folder); skips if missing."""
    def find(name: str) -> Path:
        folder = shared_dir / "footage" / name
        videos = sorted(p for p in folder.glob(f"{name}.*") if p.suffix.lower() in {".avi", ".mp4", ".mkv"})
        if not videos:
            pytest.skip(f"footage {name} missing under {shared_dir / 'footage'}")
        return videos[0]

    return find


# --- edge-agent child processes --------------------------------------------------------------

@pytest.fixture
def agent_process(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., AgentProcess]]:
    """Factory: ``agent_process(["run", "-c", cfg], env={...})`` -> started AgentProcess.

    Output goes to a file (``.output()``); every process is killed after the test.
    Pass ``start=False`` to get it unstarted.
    """
    started: list[AgentProcess] = []

    def factory(args: list[str], env: dict[str, str] | None = None, *, start: bool = True) -> AgentProcess:
        proc = AgentProcess(args, tmp_path / f"edge-agent-{len(started)}.log", env=env)
        started.append(proc)
        return proc.start() if start else proc

    yield factory
    for i, proc in enumerate(started):
        proc.kill()
        _dump_on_failure(request, f"edge-agent #{i} {' '.join(proc.argv[3:])} output", proc.output())
