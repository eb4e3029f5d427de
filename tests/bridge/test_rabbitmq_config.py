"""The ``rabbitmq`` section: URL rules, password from its variable, the topology, hostile input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from edge_agent.bridge.rabbitmq import connection_parameters, message_properties, routing_key
from edge_agent.bridge.rabbitmq_config import DEFAULT_EXCHANGES, DEFAULT_QUEUES, RabbitMqConfig
from edge_agent.common.config import ConfigError


def test_defaults_are_the_specified_topology() -> None:
    cfg = RabbitMqConfig()
    assert cfg.exchanges == DEFAULT_EXCHANGES and cfg.queues == DEFAULT_QUEUES
    assert cfg.exchanges["ai.inference.results"] == "ai.inference" and cfg.queues["dlq"] == "dlq.queue"
    assert cfg.dlq_retention_s == 7 * 24 * 3600


@pytest.mark.parametrize(("url", "host", "port", "user", "vhost", "tls"), [
    ("amqp://guest@127.0.0.1:5672/%2F", "127.0.0.1", 5672, "guest", "/", False),
    ("amqps://edge-bridge@rabbit-1:5671/edge", "rabbit-1", 5671, "edge-bridge", "edge", True),
    ("amqps://edge-bridge@rabbit-1/edge", "rabbit-1", 5671, "edge-bridge", "edge", True),
    ("amqp://bridge@h", "h", 5672, "bridge", "/", False),
])
def test_url_gives_host_port_user_vhost(url: str, host: str, port: int, user: str, vhost: str, tls: bool) -> None:
    cfg = RabbitMqConfig(url=url)
    assert (cfg.host, cfg.port, cfg.username, cfg.vhost, cfg.tls_on) == (host, port, user, vhost, tls)


@pytest.mark.parametrize(("url", "says"), [
    ("amqp://edge:secret@h:5672/", "password"),
    ("http://h:5672/", "amqp://"),
    ("amqp://:5672/", "host"),
    ("amqp://h:notaport/", "port"),
    ("amqp://h:0/", "port"),
])
def test_bad_urls_say_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        RabbitMqConfig(url=url)


def test_streams_must_match_and_include_dlq() -> None:
    with pytest.raises(ValidationError, match="same streams"):
        RabbitMqConfig(queues={"camera.events": "camera.queue"})
    with pytest.raises(ValidationError, match="dlq"):
        RabbitMqConfig(exchanges={"camera.events": "e"}, queues={"camera.events": "q"})


def test_password_comes_only_from_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = RabbitMqConfig(url="amqp://edge@h/", password_env="EDGE_TEST_PW")
    monkeypatch.delenv("EDGE_TEST_PW", raising=False)
    with pytest.raises(ConfigError, match="EDGE_TEST_PW"):
        connection_parameters(cfg)
    monkeypatch.setenv("EDGE_TEST_PW", "pw")
    params = connection_parameters(cfg)
    assert (params.credentials.username, params.credentials.password, params.virtual_host) == ("edge", "pw", "/")


def test_routing_key_and_properties_follow_design() -> None:
    assert routing_key(b"gw-1/cam-2") == "gw-1.cam-2"
    assert routing_key(b"gw-1") == "gw-1._"
    props = message_properties([("message-id", b"m1"), ("trace-id", b"t1"), ("seq", b"7")])
    assert (props.content_type, props.delivery_mode, props.message_id, props.correlation_id) == \
        ("application/json", 2, "m1", "t1")
    assert props.headers == {"message-id": "m1", "trace-id": "t1", "seq": "7"}


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120))
def test_any_url_is_accepted_or_refused_with_a_validation_error(url: str) -> None:
    try:
        cfg = RabbitMqConfig(url=url)
    except ValidationError:
        return
    assert cfg.tls_on in (True, False) and 0 < cfg.port < 65536 and cfg.host and cfg.vhost


def test_a_bridge_file_names_one_central_broker() -> None:
    from edge_agent.bridge.config import parse_bridge

    cfg = parse_bridge({"rabbitmq": {"url": "amqps://edge-bridge@rabbit-1:5671/edge"},
                        "retry": {"backoff": "linear"}})
    assert cfg.broker == "rabbitmq" and cfg.retry.backoff == "linear"
    assert parse_bridge({}).broker == "kafka"
    with pytest.raises(ConfigError) as e:
        parse_bridge({"kafka": {"bootstrap_servers": "k:9092"}, "rabbitmq": {"url": "amqp://u@h/"}})
    assert "one central broker" in "\n".join(e.value.problems)
    # a dumped rabbitmq config (kafka at its defaults) reads back
    assert parse_bridge(cfg.model_dump(mode="json")).broker == "rabbitmq"


def test_check_config_tells_a_rabbitmq_bridge_file_and_names_its_missing_secret(tmp_path) -> None:
    from edge_agent.config_check import check_file

    path = tmp_path / "bridge.yaml"
    path.write_text("rabbitmq:\n  url: amqps://edge-bridge@rabbit-1:5671/edge\n  password_env: EDGE_RMQ_PW\n"
                    "  tls: {ca: /nonexistent/ca.crt}\n")
    kind, problems = check_file(path, env={})
    assert kind == "bridge"
    assert any("rabbitmq.password_env" in p and "EDGE_RMQ_PW" in p for p in problems)
    assert any(p.startswith("rabbitmq.tls.ca") for p in problems)
    assert check_file(path, env={"EDGE_RMQ_PW": "x"}, files=False) == ("bridge", [])
