"""Child processes for tests, benchmarks and the demo: free ports, bounded waits, process groups.

Everything started here runs in its own process group with its output in a file, and can be
stopped, killed and started again (outage tests). Nothing sleeps to synchronise: readiness is
awaited by polling, with a bound.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar, NoReturn, Self, TypeVar

REPO_ROOT = Path(__file__).resolve().parent.parent

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


# --- brokers as services: the ones this kit runs, and the ones the environment names ----------

def skip_test(reason: str) -> NoReturn:
    """``pytest.skip``, imported only when used: the benchmarks and the demo run without pytest."""
    import pytest

    pytest.skip(reason)


class LocalService:
    """A broker this kit runs as ``self.process``: stopped, killed and restarted on the same ports."""

    process: ManagedProcess

    def start(self, timeout: float = 15.0) -> Self:
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        return self.process.alive

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM: a clean shutdown (Mosquitto writes its persistence file)."""
        self.process.stop(signal.SIGTERM, timeout)

    def kill(self) -> None:
        self.process.kill()

    def restart(self) -> Self:
        self.stop()
        return self.start()

    def log_text(self) -> str:
        return self.process.output()


class ExternalService:
    """A broker the environment names: tests use it but never stop, kill or restart it (they skip)."""

    named_by: ClassVar[str]  # e.g. "EDGE_TEST_MQTT names an external broker"

    def _skip(self, what: str) -> NoReturn:
        skip_test(f"{self.named_by}: cannot {what} it")

    def start(self) -> Self:
        return self

    def stop(self) -> None:
        self._skip("stop")

    def kill(self) -> None:
        self._skip("kill")

    def restart(self) -> Self:
        self._skip("restart")

    def log_text(self) -> str:
        return ""
