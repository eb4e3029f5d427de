"""The bridge HTTP API: roles, publish, status shape, DLQ retry.

Unit tests drive the app with a fake bridge (one class under test); the queue-admin
tests run against the real Kafka-protocol broker (Tansu or EDGE_TEST_KAFKA).
"""

from __future__ import annotations

import json
import uuid
from concurrent.futures import Future

import httpx
import paho.mqtt.client as mqtt
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from fastapi.testclient import TestClient
from test_bridge_wire import bridge_config, running

from edge_agent.bridge.api import BODY_OVERHEAD_BYTES, create_app
from edge_agent.bridge.config import BridgeConfig
from edge_agent.bridge.daemon import serve_http
from edge_agent.bridge.queue_admin import (
    GroupLag,
    KafkaQueueAdmin,
    RetryResult,
    TopicStatus,
)
from edge_agent.common.envelope import Envelope, build, encode
from edge_testkit.kafka import create_topics
from edge_testkit.processes import wait_for
from edge_testkit.records import consume_all

TOKENS = {"T_ADMIN": ("admin-secret", "admin"), "T_SYSTEM": ("system-secret", "system"),
          "T_AUDITOR": ("auditor-secret", "auditor")}


def auth(role: str) -> dict[str, str]:
    token = {r: t for t, r in TOKENS.values()}[role]
    return {"Authorization": f"Bearer {token}"}


class FakeBridge:
    """Records what the API submits; ``outcome`` decides how the Kafka confirmation ends."""

    def __init__(self, cfg: BridgeConfig, outcome: str = "ok"):
        self.config = cfg
        self.outcome = outcome
        self.submitted: list[tuple[str, Envelope, str | None]] = []

    def submit(self, kafka_topic: str, envelope: Envelope, *, key: str | None = None) -> Future:
        self.submitted.append((kafka_topic, envelope, key))
        fut: Future = Future()
        if self.outcome == "ok":
            fut.set_result(None)
        elif self.outcome == "fail":
            fut.set_exception(RuntimeError("MSG_SIZE_TOO_LARGE"))
        return fut  # "hang": never resolves

    def health(self) -> dict:
        return {"mqtt": {"connected": True}, "kafka": {"connected": False}}


class FakeInspector:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def status(self, topics: list[str]) -> list[TopicStatus]:
        self.calls.append(("status", tuple(topics)))
        return [TopicStatus(topic=t, lag=0, consumerCount=0, dlqSize=0) for t in topics]

    def retry_dead_letters(self, topic: str, max_messages: int) -> RetryResult:
        self.calls.append(("retry", topic, max_messages))
        return RetryResult(retried=0, errors=0)

    def lags(self, topics: list[str]) -> list[TopicStatus]:
        return [TopicStatus(topic=t, lag=5, consumerCount=1, dlqSize=0,
                            groups=[GroupLag(group="analytics", lag=5, members=1)]) for t in topics]


@pytest.fixture
def bridge_cfg(monkeypatch: pytest.MonkeyPatch) -> BridgeConfig:
    for env, (token, _role) in TOKENS.items():
        monkeypatch.setenv(env, token)
    return BridgeConfig.model_validate({
        "http": {"tokens": [{"token_env": env, "role": role} for env, (_t, role) in TOKENS.items()]
                 + [{"token_env": "T_UNSET", "role": "admin"}]},
        "topics": {"camera.events": "camera.events", "notifications": "central.notifications"},
        "max_message_bytes": 2000,
    })


def with_docs(cfg: BridgeConfig) -> BridgeConfig:
    return cfg.model_copy(update={"http": cfg.http.model_copy(update={"docs": True})})


def make_client(cfg: BridgeConfig, outcome: str = "ok",
                timeout: float = 30.0) -> tuple[TestClient, FakeBridge, FakeInspector]:
    bridge, inspector = FakeBridge(cfg, outcome), FakeInspector()
    return TestClient(create_app(bridge, inspector, confirm_timeout_s=timeout)), bridge, inspector


