"""The RabbitMQ sink over a real broker: a private ``rabbitmq-server`` node (or ``EDGE_TEST_AMQP``).

What it must keep: every record reported exactly once; success only after RabbitMQ confirmed it;
an unroutable or nacked message is the record's fault (counted, retried, in the end a dead
letter); a blocked connection (memory alarm) or a lost broker is an outage (nothing acked,
nothing counted, everything delivered once the broker is back).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.bridge.queue_admin import RetryResult
from edge_agent.bridge.rabbitmq import RabbitSink
from edge_agent.bridge.rabbitmq_admin import RabbitQueueAdmin
from edge_agent.bridge.rabbitmq_config import DEFAULT_EXCHANGES, DEFAULT_QUEUES, RabbitMqConfig
from edge_agent.bridge.sink import Delivered, SendError
from edge_agent.common.config import ConfigError
from edge_agent.common.envelope import build, encode
from edge_agent.common.wire import DLQ_REASON, DLQ_SOURCE_TOPIC
from edge_testkit.processes import wait_for
from edge_testkit.rabbitmq import RabbitNode, connect, drain

STREAMS = [s for s in DEFAULT_EXCHANGES if s != "dlq"]


class Reports:
    """The reports of one sink, keyed by the record's message id; each must come exactly once."""

    def __init__(self) -> None:
        self.by_id: dict[str, list[tuple[SendError | None, Delivered | None]]] = {}
        self.lock = threading.Lock()

    def callback(self, message_id: str):
        def report(err: SendError | None, where: Delivered | None) -> None:
            with self.lock:
                self.by_id.setdefault(message_id, []).append((err, where))
        return report

    def count(self) -> int:
        return sum(len(v) for v in self.by_id.values())


def _record(device: str = "gw-1", camera: str | None = "cam-1", seq: int = 1) -> tuple[bytes, bytes, list]:
    env = build(device, seq, "counting.crossing", {"line": "door", "direction": "in"}, camera_id=camera)
    return env.kafka_key.encode(), encode(env), env.kafka_headers()


def _send(sink: RabbitSink, reports: Reports, topic: str = "camera.events", **kw: Any) -> str:
    key, value, headers = _record(**kw)
    message_id = dict(headers)["message-id"].decode()
    sink.send(topic, key, value, headers, reports.callback(message_id))
    return message_id


def _poll_until(sink: RabbitSink, reports: Reports, n: int, timeout: float = 30.0) -> None:
    wait_for(lambda: sink.poll(0.05) >= 0 and reports.count() >= n, timeout, message=f"{n} reports")


def _cfg(rabbit: Any, **kw: Any) -> RabbitMqConfig:
    return RabbitMqConfig(url=rabbit.url(), **kw)


@pytest.fixture
def sink(rabbit: Any) -> Iterator[RabbitSink]:
    s = RabbitSink(_cfg(rabbit)).start()
    wait_for(lambda: s.connected, 30, message="sink connected")
    for queue in DEFAULT_QUEUES.values():
        drain(rabbit, queue)
    yield s
    s.close()


def test_every_stream_lands_in_its_queue_with_the_design_properties(rabbit: Any, sink: RabbitSink) -> None:
    reports = Reports()
    sent = {topic: _send(sink, reports, topic) for topic in STREAMS}
    _poll_until(sink, reports, len(STREAMS))
    assert all(r == [(None, Delivered(t))] for t, i in sent.items() for r in [reports.by_id[i]])
    for topic, message_id in sent.items():
        [(method, props, body)] = drain(rabbit, DEFAULT_QUEUES[topic])
        assert method.exchange == DEFAULT_EXCHANGES[topic] and method.routing_key == "gw-1.cam-1"
        assert props.content_type == "application/json" and props.delivery_mode == 2
        assert props.message_id == message_id == json.loads(body)["id"]
        assert props.correlation_id == props.headers["trace-id"] and props.timestamp
        assert {"device-id": "gw-1", "type": "counting.crossing", "seq": "1"}.items() <= props.headers.items()


def test_a_record_without_camera_routes_with_underscore(rabbit: Any, sink: RabbitSink) -> None:
    reports = Reports()
    _send(sink, reports, camera=None)
    _poll_until(sink, reports, 1)
    [(method, _props, _body)] = drain(rabbit, "camera.queue")
    assert method.routing_key == "gw-1._"


def test_unroutable_message_is_the_records_fault_never_a_success(rabbit: Any, sink: RabbitSink) -> None:
    conn = connect(rabbit)
    ch = conn.channel()
    ch.queue_unbind("camera.queue", "camera.events", "#")
    try:
        reports = Reports()
        message_id = _send(sink, reports)
        _poll_until(sink, reports, 1)
        [(err, where)] = reports.by_id[message_id]
        assert where is None and err is not None and err.records_fault and err.retriable
        assert "unroutable" in err.text
    finally:
        ch.queue_bind("camera.queue", "camera.events", "#")
        conn.close()


def test_unknown_stream_is_rejected_at_once(sink: RabbitSink) -> None:
    reports = Reports()
    message_id = _send(sink, reports, topic="no.such.stream")
    _poll_until(sink, reports, 1)
    [(err, _)] = reports.by_id[message_id]
    assert err is not None and err.records_fault and not err.retriable


def test_dlq_queue_keeps_letters_for_the_retention_as_message_ttl(rabbit: Any, sink: RabbitSink) -> None:
    if not isinstance(rabbit, RabbitNode):
        pytest.skip("EDGE_TEST_AMQP: cannot list queue arguments")
    args = rabbit.ctl("list_queues", "name", "arguments", "--no-table-headers", "--quiet")
    [line] = [x for x in args.splitlines() if x.startswith("dlq.queue")]
    assert "604800000" in line


