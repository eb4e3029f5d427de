"""The consumer file: strict like the others, one line per problem naming the field path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edge_agent.common.config import ConfigError
from edge_agent.config_check import check_file, kind_of
from edge_agent.consumer.config import DAY_MS, DLQ_RETENTION_MS, parse_consumer

STREAMS = ["camera.events", "ai.inference.results", "notifications", "audit.logs"]


def problems(doc: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_consumer(doc)
    return e.value.problems


def test_the_example_file_is_valid() -> None:
    cfg = parse_consumer(yaml.safe_load((Path(__file__).parents[2] / "examples" / "consumer.yaml").read_text()))
    assert cfg.sink.postgres is not None and cfg.group == "analytics-consumer-group"


def test_defaults_follow_design() -> None:
    cfg = parse_consumer({"sink": {"postgres": {}}})
    assert cfg.sink.postgres.dsn_env == "EDGE_PG_DSN" and cfg.sink.postgres.schema_ == "edge"
    assert cfg.http.listen == "127.0.0.1:9110" and cfg.dlq.topic == "dlq" and cfg.audit is None
    assert (cfg.retry.max_attempts, cfg.retry.delay_s, cfg.retry.max_delay_s) == (5, 2.0, 30.0)
    dlq = cfg.central_topics.settings("dlq", dlq=True)
    assert (dlq["retention.ms"], dlq["segment.ms"]) == (DLQ_RETENTION_MS, DAY_MS)


@pytest.mark.parametrize("doc, expected", [
    ({"sink": {"postgres": {}}, "grup": "x"}, "grup"),
    ({"sink": {}}, "sink: "),
    ({"sink": {"postgres": {}, "handler": "a.b:c"}}, "exactly one sink"),
    ({"sink": {"handler": "not a handler"}}, "sink.handler"),
    ({"sink": {"postgres": {"schema": "Edge; DROP"}}}, "sink.postgres.schema"),
    ({"sink": {"postgres": {}}, "topics": ["a", "a"]}, "named twice"),
    ({"sink": {"postgres": {}}, "topics": ["camera.events", "dlq"]}, "cannot be consumed"),
    ({"sink": {"postgres": {}}, "audit": {}}, "audit needs every uplink stream"),
    ({"sink": {"postgres": {}}, "http": {"listen": "9110"}}, "http.listen"),
    ({"sink": {"postgres": {}}, "central_topics": {"overrides": {"dlq": {"retention_days": 1}}}},
     "central_topics.overrides.dlq.retention_days"),
])
def test_a_bad_file_gets_one_line_naming_the_field(doc: dict, expected: str) -> None:
    found = problems(doc)
    assert any(expected in line for line in found), found


def test_audit_with_every_stream_is_fine() -> None:
    assert parse_consumer({"sink": {"postgres": {}}, "topics": STREAMS, "audit": {"reorder_timeout_s": 5}}).audit


def test_check_config_knows_a_consumer_file(tmp_path: Path) -> None:
    path = tmp_path / "consumer.yaml"
    path.write_text(yaml.safe_dump({"sink": {"postgres": {"dsn_env": "EDGE_TEST_UNSET_DSN"}}}))
    assert kind_of({"sink": {}, "kafka": {}}) == "consumer"
    kind, found = check_file(path, env={})
    assert kind == "consumer"
    assert found == ["sink.postgres.dsn_env: environment variable EDGE_TEST_UNSET_DSN is not set"]
    assert check_file(path, env={"EDGE_TEST_UNSET_DSN": "postgresql://x"}) == ("consumer", [])


def test_consume_with_a_bad_file_exits_2_with_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "consumer.yaml"
    path.write_text(yaml.safe_dump({"sink": {"handler": "no_such_module_here:fn"}, "http": {"listen": "127.0.0.1:1"}}))
    done = subprocess.run([sys.executable, "-m", "edge_agent", "consume", "-c", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == "sink.handler: cannot load no_such_module_here:fn: No module named 'no_such_module_here'"


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                      max_leaves=10)
KEYS = st.sampled_from(["kafka", "group", "topics", "sink", "retry", "dlq", "audit", "http", "consumer", "batch_max",
                        "central_topics", "log", "other"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(KEYS, VALUES, max_size=6), st.sampled_from([{"postgres": {}}, {"handler": "a.b:c"}, None]))
def test_any_document_is_a_config_or_one_line_per_problem(doc: dict, sink: dict | None) -> None:
    if sink is not None:
        doc = {**doc, "sink": sink}
    try:
        parse_consumer(doc)
    except ConfigError as e:
        assert e.problems and all(line and "\n" not in line for line in e.problems)
