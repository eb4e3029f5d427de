"""Unit tests of the bridge's pure parts: validation, ack ranges, retry policy, dedupe window, Kafka settings.

The behaviour over the real wire (Mosquitto + Kafka protocol) is in test_bridge_wire.py.
"""

from __future__ import annotations

import json
import random

import pytest
from confluent_kafka import KafkaError
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.bridge import validate
from edge_agent.bridge.config import BridgeConfig, KafkaConfig, RetryConfig
from edge_agent.bridge.inflight import AckBatcher, RecentIds
from edge_agent.bridge.kafka import kafka_client_config, producer_config
from edge_agent.bridge.kafka_sink import send_error
from edge_agent.bridge.retry import RetryHeap, plan_after_failure, retry_delay
from edge_agent.bridge.sink import SendError
from edge_agent.bridge.validate import Accepted, Rejected, classify
from edge_agent.common.config import ConfigError
from edge_agent.common.envelope import build, encode
from edge_agent.common.wire import parse_uplink_topic, seq_ranges

CFG = BridgeConfig.model_validate({"max_message_bytes": 2000})
GOOD_TOPIC = "edge/gw-1/up/camera.events"


def good_payload(device: str = "gw-1", seq: int = 7) -> bytes:
    return encode(build(device, seq, "camera.online", {"x": 1}, camera_id="cam-1"))


# --- classify ----------------------------------------------------------------------------------

def test_a_valid_envelope_is_accepted_for_its_streams_kafka_topic() -> None:
    verdict = classify(GOOD_TOPIC, good_payload(), CFG)
    assert isinstance(verdict, Accepted)
    assert (verdict.kafka_topic, verdict.device, verdict.envelope.seq) == ("camera.events", "gw-1", 7)


@pytest.mark.parametrize("topic, payload, reason, seq", [
    (GOOD_TOPIC, b"{not json", "invalid_json", None),
    (GOOD_TOPIC, b"\xff\xfe\x00", "invalid_json", None),
    (GOOD_TOPIC, b"[1, 2]", "invalid_envelope", None),
    (GOOD_TOPIC, json.dumps({**json.loads(good_payload()), "v": 2}).encode(), "invalid_envelope", 7),
    (GOOD_TOPIC, json.dumps({**json.loads(good_payload()), "trace_id": "nope"}).encode(), "invalid_envelope", 7),
    (GOOD_TOPIC, good_payload(device="gw-2"), "device_mismatch", None),
    ("edge/gw-1/up/no.such.stream", good_payload(), "unmapped_topic", 7),
    ("edge/gw-1/up", good_payload(), "unmapped_topic", None),
    ("edge/gw-1/up/camera.events/extra", good_payload(), "unmapped_topic", None),
    (GOOD_TOPIC, good_payload()[:-1] + b', "pad": "' + b"x" * 3000 + b'"}', "too_large", 7),
])
def test_bad_input_is_rejected_with_its_reason(topic: str, payload: bytes, reason: str, seq: int | None) -> None:
    verdict = classify(topic, payload, CFG)
    assert isinstance(verdict, Rejected)
    assert verdict.reason == reason
    assert verdict.error  # a clear message for the dlq-error header
    assert verdict.seq == seq  # the device's own seq is acked so that it stops re-sending


@pytest.mark.parametrize("topic, payload, reason", [
    (GOOD_TOPIC, b"[" * 3000, "invalid_json"),
    (GOOD_TOPIC, b'{"a":' * 3000, "invalid_json"),
    ("edge/gw-1/up/anything", b"[" * 3000, "unmapped_topic"),  # its seq lookup raised RecursionError
    ("edge/gw-1/up/anything", b'{"a":' * 3000 + b"1" + b"}" * 3000, "unmapped_topic"),
    (GOOD_TOPIC, good_payload()[:-1] + b', "x": NaN}', "invalid_json"),
    (GOOD_TOPIC, good_payload()[:-1] + b', "x": [-Infinity]}', "invalid_json"),
    (GOOD_TOPIC, b'\xff' + good_payload(), "invalid_json"),
    ("edge/" + "d" * 60_000 + "/up/camera.events", good_payload(), "unmapped_topic"),
])
def test_hostile_input_is_rejected_not_raised(topic: str, payload: bytes, reason: str) -> None:
    verdict = classify(topic, payload, BridgeConfig.model_validate({"max_message_bytes": 100_000}))
    assert isinstance(verdict, Rejected) and verdict.reason == reason
    assert len(verdict.error) < 1000


