"""RabbitMQ for tests: a private node of Debian's ``rabbitmq-server``, or one the environment names.

A private node has its own node name, AMQP and distribution ports, data and log directories
and Erlang cookie (``HOME`` is its directory), so it neither sees nor disturbs a RabbitMQ the
machine already runs. Its default user ``guest``/``guest`` may log in from anywhere; tests that
need a named user with a password create one (``add_user``). ``EDGE_TEST_AMQP=amqp://user@host:port/vhost``
with ``EDGE_TEST_AMQP_PASSWORD`` points the tests at an existing broker instead; tests that would
stop, kill or alarm it skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from edge_testkit.processes import ExternalService, LocalService, ManagedProcess, free_port
from edge_testkit.tls import Pki

RABBITMQ_LIB = Path("/usr/lib/rabbitmq/bin")  # Debian: the scripts that do not switch to the rabbitmq user


def rabbitmq_installed() -> bool:
    return (RABBITMQ_LIB / "rabbitmq-server").exists() or shutil.which("rabbitmq-server") is not None


def _script(name: str) -> str:
    local = RABBITMQ_LIB / name
    return str(local) if local.exists() else (shutil.which(name) or name)


class RabbitNode(LocalService):
    """A private RabbitMQ node on free ports; ``tls=True`` adds an AMQPS listener with a throw-away CA."""

    host = "127.0.0.1"
    external = False
    restartable = True

    def __init__(self, workdir: Path, *, tls: bool = False):
        self.dir = Path(workdir).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.dist_port = free_port()
        self.tls_port = free_port() if tls else None
        self.pki = Pki(self.dir / "pki") if tls else None
        self.node = f"edgetest{self.port}@localhost"
        self.vhost = "/"
        self.username, self.password = "guest", "guest"
        self._write_config()
        self.process = ManagedProcess([_script("rabbitmq-server")], self.dir / "server.log", env=self.env)

    @property
    def env(self) -> dict[str, str]:
        d = self.dir
        return {**os.environ, "HOME": str(d), "RABBITMQ_NODENAME": self.node,
                "RABBITMQ_NODE_IP_ADDRESS": self.host, "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(self.dist_port), "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
                "RABBITMQ_LOG_BASE": str(d / "log"), "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
                "RABBITMQ_PID_FILE": str(d / "pid"), "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
                "ERL_EPMD_ADDRESS": self.host,
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}"}

    def _write_config(self) -> None:
        lines = ["loopback_users = none", f"listeners.tcp.default = {self.host}:{self.port}",
                 "log.console = true", "log.file = false"]
        if self.pki is not None:
            cert, key = self.pki.server_cert
            lines += [f"listeners.ssl.default = {self.host}:{self.tls_port}",
                      f"ssl_options.cacertfile = {self.pki.ca_path}", f"ssl_options.certfile = {cert}",
                      f"ssl_options.keyfile = {key}", "ssl_options.verify = verify_peer",
                      "ssl_options.fail_if_no_peer_cert = false"]
        (self.dir / "rabbitmq.conf").write_text("\n".join(lines) + "\n")
        (self.dir / "advanced.config").write_text("[].\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text("")

    def start(self, timeout: float = 90.0) -> "RabbitNode":
        self.process.start()
        # The AMQP listener opens last, once the node has booted (and recovered durable queues).
        self.process.wait_listening(self.host, self.port, timeout)
        if self.tls_port:
            self.process.wait_listening(self.host, self.tls_port, timeout)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """A clean shutdown (``rabbitmqctl stop``), durable queues and persistent messages kept."""
        if self.process.alive:
            self.ctl("stop", check=False, timeout=timeout)
        self.process.stop(timeout=timeout)

    def ctl(self, *args: str, check: bool = True, timeout: float = 60.0) -> str:
        """``rabbitmqctl -n <node> ARGS`` with the node's cookie; its output."""
        done = subprocess.run([_script("rabbitmqctl"), "-n", self.node, *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.returncode}\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def add_user(self, name: str, password: str, vhost: str = "/") -> None:
        self.ctl("add_user", name, password)
        self.ctl("set_permissions", "-p", vhost, name, ".*", ".*", ".*")

    def add_vhost(self, vhost: str) -> None:
        self.ctl("add_vhost", vhost)
        self.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")

    def set_memory_alarm(self, on: bool) -> None:
        """A memory alarm blocks every publishing connection until it clears (RabbitMQ's flow control)."""
        self.ctl("set_vm_memory_high_watermark", "0.0000001" if on else "0.4")

    def queue_depths(self, vhost: str = "/") -> dict[str, int]:
        """Ready messages per queue (``rabbitmqctl list_queues``)."""
        out = self.ctl("list_queues", "-p", vhost, "name", "messages_ready", "--no-table-headers", "--quiet")
        depths = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                depths[parts[0]] = int(parts[1])
        return depths

    def url(self, *, user: str | None = None, tls: bool = False, vhost: str | None = None) -> str:
        scheme, port = ("amqps", self.tls_port) if tls else ("amqp", self.port)
        v = vhost if vhost is not None else self.vhost
        return f"{scheme}://{user or self.username}@{self.host}:{port}/{'%2F' if v == '/' else v}"


class ExternalRabbit(ExternalService):
    """The broker ``EDGE_TEST_AMQP`` names (password in ``EDGE_TEST_AMQP_PASSWORD``)."""

    named_by: ClassVar[str] = "EDGE_TEST_AMQP names an external RabbitMQ"
    external = True
    restartable = False

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 5672
        self.username = parts.username or "guest"
        self.password = os.environ.get("EDGE_TEST_AMQP_PASSWORD", "guest")
        self.vhost = (parts.path or "/").lstrip("/") or "/"
        self._url = url

    def url(self, **_: object) -> str:
        return self._url

    def set_memory_alarm(self, on: bool) -> None:
        self._skip("raise a memory alarm on")

    def add_user(self, name: str, password: str, vhost: str = "/") -> None:
        self._skip("add users to")

    def queue_depths(self, vhost: str = "/") -> dict[str, int]:
        self._skip("list the queues of")


def start_rabbitmq(workdir: Path, *, tls: bool = False) -> RabbitNode | ExternalRabbit:
    """The environment's RabbitMQ when ``EDGE_TEST_AMQP`` names one, else a private node."""
    url = os.environ.get("EDGE_TEST_AMQP")
    if url:
        return ExternalRabbit(url)
    if not rabbitmq_installed():
        raise RuntimeError("rabbitmq-server is not installed: run scripts/setup_env.sh (make test does)")
    node = RabbitNode(workdir, tls=tls)
    return node.start()


def connect(broker: RabbitNode | ExternalRabbit, vhost: str | None = None) -> Any:
    """A pika ``BlockingConnection`` to ``broker`` (its own vhost unless one is named), as its user."""
    import pika

    creds = pika.PlainCredentials(broker.username, broker.password)
    return pika.BlockingConnection(pika.ConnectionParameters(broker.host, broker.port, vhost or broker.vhost, creds))


def drain(broker: RabbitNode | ExternalRabbit, queue: str, vhost: str | None = None) -> list[tuple[Any, Any, bytes]]:
    """Every message ``queue`` holds now, taken off it: ``(method, properties, body)`` each."""
    conn = connect(broker, vhost)
    try:
        channel, out = conn.channel(), []
        while (got := channel.basic_get(queue, auto_ack=True))[0] is not None:
            out.append(got)
        return out
    finally:
        conn.close()
