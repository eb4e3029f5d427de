"""``consume --from/--to``: a window replayed with a group of its own, ending at the end offsets seen
at its start; replaying what was applied changes nothing, replaying into an empty database applies
exactly the window."""

from __future__ import annotations

import json
import signal
import time
from datetime import datetime, timezone

from consumer_helpers import crossing, sql, wait_rows
from edge_testkit.postgres import fresh_database
from edge_testkit.records import read_topic

N = 20


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat().replace("+00:00", "Z")


def snapshot(dsn: str) -> tuple:
    return (sql(dsn, "SELECT id, device_id, seq, type, ts, topic, data, received_at FROM edge.events ORDER BY id"),
            sql(dsn, "SELECT * FROM edge.line_counts ORDER BY 1, 2, 3, 4, 5"),
            sql(dsn, 'SELECT "group", id, processed_at FROM edge.processed ORDER BY 2'))


def replay(consumer, setup, start: int, end: int) -> dict:
    proc = consumer(setup, "--from", iso(start), "--to", iso(end))
    assert proc.wait_exit(90) == 0, proc.output()[-3000:]
    return json.loads(proc.output().strip().splitlines()[-1])


def test_replaying_a_window_twice_leaves_the_tables_unchanged(setup, consumer, postgres) -> None:
    t0 = int(time.time() * 1000) - 3_600_000
    envs = [crossing(f"gw-{i % 2}", i // 2 + 1, ts=iso(t0 + i * 1000)) for i in range(N)]
    setup.produce(envs, one_per_batch=True, timestamps=[t0 + i * 1000 for i in range(N)])
    live = consumer(setup)
    wait_rows(setup.dsn, "events", N, proc=live)
    live.stop(signal.SIGTERM, timeout=30)
    before = snapshot(setup.dsn)

    start, end = t0 + 5000, t0 + 14000  # records 5..14
    for _ in range(2):
        summary = replay(consumer, setup, start, end)
        assert summary["read"] - summary["outside_window"] == 10 and not summary["stopped_early"]
        assert snapshot(setup.dsn) == before

    audit = [r.json() for r in read_topic(setup.kafka, "audit.logs")]
    mine = [a for a in audit if a["type"] == "consumer.replay" and a["data"]["effect_group"] == setup.group]
    assert len(mine) == 2
    assert mine[0]["data"]["from"] == iso(start) and mine[0]["data"]["by"]
    assert mine[0]["data"]["group"] != setup.group  # a group of its own

    # Into an empty database the same window applies exactly its ten records, once however often.
    setup.dsn = fresh_database(postgres.dsn, f"replay_{setup.group.replace('-', '_')}")
    for _ in range(2):
        replay(consumer, setup, start, end)
        rows = sql(setup.dsn, "SELECT data->>'ts' FROM edge.events ORDER BY 1")
        assert [r[0] for r in rows] == [iso(t0 + i * 1000) for i in range(5, 15)]
        assert sql(setup.dsn, "SELECT sum(in_count) FROM edge.line_counts")[0][0] == 10