def test_nan_inside_a_string_is_fine() -> None:
    verdict = classify(GOOD_TOPIC, encode(build("gw-1", 1, "t", {"s": "NaN and Infinity"})), CFG)
    assert isinstance(verdict, Accepted) and verdict.envelope.data == {"s": "NaN and Infinity"}


def test_a_duplicated_device_id_is_judged_by_the_value_forwarded() -> None:
    # json keeps the last of two keys; a consumer may keep the first. The bridge forwards
    # encode(envelope), which has only the one it checked.
    body = good_payload(device="gw-1")
    spoofed = b'{"device_id": "gw-evil", ' + body[1:]
    verdict = classify(GOOD_TOPIC, spoofed, CFG)
    assert isinstance(verdict, Accepted)
    assert encode(verdict.envelope).count(b'"device_id"') == 1 and b"gw-evil" not in encode(verdict.envelope)


def test_only_topics_that_parse_are_cached_and_the_cache_is_bounded() -> None:
    validate._TOPICS.clear()
    for i in range(50):
        classify(f"junk/{i}", b"{}", CFG)
    assert not validate._TOPICS
    for i in range(validate.TOPIC_CACHE_SIZE + 10):
        validate._parse_cached(f"edge/gw-{i}/up/camera.events", "edge")
    assert len(validate._TOPICS) <= validate.TOPIC_CACHE_SIZE


def test_dead_letter_headers_clip_the_senders_text() -> None:
    from edge_agent.bridge.kafka import dlq_headers

    headers = dict(dlq_headers("unmapped_topic", "e" * 100_000, "t" * 60_000, 0, "2026-01-01T00:00:00.000Z"))
    assert len(headers["dlq-error"]) < 1100 and len(headers["dlq-source-topic"]) < 1100


def test_recent_ids_are_per_device() -> None:
    recent = RecentIds(10)
    recent.add(("gw-1", "id-1"))
    assert ("gw-1", "id-1") in recent and ("gw-2", "id-1") not in recent


def test_topic_prefix_with_slashes_is_parsed() -> None:
    assert parse_uplink_topic("site/a/edge/gw-1/up/notifications", "site/a/edge") == ("gw-1", "notifications")
    assert parse_uplink_topic("other/gw-1/up/notifications", "edge") is None


# --- e2e ack ranges and batching ---------------------------------------------------------------

@given(st.sets(st.integers(min_value=1, max_value=500)))
def test_merged_ranges_cover_exactly_the_seqs(seqs: set[int]) -> None:
    ranges = seq_ranges(list(seqs) + list(seqs))  # duplicates too
    covered = [s for lo, hi in ranges for s in range(lo, hi + 1)]
    assert covered == sorted(seqs)
    assert all(b[0] > a[1] + 1 for a, b in zip(ranges, ranges[1:]))  # maximal: no two ranges touch


def test_ack_batcher_is_due_by_size_or_by_age() -> None:
    acks = AckBatcher(interval_s=0.05, batch=3)
    assert acks.due_in(0.0) == float("inf")
    acks.add("a", 1, now=10.0)
    assert acks.due_in(10.01) == pytest.approx(0.04)
    acks.add("a", 2, now=10.02)
    acks.add("b", 9, now=10.02)
    assert acks.due_in(10.02) == 0.0
    assert acks.take() == {"a": [[1, 2]], "b": [[9, 9]]}
    assert acks.due_in(10.03) == float("inf")