PUBLISH = ("post", "/api/v1/queue/publish", {"topic": "camera.events", "message": {"type": "door.open"}})
STATUS = ("get", "/api/v1/queue/status", None)
RETRY = ("post", "/api/v1/queue/dlq/retry", {"topic": "camera.events"})


@pytest.mark.parametrize("role,call,expected", [
    ("admin", PUBLISH, 200), ("admin", STATUS, 200), ("admin", RETRY, 200),
    ("system", PUBLISH, 200), ("system", STATUS, 403), ("system", RETRY, 403),
    ("auditor", PUBLISH, 403), ("auditor", STATUS, 200), ("auditor", RETRY, 403),
])
def test_roles_decide_what_a_token_may_do(bridge_cfg: BridgeConfig, role: str, call: tuple, expected: int) -> None:
    client, bridge, inspector = make_client(bridge_cfg)
    method, path, body = call
    r = client.request(method, path, json=body, headers=auth(role))
    assert r.status_code == expected, r.text
    if expected == 403:
        assert r.json()["status"] == "error" and role in r.json()["error"]
        assert not bridge.submitted and not inspector.calls  # refused before doing anything


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic YWRtaW4="},
                                     {"Authorization": "Bearer "}])
@pytest.mark.parametrize("call", [PUBLISH, STATUS, RETRY])
def test_missing_or_unknown_token_is_401(bridge_cfg: BridgeConfig, headers: dict, call: tuple) -> None:
    client, bridge, _ = make_client(bridge_cfg)
    method, path, body = call
    r = client.request(method, path, json=body, headers=headers)
    assert r.status_code == 401
    assert r.headers.get("www-authenticate") == "Bearer"
    assert not bridge.submitted


def test_healthz_metrics_and_openapi_need_no_token(bridge_cfg: BridgeConfig) -> None:
    client, _, _ = make_client(bridge_cfg)
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["mqtt"] == {"connected": True}
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "edge_bridge_received_total" in metrics.text
    for path in ("/openapi.json", "/docs", "/redoc"):  # off unless configured
        assert client.get(path).status_code == 404
    client, _, _ = make_client(with_docs(bridge_cfg))
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/api/v1/queue/publish", "/api/v1/queue/status", "/api/v1/queue/dlq/retry"} <= set(spec["paths"])
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_publish_wraps_the_message_in_an_envelope(bridge_cfg: BridgeConfig) -> None:
    client, bridge, _ = make_client(bridge_cfg)
    first = client.post("/api/v1/queue/publish", headers={**auth("system"), "X-Correlation-ID": "req-42"},
                        json={"topic": "notifications", "message": {"type": "door.open", "camera_id": "cam-9", "n": 1},
                              "key": "door-1"})
    second = client.post("/api/v1/queue/publish", headers=auth("admin"),
                         json={"topic": "camera.events", "message": {"type": 7}})
    assert first.status_code == 200 and second.status_code == 200
    (t1, env1, key1), (t2, env2, key2) = bridge.submitted
    assert first.json() == {"status": "ok", "messageId": env1.id, "traceId": env1.trace_id, "error": None}
    assert first.headers["X-Trace-ID"] == env1.trace_id
    assert (t1, key1) == ("central.notifications", "door-1")  # the mapped Kafka topic, the caller's key
    assert (env1.type, env1.camera_id, env1.correlation_id) == ("door.open", "cam-9", "req-42")
    assert env1.data == {"type": "door.open", "camera_id": "cam-9", "n": 1}
    assert env1.device_id == bridge_cfg.mqtt.client_id
    assert (t2, key2, env2.type, env2.correlation_id) == ("camera.events", None, "external", None)
    assert (env1.seq, env2.seq) == (1, 2)  # a process counter from 1
    assert env1.trace_id != env2.trace_id