def test_password_comes_from_its_variable(rabbit: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    if not isinstance(rabbit, RabbitNode):
        pytest.skip("EDGE_TEST_AMQP: cannot add users")
    rabbit.add_user("edge-bridge", "s3cret")
    cfg = RabbitMqConfig(url=rabbit.url(user="edge-bridge"), password_env="EDGE_TEST_RABBIT_PW")
    monkeypatch.delenv("EDGE_TEST_RABBIT_PW", raising=False)
    with pytest.raises(ConfigError, match="EDGE_TEST_RABBIT_PW"):
        RabbitSink(cfg)
    monkeypatch.setenv("EDGE_TEST_RABBIT_PW", "wrong")
    refused = RabbitSink(cfg).start()
    try:
        wait_for(lambda: "cannot connect" in refused.last_error or "closed" in refused.last_error, 30)
        assert not refused.connected
    finally:
        refused.close()
    monkeypatch.setenv("EDGE_TEST_RABBIT_PW", "s3cret")
    _delivers_one(cfg)


def _delivers_one(cfg: RabbitMqConfig) -> None:
    """A sink built from ``cfg`` connects and gets one record confirmed."""
    s = RabbitSink(cfg).start()
    try:
        reports = Reports()
        _send(s, reports)
        _poll_until(s, reports, 1)
        assert [e for r in reports.by_id.values() for e, _ in r] == [None]
    finally:
        s.close()


def test_tls_with_a_client_certificate(rabbit: Any, tmp_path: Path) -> None:
    if not isinstance(rabbit, RabbitNode) or rabbit.pki is None:
        pytest.skip("needs the private node's TLS listener")
    cert, key = rabbit.pki.client_cert("edge-bridge")
    _delivers_one(RabbitMqConfig(url=rabbit.url(tls=True), tls={"ca": rabbit.pki.ca_path, "cert": cert, "key": key}))


def test_dlq_retry_republishes_passing_failures_and_keeps_poison(rabbit: Any, sink: RabbitSink) -> None:
    reports = Reports()
    letters = []
    for reason in ("retries_exhausted", "retries_exhausted", "bad_json"):
        key, value, headers = _record()
        headers += [(DLQ_REASON, reason.encode()), (DLQ_SOURCE_TOPIC, b"edge/gw-1/events")]
        letters.append(dict(headers)["message-id"].decode())
        sink.send("dlq", key, value, headers, reports.callback(letters[-1]))
    _poll_until(sink, reports, 3)
    admin = RabbitQueueAdmin(_cfg(rabbit), source_topic=lambda s: "camera.events" if s.endswith("/events") else None)
    [status] = admin.status(["camera.events"])
    assert (status.lag, status.dlqSize) == (0, 3)
    assert admin.retry_dead_letters("camera.events", 10) == RetryResult(retried=2, errors=0, skipped=1)
    back = drain(rabbit, "camera.queue")
    assert sorted(p.message_id for _, p, _ in back) == sorted(letters[:2])
    assert all("dlq-retried-at" in p.headers for _, p, _ in back)
    assert admin.status(["camera.events"])[0].dlqSize == 1  # the poison letter stays


def test_memory_alarm_holds_every_ack_until_it_clears(rabbit: Any, sink: RabbitSink) -> None:
    if not isinstance(rabbit, RabbitNode):
        pytest.skip("EDGE_TEST_AMQP: cannot raise an alarm there")
    rabbit.set_memory_alarm(True)
    try:
        reports = Reports()
        _send(sink, reports)  # the publish that makes RabbitMQ block the connection
        wait_for(lambda: sink.blocked, 30, message="connection blocked")
        ids = [_send(sink, reports, seq=i + 1) for i in range(50)]
        sink.poll(1.0)
        assert not any(reports.by_id.get(i) for i in ids), "acked while RabbitMQ was blocking"
    finally:
        rabbit.set_memory_alarm(False)
    _poll_until(sink, reports, 51)
    assert all(errs == [(None, Delivered("camera.events"))] for errs in reports.by_id.values())
    assert len(drain(rabbit, "camera.queue")) == 51


def test_broker_killed_mid_stream_loses_nothing_it_confirmed(rabbit: Any, sink: RabbitSink) -> None:
    if not isinstance(rabbit, RabbitNode):
        pytest.skip("EDGE_TEST_AMQP: cannot kill it")
    reports = Reports()
    ids = [_send(sink, reports, seq=i + 1) for i in range(3000)]
    sink.poll(0.01)
    rabbit.kill()
    wait_for(lambda: sink.poll(0.05) >= 0 and not sink.connected, 30, message="sink saw the broker go")
    rabbit.start()
    _poll_until(sink, reports, len(ids), timeout=60)  # confirmed, lost with the connection, or sent after it
    outcomes = {i: reports.by_id[i] for i in ids}
    assert all(len(r) == 1 for r in outcomes.values())
    confirmed = {i for i, [(err, _)] in outcomes.items() if err is None}
    lost = [err for i, [(err, _)] in outcomes.items() if err is not None]
    assert all(not err.records_fault for err in lost), "an outage counted against a record"
    stored = {p.message_id for _, p, _ in drain(rabbit, "camera.queue")}
    assert confirmed <= stored, f"{len(confirmed - stored)} confirmed messages lost"
