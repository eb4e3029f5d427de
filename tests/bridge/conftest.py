"""Fixtures of the bridge's wire tests (the brokers are the suite's, in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from edge_agent.bridge.config import BridgeConfig


@pytest.fixture
def device_factory() -> Iterator[Any]:
    """``make(cfg, device_id="gw-1", **kw)``: a paho "device" (test_bridge_wire.Device), closed at teardown."""
    # The tests' module, on pytest's rootdir path; imported here, when the fixture runs.
    from test_bridge_wire import Device

    made: list[Device] = []

    def make(cfg: BridgeConfig, device_id: str = "gw-1", **kw: Any) -> Device:
        made.append(Device(cfg, device_id, **kw))
        return made[-1]

    yield make
    for dev in made:
        dev.close()
