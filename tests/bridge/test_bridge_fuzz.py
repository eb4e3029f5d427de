"""Hostile input, generated, at one running bridge: MQTT payloads and topics, and its HTTP API.

Property: whatever comes in, the bridge keeps forwarding valid envelopes (each one
checked as it goes), no HTTP answer is a 5xx or a dropped connection, nothing valid
is lost, and /healthz stays 200. Real Mosquitto and the Kafka-protocol test broker;
examples are bounded so the suite stays quick on two cores.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bridge_containment import healthz, with_http
from test_bridge_wire import bridge_config, running, seqs_in_kafka

from edge_agent.common.envelope import build, encode
from edge_testkit.records import read_topic

pytestmark = pytest.mark.timeout(240)

BOUNDED = settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))

# --- what a hostile device can send ---------------------------------------------------------------

# Characters Mosquitto takes in a topic (it refuses control characters and non-characters),
# without the wildcards a PUBLISH may not carry.
topic_chars = st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Co", "Cn"), exclude_characters="+#")
streams = st.one_of(st.sampled_from(["camera.events", "notifications", "no.such.stream", "a/b", ""]),
                    st.text(topic_chars, min_size=1, max_size=80))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
ENVELOPE_FIELDS = ["v", "id", "device_id", "camera_id", "seq", "type", "ts", "trace_id", "correlation_id", "data"]


@st.composite
def mutated_envelopes(draw: Any) -> bytes:
    """A valid envelope of gw-1 with one field replaced, dropped, or given twice."""
    body = json.loads(encode(build("gw-1", draw(st.integers(1_000_000, 2_000_000)), "camera.online", {})))
    field = draw(st.sampled_from(ENVELOPE_FIELDS))
    how = draw(st.sampled_from(["replace", "drop", "twice"]))
    if how == "drop":
        body.pop(field, None)
        return json.dumps(body).encode()
    value = draw(json_values)
    if how == "replace":
        body[field] = value
        return json.dumps(body).encode()
    return (json.dumps({field: value})[:-1] + ", " + json.dumps(body)[1:]).encode()  # the key twice


payloads = st.one_of(
    st.binary(max_size=3000),
    json_values.map(lambda v: json.dumps(v).encode()),  # NaN and Infinity included
    mutated_envelopes(),
    st.integers(50, 5000).map(lambda n: b"[" * n),
    st.integers(50, 2000).map(lambda n: b'{"a":' * n),
)


def test_random_payloads_and_topics_never_stop_the_bridge(mqtt_broker: Any, kafka: Any,
                                                          device_factory: Any) -> None:
    cfg = bridge_config(mqtt_broker, kafka, max_message_bytes=2000)
    good: set[int] = set()
    seqs = itertools.count(1)
    with running(cfg) as bridge, with_http(bridge) as port:
        dev = device_factory(cfg)

        @BOUNDED
        @given(stream=streams, payload=payloads)
        def hostile_then_valid(stream: str, payload: bytes) -> None:
            dev.send_raw(f"{dev.topic(stream)}", payload)
            seq = next(seqs)
            dev.send(seq)
            good.add(seq)
            dev.wait_acked({seq}, timeout=20)  # still serving, right behind the hostile one

        hostile_then_valid()
        assert healthz(port).status_code == 200
        assert bridge.health()["parts"]["bridge-worker"]["restarts"] == 0
    assert good <= seqs_in_kafka(kafka, cfg.topics["camera.events"], good)


# --- what a hostile HTTP client can send ---------------------------------------------------------

TOKENS = {"T_FUZZ_ADMIN": ("fuzz-admin", "admin"), "T_FUZZ_AUDITOR": ("fuzz-auditor", "auditor")}
# Printable ASCII, trimmed: httpx refuses to send a value with surrounding blanks.
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60).map(str.strip)
paths = st.sampled_from(["/healthz", "/metrics", "/api/v1/queue/publish", "/api/v1/queue/status",
                         "/api/v1/queue/dlq/retry", "/docs", "/openapi.json", "/nope"])
auths = st.one_of(st.none(), st.sampled_from(["Bearer fuzz-admin", "Bearer fuzz-auditor", "Bearer x", "Basic eA=="]),
                  header_text)
# The keys the API reads out of a message (into the envelope) get long and odd values too.
messages = st.dictionaries(st.sampled_from(["type", "camera_id", "x"]) | st.text(max_size=8),
                           json_values | st.text(max_size=300), max_size=5)
publish_bodies = st.fixed_dictionaries(
    {"topic": st.sampled_from(["camera.events", "notifications", "nope"]), "message": messages | json_values},
    optional={"key": st.one_of(st.none(), st.text(max_size=20)), "extra": json_values})
bodies = st.one_of(st.binary(max_size=2000), publish_bodies.map(lambda b: json.dumps(b).encode()),
                   json_values.map(lambda v: json.dumps(v).encode()),
                   st.integers(50, 3000).map(lambda n: b"[" * n))


def test_random_http_requests_get_a_4xx_at_worst_and_valid_publishes_reach_kafka(
        mqtt_broker: Any, kafka: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for env, (token, _role) in TOKENS.items():
        monkeypatch.setenv(env, token)
    cfg = bridge_config(mqtt_broker, kafka, max_message_bytes=4000, http={
        "tokens": [{"token_env": env, "role": role} for env, (_t, role) in TOKENS.items()]})
    published: set[str] = set()  # message ids the API answered 200 for
    with running(cfg) as bridge, with_http(bridge) as port:
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)

        @BOUNDED
        @given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]), path=paths, auth=auths, body=bodies,
               content_type=st.sampled_from(["application/json", "text/plain", "", "application/json; charset=x"]),
               correlation=st.one_of(st.none(), header_text, st.text(max_size=300).map(lambda t: "c" * len(t))))
        def one_request(method: str, path: str, auth: str | None, body: bytes, content_type: str,
                        correlation: str | None) -> None:
            headers = {"Content-Type": content_type}
            if auth is not None:
                headers["Authorization"] = auth
            if correlation is not None:
                headers["X-Correlation-ID"] = correlation
            r = http.request(method, path, content=body if method != "GET" else None, headers=headers)
            assert r.status_code < 500, (r.status_code, r.text[:300])
            if path == "/api/v1/queue/publish" and r.status_code == 200:
                published.add(r.json()["messageId"])

        one_request()
        valid = http.post("/api/v1/queue/publish", headers={"Authorization": "Bearer fuzz-admin"},
                          json={"topic": "camera.events", "message": {"type": "door.open"}})
        assert valid.status_code == 200
        published.add(valid.json()["messageId"])
        assert healthz(port).status_code == 200
    records = [r for t in sorted(set(cfg.topics.values())) for r in read_topic(kafka, t, idle_s=0.5)]
    assert published <= {r.headers["message-id"].decode() for r in records}
    for r in records:  # what the API forwarded is strict JSON
        json.loads(r.value, parse_constant=_refuse)


def _refuse(constant: str) -> None:
    raise AssertionError(f"{constant} in a record")
