"""SupervisedThread and Health: a crashed body runs again, a crash loop ends as a dead part, 503."""

from __future__ import annotations

import threading
from typing import Any

from edge_agent.common.supervised import Check, Health, SupervisedThread
from edge_testkit.processes import wait_for


class Body:
    """A thread body that crashes ``crashes`` times, then runs until told to return."""

    def __init__(self, crashes: int, error: BaseException | None = None):
        self.crashes = crashes
        self.error = error or RuntimeError("boom")
        self.runs = 0
        self.finish = threading.Event()

    def __call__(self) -> None:
        self.runs += 1
        if self.runs <= self.crashes:
            raise self.error
        self.finish.wait(10)


def test_a_crashed_body_runs_again_and_the_part_reports_its_restarts() -> None:
    body = Body(crashes=2)
    resets: list[int] = []
    part = SupervisedThread("worker", body, on_restart=lambda: resets.append(body.runs), backoff_min_s=0.01)
    part.start()
    wait_for(lambda: body.runs == 3 and part.state == "running", timeout=5)
    assert part.report() == {"state": "running", "restarts": 2, "last_error": "RuntimeError: boom"}
    assert resets == [1, 2]  # the reset ran before each new run
    body.finish.set()
    part.join(5)
    assert part.state == "stopped" and not part.dead()


def test_a_crash_loop_ends_as_a_dead_part_and_health_answers_503_naming_it() -> None:
    health = Health()
    looping = SupervisedThread("uplink", Body(crashes=100), backoff_min_s=0.001, max_restarts=3, window_s=60)
    health.add(looping)
    steady_body = Body(crashes=0)
    steady = SupervisedThread("http", steady_body)
    health.add(steady)
    for part in (looping, steady):
        part.start()
    wait_for(lambda: looping.dead(), timeout=5)
    code, body = health.healthz()
    assert code == 503
    assert body["dead"] == ["uplink"]
    assert body["parts"]["uplink"]["restarts"] == 3
    assert body["parts"]["http"]["state"] == "running"
    steady_body.finish.set()


def test_system_exit_from_a_library_is_a_crash_not_a_silent_end() -> None:
    part = SupervisedThread("http", Body(crashes=1, error=SystemExit(1)), backoff_min_s=0.01)
    part.start()
    wait_for(lambda: part.restarts == 1, timeout=5)
    assert part.last_error == "SystemExit: 1"


def test_a_crash_while_stopping_ends_the_part_without_a_restart() -> None:
    started = threading.Event()
    release = threading.Event()

    def body() -> None:
        started.set()
        release.wait(5)
        raise RuntimeError("socket closed under us")

    part = SupervisedThread("uplink", body, backoff_min_s=0.01)
    part.start()
    assert started.wait(5)
    part.stop_restarting()
    release.set()
    part.join(5)
    assert part.state == "stopped" and part.restarts == 0


def test_a_failing_reset_counts_as_the_next_crash() -> None:
    def broken_reset() -> None:
        raise OSError("cannot rebuild the client")

    part = SupervisedThread("uplink", Body(crashes=1), on_restart=broken_reset, backoff_min_s=0.001,
                            max_restarts=2, window_s=60)
    part.start()
    wait_for(part.dead, timeout=5)
    assert part.last_error == "OSError: cannot rebuild the client"


def test_a_check_part_is_dead_while_its_condition_fails() -> None:
    why: list[Any] = [None]
    health = Health()
    health.add(Check("cameras", lambda: why[0]))
    assert health.healthz()[0] == 200
    why[0] = "cam-1 crashed 6 times in 300 s"
    code, body = health.healthz()
    assert (code, body["dead"]) == (503, ["cameras"])
    assert body["parts"]["cameras"] == {"state": "dead", "last_error": "cam-1 crashed 6 times in 300 s"}
