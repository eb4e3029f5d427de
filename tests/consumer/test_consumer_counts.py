"""``edge-agent counts`` over a real PostgreSQL filled by the sink (no Kafka needed: the sink's own
transaction is what the consumer runs), and the sink's exactly-once rules on their own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from consumer_helpers import crossing, sql
from edge_agent.common.envelope import build
from edge_agent.consumer.counts import parse_duration
from edge_agent.consumer.postgres import PostgresSink
from edge_agent.consumer.sink import Item, PartialFailure, Poison


def item(env, offset: int = 0, topic: str = "ai.inference.results") -> Item:
    return Item(topic, 0, offset, env, b"")


def store(dsn: str, envs, group: str = "g") -> None:
    sink = PostgresSink(dsn, group)
    try:
        items = [item(e, i) for i, e in enumerate(envs)]
        for it in items:
            sink.prepare(it)
        sink.write(items)
    finally:
        sink.close()


def counts(tmp_path: Path, dsn: str, *args: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / "consumer.yaml"
    cfg.write_text(yaml.safe_dump({"sink": {"postgres": {"dsn_env": "EDGE_PG_DSN"}}}))
    return subprocess.run([sys.executable, "-m", "edge_agent", "counts", "-c", str(cfg), *args], capture_output=True,
                          text=True, timeout=60, env={"EDGE_PG_DSN": dsn, "PATH": "/usr/bin:/bin"})


def test_counts_by_line_class_and_bucket(pg_dsn: str, tmp_path: Path) -> None:
    envs = [crossing("gw-1", 1, ts="2026-12-01T10:01:00Z"), crossing("gw-1", 2, ts="2026-12-01T10:14:59Z"),
            crossing("gw-1", 3, ts="2026-12-01T10:15:00Z", direction="out"),
            crossing("gw-1", 4, ts="2026-12-01T10:20:00Z", cls="car"),
            crossing("gw-1", 5, ts="2026-12-01T10:20:00Z", line="gate"),
            crossing("gw-2", 1, ts="2026-12-01T10:20:00Z")]
    store(pg_dsn, envs)
    done = counts(tmp_path, pg_dsn, "--device", "gw-1", "--bucket", "15m", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["bucket_s"] == 900
    got = {(r["bucket_start"], r["line"], r["class"]): (r["in"], r["out"]) for r in doc["rows"]}
    assert got == {("2026-12-01T10:00:00Z", "door", "person"): (2, 0),
                   ("2026-12-01T10:15:00Z", "door", "person"): (0, 1),
                   ("2026-12-01T10:15:00Z", "door", "car"): (1, 0),
                   ("2026-12-01T10:15:00Z", "gate", "person"): (1, 0)}
    assert doc["lines"]["door"] == {"in": 3, "out": 1, "by_class": {"person": {"in": 2, "out": 1},
                                                                    "car": {"in": 1, "out": 0}}}
    since = json.loads(counts(tmp_path, pg_dsn, "--since", "2026-12-01T10:15:00Z", "--line", "door",
                              "--class", "person", "--json").stdout)
    assert [(r["device"], r["in"], r["out"]) for r in since["rows"]] == [("gw-1", 0, 1), ("gw-2", 1, 0)]
    text = counts(tmp_path, pg_dsn, "--device", "gw-2")
    assert text.returncode == 0 and "door" in text.stdout and text.stdout.splitlines()[0].split()[:2] == ["device", "camera"]


def test_counts_refuses_bad_arguments_with_one_line(pg_dsn: str, tmp_path: Path) -> None:
    for args in (["--bucket", "90s"], ["--bucket", "soon"], ["--since", "yesterday"]):
        done = counts(tmp_path, pg_dsn, *args)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, (args, done.stderr)
    assert parse_duration("1h") == 3600 and parse_duration("1d") == 86400


def test_counts_on_an_empty_database_says_so(pg_dsn: str, tmp_path: Path) -> None:
    done = counts(tmp_path, pg_dsn)
    assert done.returncode == 0 and "no counts" in done.stdout


def test_two_groups_on_one_schema_count_a_crossing_once(pg_dsn: str) -> None:
    env = crossing("gw-1", 1)
    store(pg_dsn, [env], group="a")
    store(pg_dsn, [env], group="b")
    store(pg_dsn, [env, env], group="a")
    assert sql(pg_dsn, "SELECT sum(in_count) FROM edge.line_counts")[0][0] == 1
    assert sql(pg_dsn, 'SELECT "group" FROM edge.processed ORDER BY 1') == [("a",), ("b",)]


@pytest.mark.parametrize("env, reason", [
    (build("gw", 1, "counting.crossing", {"line": "door", "direction": "sideways"}), "invalid_data"),
    (build("gw", 1, "x", {"text": "a\x00b"}), "invalid_data"),
    (build("gw", 1, "x", {}).model_copy(update={"ts": "yesterday"}), "invalid_data"),
    (build("gw", 1, "x", {}).model_copy(update={"id": "42"}), "invalid_envelope"),
])
def test_what_postgres_could_never_store_is_poison_up_front(env, reason: str) -> None:
    sink = PostgresSink("postgresql://unused", "g")
    with pytest.raises(Poison) as e:
        sink.prepare(item(env))
    assert e.value.reason == reason


def test_a_record_the_server_refuses_fails_alone_after_the_committed_ones(pg_dsn: str) -> None:
    sink = PostgresSink(pg_dsn, "g")
    try:
        items = [item(crossing("gw", s), s) for s in (1, 2, 3)]
        for it in items:
            sink.prepare(it)
        # seq beyond bigint: only the server finds out
        items[1].envelope = items[1].envelope.model_copy(update={"seq": 2**70})
        with pytest.raises(PartialFailure) as e:
            sink.write(items)
        assert e.value.done == 1
        assert sql(pg_dsn, "SELECT seq FROM edge.events") == [(1,)]
    finally:
        sink.close()