def test_publish_takes_the_messages_trace_id_and_an_empty_camera_id_is_none(bridge_cfg: BridgeConfig) -> None:
    client, bridge, _ = make_client(bridge_cfg)
    trace = "0123456789abcdef0123456789abcdef"
    r = client.post("/api/v1/queue/publish", headers=auth("admin"),
                    json={"topic": "camera.events", "message": {"trace_id": trace, "camera_id": ""}})
    assert r.status_code == 200, r.text
    env = bridge.submitted[0][1]
    assert (env.trace_id, env.camera_id, r.json()["traceId"], r.headers["X-Trace-ID"]) == (trace, None, trace, trace)


@pytest.mark.parametrize("body,code,fragment", [
    ({"topic": "nope", "message": {}}, 422, "camera.events"),  # the error names the valid topics
    ({"topic": "camera.events", "message": [1, 2]}, 422, "message"),
    ({"topic": "camera.events", "message": "text"}, 422, "message"),
    ({"topic": "camera.events"}, 422, "message"),
    ({"topic": "camera.events", "message": {}, "extra": 1}, 422, "extra"),
    ({"topic": "camera.events", "message": {"blob": "x" * 5000}}, 413, "larger"),
])
def test_bad_publish_bodies_get_a_clear_4xx_and_nothing_is_sent(bridge_cfg: BridgeConfig, body: dict, code: int,
                                                                fragment: str) -> None:
    client, bridge, _ = make_client(bridge_cfg)
    r = client.post("/api/v1/queue/publish", headers=auth("admin"), json=body)
    assert r.status_code == code, r.text
    assert r.json()["status"] == "error" and fragment in r.json()["error"]
    assert not bridge.submitted
    # a refused body does not use up a seq: the next good one is still 1
    ok = client.post("/api/v1/queue/publish", headers=auth("admin"), json={"topic": "camera.events", "message": {}})
    assert ok.status_code == 200 and bridge.submitted[-1][1].seq == 1


@pytest.mark.parametrize("message,fragment", [
    ({"camera_id": "c" * 129}, "camera_id"),  # built into the envelope: was a 500
    ({"type": "t" * 129}, "type"),  # as on the agent (the bridge once cut it to 128)
    ({"trace_id": "NOT-A-TRACE-ID"}, "trace_id"),
    ({"x": float("nan")}, "message"),  # stored, NaN would have become null
    ({"x": [float("inf")]}, "message"),
])
def test_a_message_that_makes_no_valid_envelope_is_422(bridge_cfg: BridgeConfig, message: dict,
                                                      fragment: str) -> None:
    client, bridge, _ = make_client(bridge_cfg)
    body = json.dumps({"topic": "camera.events", "message": message})  # json writes NaN as the bare word
    r = client.post("/api/v1/queue/publish", headers={**auth("admin"), "Content-Type": "application/json"},
                    content=body)
    assert r.status_code == 422, r.text
    assert fragment in r.json()["error"] and not bridge.submitted


