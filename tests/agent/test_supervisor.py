"""CameraSupervisor alone, with stand-in workers (so failures can be made on demand),
plus the daemon loop's watchdog decision. The real cameras are in tests/test_daemon.py."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from edge_agent.agent.config import parse_agent
from edge_agent.agent.supervisor import CameraSupervisor, UnknownCamera
from edge_agent.vision.config import CameraConfig
from edge_testkit.processes import free_port, wait_for


class FakeWorker:
    def __init__(self, camera: CameraConfig, clock: "Clock"):
        self.camera = camera
        self.clock = clock
        self.beat = clock.now
        self.running = False
        self.thread_alive = True
        self.stopped = 0

    def start(self) -> None:
        self.running = True

    def stop(self, timeout: float = 5.0) -> None:
        self.running = False
        self.stopped += 1

    def alive(self) -> bool:
        return self.thread_alive

    def heartbeat(self) -> float:
        return self.beat

    def status(self) -> dict:
        return {"id": self.camera.id, "state": "running" if self.running else "stopped"}

    @property
    def view(self) -> "FakeView":
        return FakeView(self.camera.id)


class FakeView:
    def __init__(self, camera_id: str):
        self.camera_id = camera_id

    def snapshot(self, *, raw: bool = False) -> bytes | None:
        return f"{'raw' if raw else 'jpeg'}-{self.camera_id}".encode()

    def next_stream_jpeg(self, after: int, timeout: float) -> tuple[int, bytes] | None:
        return after + 1, b"jpeg"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Factory:
    def __init__(self, clock: Clock):
        self.clock = clock
        self.built: list[FakeWorker] = []
        self.fail_for: set[str] = set()

    def __call__(self, camera: CameraConfig) -> FakeWorker:
        if camera.id in self.fail_for:
            raise RuntimeError("model missing")
        worker = FakeWorker(camera, self.clock)
        self.built.append(worker)
        return worker

    def current(self, cam_id: str) -> FakeWorker:
        return [w for w in self.built if w.camera.id == cam_id][-1]


def cam(cam_id: str, **kw) -> CameraConfig:
    return CameraConfig(id=cam_id, source=f"/tmp/{cam_id}.avi", **kw)


@pytest.fixture
def env():
    clock = Clock()
    factory = Factory(clock)
    drafts: list = []
    sup = CameraSupervisor(factory, emit=drafts.append, clock=clock, stuck_after_s=30, backoff_min_s=1,
                           backoff_max_s=8)
    return sup, factory, clock, drafts


def test_a_camera_that_cannot_start_is_retried_with_backoff_and_others_run(env) -> None:
    sup, factory, clock, drafts = env
    factory.fail_for = {"bad"}
    sup.start([cam("good"), cam("bad")])
    assert factory.current("good").running and sup.status()["bad"]["state"] == "failed"
    assert drafts[-1].type == "camera.stream_error" and drafts[-1].camera_id == "bad"
    delays = []
    for _ in range(5):
        retry_at = clock.now + sup.status()["bad"]["retry_in_s"]
        delays.append(sup.status()["bad"]["retry_in_s"])
        clock.now = retry_at - 0.01
        sup.check()
        assert sup.status()["bad"]["state"] == "failed"  # not before its time
        clock.now = retry_at
        sup.check()
    assert delays == [1, 2, 4, 8, 8]  # exponential, capped
    factory.fail_for.clear()
    clock.now += 8
    sup.check()
    assert factory.current("bad").running and sup.status()["bad"]["restarts"] == 6


def test_a_dead_worker_thread_is_replaced(env) -> None:
    sup, factory, clock, _ = env
    sup.start([cam("a")])
    first = factory.current("a")
    first.thread_alive = False
    sup.check()
    assert first.stopped == 1 and sup.status()["a"]["last_error"] == "camera worker thread died"
    clock.now += 1
    sup.check()
    assert factory.current("a") is not first and factory.current("a").running


def test_a_worker_that_keeps_dying_is_dead_past_its_budget_until_restarted(env) -> None:
    sup, factory, clock, _ = env  # the budget: more than 5 deaths in 10 minutes
    sup.start([cam("a"), cam("b")])
    for _ in range(6):
        factory.current("a").thread_alive = False
        sup.check()
        clock.now += 10  # past the backoff (at most 8 s here): rebuilt, unless given up
        factory.current("b").beat = clock.now  # b keeps working
        sup.check()
    assert sup.dead() == ["a"] and sup.failing() == "a dead" and not sup.healthy()
    assert sup.status()["a"]["state"] == "dead"
    built = len(factory.built)
    clock.now += 3600
    factory.current("b").beat = clock.now
    sup.check()
    assert len(factory.built) == built  # no more rebuilds: the process is restarted instead
    assert factory.current("b").running and sup.status()["b"]["state"] == "running"
    sup.restart("a")  # an operator's restart_camera starts afresh
    assert sup.dead() == [] and sup.healthy() and factory.current("a").running


def test_a_worker_that_cannot_start_keeps_being_retried_and_is_never_dead(env) -> None:
    sup, factory, clock, _ = env
    factory.fail_for.add("a")
    sup.start([cam("a")])
    for _ in range(20):
        clock.now += 10
        sup.check()
    assert sup.dead() == [] and sup.failing() is None and sup.status()["a"]["state"] == "failed"


def test_a_stuck_worker_makes_the_supervisor_unhealthy(env) -> None:
    sup, factory, clock, _ = env
    sup.start([cam("a"), cam("b")])
    clock.now += 31
    factory.current("b").beat = clock.now
    assert sup.stuck() == ["a"] and not sup.healthy()
    assert sup.status()["a"]["state"] == "stuck"
    factory.current("a").beat = clock.now
    assert sup.healthy()


def test_apply_restarts_only_changed_cameras(env) -> None:
    sup, factory, clock, _ = env
    sup.start([cam("a"), cam("b"), cam("c")])
    a, b = factory.current("a"), factory.current("b")
    done = sup.apply([cam("a"), cam("b", fps=1), cam("d")])
    assert done == {"started": ["d"], "stopped": ["c"], "restarted": ["b"], "kept": ["a"]}
    assert factory.current("a") is a and a.stopped == 0 and b.stopped == 1
    assert set(sup.ids()) == {"a", "b", "d"}
    sup.apply([cam("a", enabled=False), cam("b", fps=1), cam("d")])
    assert sup.status()["a"]["state"] == "disabled" and a.stopped == 1


def test_restart_snapshot_and_unknown_camera(env) -> None:
    sup, factory, _, _ = env
    sup.start([cam("a")])
    assert sup.view("a").snapshot() == b"jpeg-a"
    sup.restart("a")
    assert len(factory.built) == 2 and sup.status()["a"]["restarts"] == 1
    with pytest.raises(UnknownCamera):
        sup.restart("zz")
    with pytest.raises(UnknownCamera):
        sup.view("zz")


def test_daemon_loop_withholds_watchdog_pings_while_a_camera_is_stuck(tmp_path: Path, monkeypatch) -> None:
    from edge_agent.agent import daemon

    monkeypatch.setattr(daemon, "TICK_S", 0.01)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # ping every 0.05 s
    cfg = parse_agent({"device_id": "gw-w", "outbox": {"path": str(tmp_path / "ob")},
                       "mqtt": {"port": free_port()}, "http": {"listen": f"127.0.0.1:{free_port()}"}})
    agent = daemon.Agent(cfg)
    clock = Clock()
    factory = Factory(clock)
    agent.supervisor = CameraSupervisor(factory, clock=clock, stuck_after_s=30)
    agent.supervisor.start([cam("a")])
    pings: list[str] = []
    agent._notify = type("N", (), {"notify": lambda self, s: pings.append(s)})()
    loop = threading.Thread(target=agent.run_until_stopped)
    try:
        loop.start()
        wait_for(lambda: pings.count("WATCHDOG=1") >= 2, 10)
        ticks = {"n": 0}
        original = agent.supervisor.check
        agent.supervisor.check = lambda: (ticks.__setitem__("n", ticks["n"] + 1), original())[1]
        clock.now += 60  # the camera's heartbeat is now a minute old
        start = ticks["n"]
        wait_for(lambda: ticks["n"] >= start + 2, 5)  # a tick that began before the jump is over
        n = pings.count("WATCHDOG=1")
        wait_for(lambda: ticks["n"] >= start + 40, 10)  # many ticks, 8x the ping interval
        assert pings.count("WATCHDOG=1") == n
        factory.current("a").beat = clock.now  # it recovers: pings resume
        wait_for(lambda: pings.count("WATCHDOG=1") > n, 10)
    finally:
        agent.stop_requested.set()
        loop.join(5)
        agent.outbox.close()


def test_a_named_but_missing_command_secret_fails_closed(monkeypatch) -> None:
    from edge_agent.agent.daemon import command_secret

    monkeypatch.delenv("EDGE_TEST_NO_SUCH_SECRET", raising=False)
    cfg = parse_agent({"device_id": "gw-s", "commands": {"hmac_secret_env": "EDGE_TEST_NO_SUCH_SECRET"}})
    secret = command_secret(cfg)
    assert secret is not None and len(secret) == 32  # unknown to anyone: every request gets 401
    monkeypatch.setenv("EDGE_TEST_NO_SUCH_SECRET", "abc")
    assert command_secret(cfg) == b"abc"
    assert command_secret(parse_agent({"device_id": "gw-s"})) is None


def test_stop_all_stops_cameras_in_parallel(env) -> None:
    sup, factory, _, _ = env
    sup.start([cam("a"), cam("b"), cam("c")])
    barrier = threading.Barrier(3, timeout=5)  # passes only if all three are stopping at the same time
    met: list[str] = []

    def stop_together(worker: FakeWorker):
        def stop(timeout: float = 5.0) -> None:
            barrier.wait()
            met.append(worker.camera.id)
        return stop

    for w in factory.built:
        w.stop = stop_together(w)  # type: ignore[method-assign]
    sup.stop_all()
    assert sorted(met) == ["a", "b", "c"]