# --- retry policy ------------------------------------------------------------------------------

RETRY = RetryConfig(max_attempts=3, delay_s=1.0, backoff="exponential", max_delay_s=3.0)


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    rng = random.Random(1)
    for attempt, base in [(1, 1.0), (2, 2.0), (3, 3.0), (10, 3.0)]:
        delays = [retry_delay(attempt, RETRY, rng) for _ in range(200)]
        assert base / 2 <= min(delays) and max(delays) <= base
        assert max(delays) - min(delays) > base / 4  # jittered, not constant


def test_fixed_backoff_keeps_the_first_delay_with_jitter() -> None:
    fixed = RETRY.model_copy(update={"backoff": "fixed", "delay_s": 2.0})
    rng = random.Random(2)
    delays = [retry_delay(attempt, fixed, rng) for attempt in (1, 5, 50) for _ in range(100)]
    assert 1.0 <= min(delays) and max(delays) <= 2.0


def test_linear_backoff_adds_the_first_delay_per_attempt_with_jitter() -> None:
    linear = RETRY.model_copy(update={"backoff": "linear", "delay_s": 2.0, "max_delay_s": 7.0})
    rng = random.Random(3)
    for attempt, base in [(1, 2.0), (2, 4.0), (3, 6.0), (9, 7.0)]:
        delays = [retry_delay(attempt, linear, rng) for _ in range(200)]
        assert base / 2 <= min(delays) and max(delays) <= base


def test_purged_records_go_again_at_once_other_outages_after_a_pause() -> None:
    purged = plan_after_failure(send_error(KafkaError(KafkaError._PURGE_QUEUE)), 0, False, RETRY)
    timed_out = plan_after_failure(send_error(KafkaError(KafkaError._MSG_TIMED_OUT)), 0, False, RETRY)
    assert purged.delay == 0.0 < timed_out.delay
    lost = plan_after_failure(SendError("connection lost", records_fault=False, retry_after=0.0), 9, False, RETRY)
    assert (lost.action, lost.delay, lost.counts) == ("send_again", 0.0, False)


def test_the_retry_heap_hands_out_what_is_due_soonest_first() -> None:
    heap: RetryHeap[str] = RetryHeap()
    assert heap.pop_due(100.0) is None and heap.due_in(100.0) == float("inf")
    heap.schedule("later", 10.0)
    heap.schedule("first", 5.0)
    heap.schedule("second", 5.0)  # same time: in the order scheduled
    assert heap.due_in(4.0) == 1.0 and heap.pop_due(4.0) is None
    assert [heap.pop_due(6.0), heap.pop_due(6.0), heap.pop_due(6.0)] == ["first", "second", None]
    assert len(heap) == 1 and heap.pop_due(10.0) == "later"


def test_outages_never_use_up_attempts() -> None:
    for code in (KafkaError._MSG_TIMED_OUT, KafkaError._TRANSPORT, KafkaError.UNKNOWN_PRODUCER_ID,
                 KafkaError._PURGE_INFLIGHT):
        plan = plan_after_failure(send_error(KafkaError(code)), attempts=99, is_dead_letter=False, cfg=RETRY)
        assert plan.action == "send_again" and not plan.counts


def test_retriable_refusals_back_off_then_exhaust() -> None:
    err = send_error(KafkaError(KafkaError.NOT_ENOUGH_REPLICAS, retriable=True))
    assert plan_after_failure(err, 0, False, RETRY).action == "send_again"
    assert plan_after_failure(err, 1, False, RETRY).counts
    final = plan_after_failure(err, 2, False, RETRY)
    assert (final.action, final.reason) == ("dead_letter", "retries_exhausted")


def test_permanent_refusal_is_dead_lettered_at_once_but_a_dead_letter_is_never_dropped() -> None:
    err = send_error(KafkaError(KafkaError.TOPIC_EXCEPTION))
    assert plan_after_failure(err, 0, False, RETRY).reason == "rejected"
    assert plan_after_failure(err, 50, True, RETRY).action == "send_again"


