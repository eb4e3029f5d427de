"""Mosquitto for tests: a real broker on free ports (plain, TLS, passwords + ACL), or EDGE_TEST_MQTT's."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from edge_testkit.processes import (
    ExternalService,
    LocalService,
    ManagedProcess,
    free_port,
)
from edge_testkit.tls import Pki

MOSQUITTO_BIN = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


class MosquittoBroker(LocalService):
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

    def start(self, timeout: float = 15.0) -> MosquittoBroker:
        self.process.start()
        self.process.wait_listening(self.host, self.port, timeout)
        if self.tls_port is not None:
            self.process.wait_listening(self.host, self.tls_port, timeout)
        return self

    def log_text(self) -> str:
        """The broker's log file (connections, auth and ACL notes) plus anything it printed."""
        try:
            logged = (self.dir / "mosquitto.log").read_text(errors="replace")
        except FileNotFoundError:
            logged = ""
        return logged + self.process.output()


@dataclass
class ExternalMqtt(ExternalService):
    """A broker named by EDGE_TEST_MQTT=host:port: plain and anonymous, never restarted by tests."""

    named_by: ClassVar[str] = "EDGE_TEST_MQTT names an external broker"
    host: str
    port: int
    external: bool = True
    tls_port: int | None = None
    ca_path: Path | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

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
