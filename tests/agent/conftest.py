"""Fixtures of the agent's wire tests (the brokers are the suite's, in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture
def acker_factory() -> Iterator[Any]:
    """``make(broker, **kw)``: an acker standing in for the bridge (test_uplink.Acker), closed at teardown."""
    # The tests' module, on pytest's rootdir path; imported here, when the fixture runs.
    from test_uplink import Acker

    made: list[Acker] = []

    def make(broker: Any, **kw: Any) -> Acker:
        made.append(Acker(broker.host, broker.port, **kw))
        return made[-1]

    yield make
    for acker in made:
        acker.close()