# --- dedupe window -----------------------------------------------------------------------------

def test_recent_ids_forget_the_oldest_beyond_the_window() -> None:
    recent = RecentIds(3)
    for i in "abcd":
        recent.add(i)
    assert "a" not in recent and all(i in recent for i in "bcd")
    recent.add("b")  # seen again: becomes the newest
    recent.add("e")
    assert "b" in recent and "c" not in recent


# --- Kafka settings ----------------------------------------------------------------------------

def test_sasl_ssl_settings_take_the_password_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    ca = tmp_path / "ca.pem"
    cfg = KafkaConfig.model_validate({"bootstrap_servers": "k:9093", "security_protocol": "SASL_SSL",
                                      "sasl": {"mechanism": "SCRAM-SHA-256", "username": "br",
                                               "password_env": "T_KAFKA_PW"}, "ssl": {"ca": str(ca)}})
    monkeypatch.setenv("T_KAFKA_PW", "s3cret")
    conf = kafka_client_config(cfg)
    assert conf == {"bootstrap.servers": "k:9093", "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-256",
                    "sasl.username": "br", "sasl.password": "s3cret", "ssl.ca.location": str(ca)}
    monkeypatch.delenv("T_KAFKA_PW")
    with pytest.raises(ConfigError, match="T_KAFKA_PW"):
        kafka_client_config(cfg)


def test_producer_is_idempotent_with_acks_all_and_operator_extras_win() -> None:
    conf = producer_config(KafkaConfig.model_validate({"producer": {"linger.ms": 20}}))
    assert conf["enable.idempotence"] is True and conf["acks"] == "all" and conf["linger.ms"] == 20


def test_a_bridge_that_never_started_stops_cleanly() -> None:
    from edge_agent.bridge.worker import Bridge

    bridge = Bridge(BridgeConfig.model_validate({"mqtt": {"port": 1}, "kafka": {"bootstrap_servers": "127.0.0.1:1"}}))
    assert bridge.stop(timeout=1) is True
    health = bridge.health()
    assert (health["mqtt"], health["kafka"], health["inflight"], health["dead"]) == (
        {"connected": False}, {"connected": False}, 0, [])
    assert health["parts"]["bridge-worker"]["state"] == "new"


class _BurstyClient:
    """paho's loop_read() reads one packet per unconfirmed QoS 1 publish of ours (the e2e acks):
    this stand-in delivers ``burst`` messages per call, from an endless backlog."""

    def __init__(self, bridge: object, burst: int):
        self._bridge, self._burst, self._mid = bridge, burst, 0

    def _deliver(self, count: int) -> int:
        for _ in range(count):
            self._mid += 1
            self._bridge._incoming.append((GOOD_TOPIC, b"{}", self._mid))  # type: ignore[attr-defined]
        return 0  # MQTT_ERR_SUCCESS

    def io(self, _timeout: float) -> int:  # the loop's select pass: the first packet
        return self._deliver(1)

    def loop_read(self) -> int:
        return self._deliver(self._burst)


def test_a_read_batch_is_bounded_by_messages_not_by_loop_read_calls() -> None:
    """64 loop_read() calls of 33 packets each once made batches of ~2,000: seconds before the first produce."""
    from edge_agent.bridge.worker import MAX_READ_BATCH, Bridge

    bridge = Bridge(BridgeConfig.model_validate({"mqtt": {"port": 1}, "kafka": {"bootstrap_servers": "127.0.0.1:1"}}))
    try:
        bursty = _BurstyClient(bridge, burst=33)
        bridge._client = bursty  # type: ignore[assignment]
        bridge._io = bursty.io  # type: ignore[method-assign]
        bridge._read_batch()
        assert MAX_READ_BATCH <= len(bridge._incoming) < MAX_READ_BATCH + 33
    finally:
        bridge._incoming.clear()
        bridge._client = bridge._new_mqtt_client()
        bridge.stop(timeout=1)
