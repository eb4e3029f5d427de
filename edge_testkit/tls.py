"""TLS for the test brokers: a throw-away CA (openssl CLI) and stunnel in front of a plain TCP service."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from edge_testkit.processes import ManagedProcess

STUNNEL_BIN = shutil.which("stunnel4") or shutil.which("stunnel") or "/usr/bin/stunnel4"


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