def test_bodies_over_the_limit_are_413_before_anything_reads_them(bridge_cfg: BridgeConfig) -> None:
    client, bridge, _ = make_client(bridge_cfg)
    limit = bridge_cfg.max_message_bytes + BODY_OVERHEAD_BYTES
    big = b'{"topic": "camera.events", "message": {"x": "' + b"y" * limit + b'"}}'
    for headers in ({}, auth("admin")):  # also without a token: the limit comes before auth
        r = client.post("/api/v1/queue/publish", content=big, headers={**headers, "Content-Type": "application/json"})
        assert r.status_code == 413, r.text  # Starlette's limiter answers a declared length in plain text
    # streamed without a Content-Length: counted as it comes
    r = client.post("/api/v1/queue/publish", content=iter([big[:1000], big[1000:]]),
                    headers={**auth("admin"), "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["status"] == "error"
    assert not bridge.submitted


def test_healthz_is_503_naming_a_dead_part(bridge_cfg: BridgeConfig) -> None:
    bridge = FakeBridge(bridge_cfg)
    parts = {"bridge-worker": {"state": "dead", "restarts": 5, "last_error": "RuntimeError: boom"}}
    bridge.health = lambda: {"mqtt": {"connected": True}, "parts": parts, "dead": ["bridge-worker"]}  # type: ignore
    r = TestClient(create_app(bridge, FakeInspector())).get("/healthz")
    assert r.status_code == 503
    assert r.json()["status"] == "unhealthy" and r.json()["dead"] == ["bridge-worker"]
    assert r.json()["parts"] == parts


def test_publish_reports_kafka_failure_and_timeout_with_the_message_id(bridge_cfg: BridgeConfig) -> None:
    client, bridge, _ = make_client(bridge_cfg, outcome="fail")
    r = client.post("/api/v1/queue/publish", headers=auth("admin"), json={"topic": "camera.events", "message": {}})
    assert r.status_code == 502 and "MSG_SIZE_TOO_LARGE" in r.json()["error"]
    assert r.json()["messageId"] == bridge.submitted[0][1].id
    client, bridge, _ = make_client(bridge_cfg, outcome="hang", timeout=0.2)
    r = client.post("/api/v1/queue/publish", headers=auth("admin"), json={"topic": "camera.events", "message": {}})
    assert r.status_code == 504 and r.json()["messageId"] == bridge.submitted[0][1].id


def test_status_and_retry_validate_topics(bridge_cfg: BridgeConfig) -> None:
    client, _, inspector = make_client(with_docs(bridge_cfg))
    everything = client.get("/api/v1/queue/status", headers=auth("auditor"))
    assert [s["topic"] for s in everything.json()] == ["camera.events", "central.notifications"]
    one = client.get("/api/v1/queue/status", params={"topic": "dlq"}, headers=auth("auditor"))
    assert one.status_code == 200 and set(one.json()[0]) >= {"topic", "lag", "consumerCount", "dlqSize"}
    assert client.get("/api/v1/queue/status", params={"topic": "x"}, headers=auth("admin")).status_code == 422
    assert client.post("/api/v1/queue/dlq/retry", json={"topic": "dlq"}, headers=auth("admin")).status_code == 422
    assert client.post("/api/v1/queue/dlq/retry", json={"topic": "camera.events", "maxMessages": 0},
                       headers=auth("admin")).status_code == 422
    spec = client.get("/openapi.json").json()["components"]["schemas"]
    assert spec["PublishRequest"]["properties"]["topic"]["enum"] == ["camera.events", "notifications"]
    assert client.post("/api/v1/queue/dlq/retry", json={"topic": "camera.events", "maxMessages": 0},
                       headers=auth("admin")).status_code == 422
    r = client.post("/api/v1/queue/dlq/retry", json={"topic": "camera.events", "maxMessages": 7}, headers=auth("admin"))
    assert r.json() == {"retried": 0, "errors": 0, "skipped": 0}
    assert ("retry", "camera.events", 7) in inspector.calls


# --- queue admin over the real Kafka protocol ---------------------------------------------------

def _produce_one_by_one(kafka, topic: str, n: int) -> None:
    """One record per batch: the test broker's high watermark is only right for such batches."""
    producer = Producer(kafka.client_config())
    for i in range(n):
        producer.produce(topic, value=json.dumps({"i": i}).encode(), partition=0)
        assert producer.flush(10) == 0


def _dead_letter(producer: Producer, dlq: str, source: str, reason: str | None, value: bytes) -> None:
    headers = [("message-id", uuid.uuid4().hex.encode()), ("dlq-reason", (reason or "").encode()),
               ("dlq-error", b"boom"), ("dlq-source-topic", source.encode()), ("dlq-attempts", b"5"),
               ("dlq-first-failed-at", b"2026-11-26T06:00:00.000Z")]
    producer.produce(dlq, value=value, key=b"gw-1/cam-1",
                     headers=[h for h in headers if reason is not None or h[0] != "dlq-reason"])


def _letter_value(n: int) -> bytes:
    """What the bridge dead-letters after retries_exhausted: a valid envelope."""
    return encode(build("gw-1", n + 1, "camera.online", {"n": n}, camera_id="cam-1"))


@pytest.mark.timeout(90)
def test_status_reports_group_lag_and_dead_letters(kafka, unique_topic: str) -> None:
    topic, other, dlq = unique_topic, unique_topic + "-other", unique_topic + "-dlq"
    create_topics(kafka, [topic, other, dlq], partitions=1)
    _produce_one_by_one(kafka, topic, 5)
    group = f"readers-{uuid.uuid4().hex[:6]}"
    reader = Consumer({**kafka.client_config(), "group.id": group, "enable.auto.commit": False})
    reader.commit(offsets=[TopicPartition(topic, 0, 2)], asynchronous=False)  # read 2 of 5
    reader.close()
    producer = Producer(kafka.client_config())
    for _ in range(3):
        _dead_letter(producer, dlq, topic, "retries_exhausted", b"{}")
    _dead_letter(producer, dlq, other, "invalid_json", b"not json")
    assert producer.flush(10) == 0

    admin = KafkaQueueAdmin(kafka.client_config(), dlq)
    mine, theirs = wait_for(lambda: (s := admin.status([topic, other])) and s[0].dlqSize == 3 and s, 20,
                            message="status shows the dead letters")
    assert (mine.topic, mine.lag, mine.dlqSize) == (topic, 3, 3)
    assert [(g.group, g.lag) for g in mine.groups] == [(group, 3)]
    assert (theirs.lag, theirs.dlqSize, theirs.groups) == (0, 1, [])
    assert [(s.lag, s.groups) for s in admin.lags([topic])] == [(3, mine.groups)]  # what /metrics exports
    # This broker leaves DescribeGroups members empty, so there is nobody to count; a real Kafka
    # (EDGE_TEST_KAFKA) reports the members of active groups.
    assert mine.consumerCount >= 0


@pytest.mark.timeout(90)
def test_dlq_retry_round_trip_sends_each_letter_once(kafka, unique_topic: str) -> None:
    topic, dlq = unique_topic, unique_topic + "-dlq"
    create_topics(kafka, [topic, dlq], partitions=1)
    producer = Producer(kafka.client_config())
    for i in range(3):
        _dead_letter(producer, dlq, topic, "retries_exhausted", _letter_value(i))
    _dead_letter(producer, dlq, topic, "invalid_json", b"{oops")  # poison stays in the DLQ
    _dead_letter(producer, dlq, "elsewhere", "retries_exhausted", _letter_value(9))  # another topic's letter
    assert producer.flush(10) == 0

    admin = KafkaQueueAdmin(kafka.client_config(), dlq)
    assert admin.retry_dead_letters(topic, max_messages=2) == RetryResult(retried=2, errors=0, skipped=0)
    assert admin.retry_dead_letters(topic, max_messages=10) == RetryResult(retried=1, errors=0, skipped=1)
    assert admin.retry_dead_letters(topic, max_messages=10) == RetryResult(retried=0, errors=0, skipped=0)

    records = consume_all(kafka, topic, 3, timeout=20, settle_s=0.5)
    assert sorted(r.json()["data"]["n"] for r in records) == [0, 1, 2]
    for r in records:
        assert r.key == b"gw-1/cam-1"
        assert r.headers["dlq-source-topic"] == topic.encode() and r.headers["dlq-reason"] == b"retries_exhausted"
        assert r.headers["dlq-retried-at"].endswith(b"Z")
    # the DLQ keeps every letter: retry copies, it does not delete
    assert admin.count_dead_letters({topic}) == {topic: 4}


# --- the API inside a real Bridge, over real HTTP, MQTT and Kafka -------------------------------

@pytest.mark.timeout(120)
def test_api_of_a_running_bridge_over_the_wire(mqtt_broker, kafka, monkeypatch: pytest.MonkeyPatch) -> None:
    for env, (token, _role) in TOKENS.items():
        monkeypatch.setenv(env, token)
    cfg = bridge_config(mqtt_broker, kafka, http={
        "tokens": [{"token_env": env, "role": role} for env, (_t, role) in TOKENS.items()]})
    events, dlq = cfg.topics["camera.events"], cfg.dlq.topic
    create_topics(kafka, [events, dlq], partitions=1)
    host, port = cfg.http.host_port
    with running(cfg) as bridge:
        stop_http = serve_http(bridge)
        try:
            http = httpx.Client(base_url=f"http://{host}:{port}", timeout=30)
            wait_for(lambda: _answers(http), 15, message="bridge HTTP up")
            assert http.get("/healthz").json()["mqtt"] == {"connected": True}

            # publish: answered after Kafka confirms; ids and the correlation id travel with the record
            r = http.post("/api/v1/queue/publish", headers={**auth("system"), "X-Correlation-ID": "order-7"},
                          json={"topic": "camera.events", "message": {"type": "door.open", "camera_id": "door-cam"}})
            assert r.status_code == 200, r.text
            [rec] = consume_all(kafka, events, 1, timeout=20)
            assert rec.headers["message-id"] == r.json()["messageId"].encode()
            assert rec.headers["trace-id"] == r.json()["traceId"].encode()
            body = rec.json()
            assert (body["type"], body["correlation_id"], body["camera_id"]) == ("door.open", "order-7", "door-cam")
            assert rec.key == f"{cfg.mqtt.client_id}/door-cam".encode()
            assert http.post("/api/v1/queue/publish", headers=auth("auditor"),
                             json={"topic": "camera.events", "message": {}}).status_code == 403

            # poison from a device lands in the DLQ; status counts it against the topic it was meant for
            pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
            pub.connect(cfg.mqtt.host, cfg.mqtt.port)
            pub.loop_start()
            pub.publish(f"{cfg.mqtt.topic_prefix}/gw-9/up/camera.events", b"{not json", qos=1).wait_for_publish(10)
            pub.loop_stop()
            pub.disconnect()

            def dead_letters() -> int:
                s = http.get("/api/v1/queue/status", params={"topic": events}, headers=auth("auditor"))
                assert s.status_code == 200, s.text
                [row] = s.json()
                assert set(row) >= {"topic", "lag", "consumerCount", "dlqSize"} and row["topic"] == events
                return row["dlqSize"]
            wait_for(lambda: dead_letters() == 1, 30, message="status shows the dead letter")

            # retry leaves poison where it is: nothing re-sent, the letter is still counted
            r = http.post("/api/v1/queue/dlq/retry", headers=auth("admin"), json={"topic": events})
            assert r.status_code == 200 and r.json() == {"retried": 0, "errors": 0, "skipped": 1}
            assert dead_letters() == 1
            assert http.post("/api/v1/queue/dlq/retry", headers=auth("auditor"),
                             json={"topic": events}).status_code == 403
        finally:
            stop_http()


def _answers(http: httpx.Client) -> bool:
    try:
        return http.get("/healthz").status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.timeout(90)
def test_a_failed_retry_is_counted_and_tried_again_next_time(kafka, unique_topic: str) -> None:
    dlq = unique_topic + "-dlq"
    bad = "not a valid topic!"  # the broker refuses records for it: every re-publish fails
    create_topics(kafka, [dlq], partitions=1)
    producer = Producer(kafka.client_config())
    for i in range(2):
        _dead_letter(producer, dlq, bad, "retries_exhausted", _letter_value(i))
    assert producer.flush(10) == 0
    admin = KafkaQueueAdmin(kafka.client_config(), dlq, timeout_s=20)
    assert admin.retry_dead_letters(bad, max_messages=10) == RetryResult(retried=0, errors=2, skipped=0)
    # nothing was committed past a failed letter: the next call meets both again
    assert admin.retry_dead_letters(bad, max_messages=10) == RetryResult(retried=0, errors=2, skipped=0)


@pytest.mark.timeout(90)
def test_dlq_retry_refuses_letters_without_a_reason_or_a_valid_envelope(kafka, unique_topic: str) -> None:
    topic, dlq = unique_topic, unique_topic + "-dlq"
    create_topics(kafka, [topic, dlq], partitions=1)
    producer = Producer(kafka.client_config())
    _dead_letter(producer, dlq, topic, None, _letter_value(0))  # not the bridge's: no dlq-reason
    _dead_letter(producer, dlq, topic, "retries_exhausted", json.dumps({"n": 1}).encode())  # no envelope
    _dead_letter(producer, dlq, topic, "retries_exhausted", _letter_value(2)[:-1] + b', "x": NaN}')
    _dead_letter(producer, dlq, topic, "retries_exhausted", _letter_value(3))  # the one to re-send
    assert producer.flush(10) == 0
    admin = KafkaQueueAdmin(kafka.client_config(), dlq)
    assert admin.retry_dead_letters(topic, max_messages=10) == RetryResult(retried=1, errors=3, skipped=0)
    # refused for good: passed, not met again, and still in the DLQ
    assert admin.retry_dead_letters(topic, max_messages=10) == RetryResult(retried=0, errors=0, skipped=0)
    [record] = consume_all(kafka, topic, 1, timeout=20, settle_s=0.5)
    assert record.json()["data"] == {"n": 3}
    assert admin.count_dead_letters({topic}) == {topic: 4}


def test_status_counts_members_that_read_the_topic() -> None:
    from edge_agent.bridge.queue_admin import _GroupView

    reading = _GroupView("analytics", committed={("t", 0): 7, ("t", 1): 3, ("u", 0): 1},
                         members=[{"t"}, {"t", "u"}, {"u"}])
    unknown_assignment = _GroupView("legacy", committed={("t", 0): 10}, members=[set()])
    elsewhere = _GroupView("other", committed={("u", 0): 0}, members=[{"u"}])
    ends = {("t", 0): 10, ("t", 1): 3, ("u", 0): 5}
    status = KafkaQueueAdmin._topic_status("t", ends, [reading, unknown_assignment, elsewhere], dlq_size=2)
    assert (status.lag, status.consumerCount, status.dlqSize) == (3, 3, 2)
    assert [(g.group, g.lag, g.members) for g in status.groups] == [("analytics", 3, 2), ("legacy", 0, 1)]
    # a watermark below the committed offset (Tansu) never makes lag negative
    low = KafkaQueueAdmin._topic_status("t", {("t", 0): 1}, [unknown_assignment], dlq_size=0)
    assert low.lag == 0


def test_metrics_export_consumer_lag_without_slowing_the_scrape(bridge_cfg: BridgeConfig) -> None:
    client, _, _ = make_client(bridge_cfg)
    series = 'edge_bridge_consumer_lag{group="analytics",topic="camera.events"} 5.0'
    client.get("/metrics")  # starts the refresh in the background
    wait_for(lambda: series in client.get("/metrics").text, 10, message="lag series on /metrics")


@pytest.mark.timeout(120)
def test_consumer_count_of_an_active_group(kafka, unique_topic: str) -> None:
    if not getattr(kafka, "external", False):
        pytest.skip("Tansu reports no group members; run with EDGE_TEST_KAFKA=host:port against a real Kafka")
    create_topics(kafka, [unique_topic], partitions=1)
    group = f"active-{uuid.uuid4().hex[:6]}"
    consumer = Consumer({**kafka.client_config(), "group.id": group, "session.timeout.ms": 6000,
                         "auto.offset.reset": "earliest"})
    try:
        consumer.subscribe([unique_topic])
        wait_for(lambda: consumer.poll(0.2) is None and consumer.assignment(), 60, message="partition assigned")
        admin = KafkaQueueAdmin(kafka.client_config(), unique_topic + "-dlq")
        [row] = wait_for(lambda: (s := admin.lags([unique_topic])) and s[0].consumerCount >= 1 and s, 30,
                         message="the group's member counted")
        assert [g.group for g in row.groups] == [group]
    finally:
        consumer.close()


def test_healthz_answers_200_even_when_health_breaks(bridge_cfg: BridgeConfig) -> None:
    bridge = FakeBridge(bridge_cfg)
    bridge.health = lambda: (_ for _ in ()).throw(RuntimeError("stats thread died"))  # type: ignore[method-assign]
    client = TestClient(create_app(bridge, FakeInspector()))
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok", "health_error": "stats thread died"}
