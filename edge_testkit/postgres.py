"""PostgreSQL for tests: a private cluster of Debian's ``postgresql``, or one the environment names.

A private cluster is ``initdb`` + ``pg_ctl`` in a temporary directory on a free port, with
its socket in that directory too, so it neither sees nor disturbs a PostgreSQL the machine
already runs. PostgreSQL refuses to run as root: when the tests run as root the cluster runs
as the ``postgres`` user (``runuser``), which owns the directory. Authentication is ``trust``
on loopback (a throw-away cluster). ``EDGE_TEST_PG=<dsn>`` points the tests at an existing
server instead; tests that would stop or kill it skip.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import ClassVar

from edge_testkit.processes import ExternalService, free_port, port_open, wait_for

PG_LIB = Path("/usr/lib/postgresql")  # Debian: /usr/lib/postgresql/<major>/bin
RUN_AS = "postgres"


def pg_bin_dir() -> Path | None:
    """The newest installed server's bin directory (Debian layout), else the one on PATH."""
    versions = sorted((p for p in PG_LIB.glob("*/bin") if (p / "pg_ctl").exists()),
                      key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    if versions:
        return versions[-1]
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


def postgres_installed() -> bool:
    return pg_bin_dir() is not None


def _as_server_user(argv: list[str]) -> list[str]:
    """Root cannot run the server: run it as ``postgres`` (anyone else runs it as themselves)."""
    if os.geteuid() != 0:
        return argv
    return ["runuser", "-u", RUN_AS, "--", *argv]


class PostgresCluster:
    """A private cluster on a free port; ``dsn`` reaches its ``postgres`` database as superuser."""

    host = "127.0.0.1"
    external = False
    restartable = True

    def __init__(self, workdir: Path | None = None):
        bindir = pg_bin_dir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        self.bin = bindir
        # Not under a pytest tmp_path: the server user must be able to reach every parent directory.
        self.dir = Path(tempfile.mkdtemp(prefix="edge-pg-", dir=workdir if workdir and os.geteuid() != 0 else None))
        self.data = self.dir / "data"
        self.port = free_port()
        self.user = RUN_AS if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        self._watcher: subprocess.Popen[bytes] | None = None
        if os.geteuid() == 0:
            entry = pwd.getpwnam(RUN_AS)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self._initdb()

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/postgres"

    def _run(self, *argv: str, timeout: float = 120.0) -> str:
        done = subprocess.run(_as_server_user([str(self.bin / argv[0]), *argv[1:]]), capture_output=True,
                              text=True, timeout=timeout, cwd=self.dir)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stdout}{done.stderr}")
        return done.stdout

    def _initdb(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8",
                  "--no-sync", "--locale=C")
        with open(self.data / "postgresql.conf", "a") as conf:
            # fsync off: a throw-away cluster; crash tests kill the consumer, never the server host.
            conf.write(f"\nlisten_addresses = '{self.host}'\nport = {self.port}\n"
                       f"unix_socket_directories = '{self.dir}'\nfsync = off\nmax_connections = 50\n")

    def start(self, timeout: float = 60.0) -> PostgresCluster:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w",
                  "-t", str(int(timeout)), "start", timeout=timeout + 10)
        wait_for(lambda: port_open(self.host, self.port), timeout, message=f"PostgreSQL on port {self.port}")
        self._guard()
        return self

    def _guard(self) -> None:
        """A watcher that stops the server (and removes its directory) once this process is gone,
        however it ended (even kill -9).

        pg_ctl's server is not our child, and a parent-death signal does not survive the switch to
        the ``postgres`` user: a small shell polls for our pid instead (no race at start-up either).
        """
        if self._watcher is not None and self._watcher.poll() is None:
            return
        stop = " ".join(shlex.quote(a) for a in _as_server_user(
            [str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"]))
        script = (f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; "
                  f"rm -rf {shlex.quote(str(self.dir))}")
        self._watcher = subprocess.Popen(["sh", "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True)

    @property
    def alive(self) -> bool:
        return port_open(self.host, self.port)

    def stop(self, timeout: float = 60.0) -> None:
        """``pg_ctl stop -m fast``: clients are disconnected, the data kept."""
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", str(int(timeout)), "stop",
                      timeout=timeout + 10)
        if self._watcher is not None:
            self._watcher.kill()
            self._watcher.wait(10)
            self._watcher = None

    def kill(self) -> None:
        self.stop()

    def restart(self) -> PostgresCluster:
        self.stop()
        return self.start()

    def log_text(self) -> str:
        try:
            return (self.dir / "server.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class ExternalPostgres(ExternalService):
    """A server named by ``EDGE_TEST_PG``; never stopped by tests."""

    named_by: ClassVar[str] = "EDGE_TEST_PG names an external PostgreSQL"
    external = True
    restartable = False

    def __init__(self, dsn: str):
        self.dsn = dsn

    def remove(self) -> None:
        pass


def start_postgres(workdir: Path | None = None) -> PostgresCluster | ExternalPostgres:
    """``EDGE_TEST_PG``'s server, else a private cluster (started; call ``remove()`` at the end)."""
    dsn = os.environ.get("EDGE_TEST_PG")
    if dsn:
        return ExternalPostgres(dsn)
    return PostgresCluster(workdir).start()


def fresh_database(admin_dsn: str, name: str) -> str:
    """Create the database ``name`` (dropped first if it exists) and return its DSN."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base, _, _ = admin_dsn.rpartition("/")
    query = ""
    if "?" in admin_dsn:
        query = "?" + admin_dsn.split("?", 1)[1]
    return f"{base}/{name}{query}"
