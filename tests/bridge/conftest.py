"""Fixtures of the bridge's wire tests (the brokers are the suite's, in tests/conftest.py)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from edge_agent.bridge.config import BridgeConfig
from edge_testkit.mqtt import ExternalMqtt, MosquittoBroker
from edge_testkit.processes import parse_host_port

# The bridge speaks MQTT 3.1.1: the broker's max_inflight_messages is the window it sends ahead
# (Mosquitto's default, 20, would cap the drain); as docs/bridge-reference.md asks of a deployment.
BRIDGE_BROKER_CONF = "max_inflight_messages 1000\n"


@pytest.fixture
def mosquitto(mosquitto: Callable[..., MosquittoBroker]) -> Callable[..., MosquittoBroker]:
    """The suite's factory, with the broker setting a bridge deployment has."""
    def factory(**kwargs: Any) -> MosquittoBroker:
        kwargs["extra_conf"] = BRIDGE_BROKER_CONF + kwargs.get("extra_conf", "")
        return mosquitto(**kwargs)
    return factory


@pytest.fixture
def mqtt_broker(request: pytest.FixtureRequest) -> MosquittoBroker | ExternalMqtt:
    """A plain anonymous broker set up as for a bridge (or EDGE_TEST_MQTT's, which must be)."""
    external = os.environ.get("EDGE_TEST_MQTT")
    if external:
        return ExternalMqtt(*parse_host_port(external))
    return request.getfixturevalue("mosquitto")()


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


@pytest.fixture(scope="session")
def rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A private RabbitMQ node with a TLS listener (or the one ``EDGE_TEST_AMQP`` names), for the
    RabbitMQ tests of this directory; a test that kills it starts it again on the same ports."""
    from edge_testkit.rabbitmq import RabbitNode, start_rabbitmq

    node = start_rabbitmq(tmp_path_factory.mktemp("rabbitmq"), tls=True)
    yield node
    if isinstance(node, RabbitNode):
        node.process.kill()
