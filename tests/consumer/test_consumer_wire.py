"""``edge-agent consume`` over the real wire: Kafka (Tansu or EDGE_TEST_KAFKA) -> PostgreSQL.

Each test has its own topics, group and database; the consumer runs as a child process.
"""

from __future__ import annotations

import signal

from consumer_helpers import (
    as_json,
    crossing,
    headers_of,
    healthz,
    metric,
    sink_state,
    sql,
    table_count,
    wait_rows,
)
from edge_agent.common.envelope import build
from edge_testkit.processes import wait_for
from edge_testkit.records import read_topic


def line_total(dsn: str) -> tuple[int, int]:
    row = sql(dsn, "SELECT coalesce(sum(in_count), 0), coalesce(sum(out_count), 0) FROM edge.line_counts")[0]
    return int(row[0]), int(row[1])


def test_a_duplicate_at_another_offset_is_stored_and_counted_once(setup, consumer) -> None:
    envs = [crossing("gw-1", seq, direction="in" if seq % 3 else "out") for seq in range(1, 31)]
    setup.produce(envs)
    setup.produce(envs[:10])  # a bridge retry / MQTT redelivery: same ids, new offsets
    proc = consumer(setup)
    wait_rows(setup.dsn, "events", 30, proc=proc)
    wait_for(lambda: metric(setup.port, "edge_consumer_processed_total") >= 40, 30,
             message="all 40 records processed")
    assert table_count(setup.dsn, "events") == 30
    assert table_count(setup.dsn, "processed") == 30
    assert line_total(setup.dsn) == (20, 10)
    assert metric(setup.port, "edge_consumer_duplicates_total") == 10
    assert read_topic(setup.kafka, setup.dlq, idle_s=0.5) == []


def test_poison_goes_to_the_dlq_with_the_consumer_headers_and_the_rest_is_applied(setup, consumer) -> None:
    bad_id = build("gw-2", 2, "counting.crossing", {"line": "door", "direction": "in", "class": "person"},
                   camera_id="cam-1").model_copy(update={"id": "not-a-uuid"})
    records = [crossing("gw-2", 1, camera="cam-1"), b"{not json", bad_id, b'{"v": 1}', crossing("gw-2", 5, camera="cam-1")]
    setup.produce(records)
    proc = consumer(setup)
    wait_rows(setup.dsn, "events", 2, proc=proc)
    letters = wait_for(lambda: (lambda r: r if len(r) >= 3 else None)(read_topic(setup.kafka, setup.dlq)), 30,
                       message="3 dead letters")
    reasons = sorted(headers_of(r)["dlq-reason"] for r in letters)
    assert reasons == ["invalid_envelope", "invalid_envelope", "invalid_json"]
    for letter in letters:
        h = headers_of(letter)
        assert h["dlq-consumer-group"] == setup.group
        assert h["dlq-source-topic"] == setup.topics[0]
        assert int(h["dlq-source-offset"]) >= 0 and h["dlq-source-partition"].isdigit()
        assert h["dlq-attempts"] == "1" and h["dlq-first-failed-at"] and h["dlq-error"]
    assert {r.value for r in letters} == {b"{not json", b'{"v": 1}', records[2].model_dump_json().encode()}
    assert table_count(setup.dsn, "events") == 2
    assert line_total(setup.dsn) == (2, 0)


def test_kill_9_mid_stream_and_restart_applies_every_record_exactly_once(setup, consumer) -> None:
    n = 3000
    setup.produce([crossing(f"gw-{i % 7}", i + 1, camera=f"cam-{i % 3}") for i in range(n)])
    setup.extra = {"batch_max": 50}  # many transactions: the kill lands between and inside them
    proc = consumer(setup)
    wait_for(lambda: 0 < table_count(setup.dsn, "events"), 60, interval=0.05, message="the first rows")
    proc.kill()
    stored_at_kill = table_count(setup.dsn, "events")
    assert stored_at_kill < n, "the consumer finished before the kill: make the stream longer"
    proc = consumer(setup)
    wait_rows(setup.dsn, "events", n, timeout=120, proc=proc)
    assert table_count(setup.dsn, "processed") == n
    assert line_total(setup.dsn) == (n, 0)
    assert sql(setup.dsn, "SELECT count(DISTINCT id) FROM edge.events")[0][0] == n


def test_sigterm_commits_what_is_done_and_leaves_the_group(setup, consumer) -> None:
    setup.produce([crossing("gw-3", seq) for seq in range(1, 51)])
    proc = consumer(setup)
    wait_rows(setup.dsn, "events", 50, proc=proc)
    proc.stop(signal.SIGTERM, timeout=30)
    assert proc.returncode == 0, proc.output()[-2000:]
    from confluent_kafka import Consumer, TopicPartition

    from edge_testkit.kafka import client_config

    c = Consumer({**client_config(setup.kafka), "group.id": setup.group})
    try:
        committed = c.committed([TopicPartition(setup.topics[0], p) for p in (0, 1)], timeout=10)
    finally:
        c.close()
    assert sum(max(tp.offset, 0) for tp in committed) == 50
    # Restarted: nothing read again, so nothing counted as a duplicate.
    proc = consumer(setup)
    setup.produce([crossing("gw-3", 51)])
    wait_rows(setup.dsn, "events", 51, proc=proc)
    assert metric(setup.port, "edge_consumer_duplicates_total") == 0


def test_postgres_down_pauses_consumption_nothing_to_dlq_nothing_lost(setup, consumer, private_postgres) -> None:
    from edge_testkit.postgres import fresh_database

    setup.dsn = fresh_database(private_postgres.dsn, "edge")
    setup.produce([crossing("gw-4", seq) for seq in range(1, 21)])
    proc = consumer(setup)
    wait_rows(setup.dsn, "events", 20, proc=proc)
    private_postgres.stop()
    setup.produce([crossing("gw-4", seq) for seq in range(21, 121)])

    def sink_down() -> bool:
        code, body = healthz(setup.port)
        assert code == 200, body  # a database outage is waited out, not a dead process
        return body["parts"]["sink"]["state"] == "down"
    wait_for(sink_down, 30, interval=0.2, message="healthz reporting the sink down")
    assert metric(setup.port, "edge_consumer_sink_up") == 0
    private_postgres.start()
    wait_rows(setup.dsn, "events", 120, timeout=60, proc=proc)
    wait_for(lambda: healthz(setup.port)[1]["parts"]["sink"]["state"] == "up", 10, message="sink up again")
    assert line_total(setup.dsn) == (120, 0)
    assert read_topic(setup.kafka, setup.dlq, idle_s=0.5) == []
    assert metric(setup.port, "edge_consumer_dlq_total") == 0


def test_a_failing_record_is_retried_with_its_partition_paused_keeping_order(setup, consumer, tmp_path) -> None:
    out = tmp_path / "handled.jsonl"
    setup.extra = {"sink": {"handler": "flaky_handler:handle"}, "retry": {"max_attempts": 4, "delay_s": 0.1,
                                                                          "max_delay_s": 0.5}}
    setup.more_env = {"FLAKY_OUT": str(out), "FLAKY_STATE": str(tmp_path)}
    recs = [build("gw-5", 1, "t", {"n": 1}, camera_id="c"), build("gw-5", 2, "t", {"n": 2, "fail": 2}, camera_id="c"),
            build("gw-5", 3, "t", {"n": 3}, camera_id="c"), build("gw-5", 4, "t", {"n": 4, "fail": 99}, camera_id="c"),
            build("gw-5", 5, "t", {"n": 5}, camera_id="c")]
    setup.produce(recs)
    proc = consumer(setup)
    wait_for(lambda: out.exists() and len(out.read_text().splitlines()) >= 4, 60,
             message=lambda: f"4 handled records, have {out.read_text() if out.exists() else 'none'}\n{proc.output()[-2000:]}")
    handled = [as_json(line.encode())["n"] for line in out.read_text().splitlines()]
    assert handled == [1, 2, 3, 5]  # 2 after its retries, before 3; 4 dead-lettered, 5 after it
    letters = wait_for(lambda: read_topic(setup.kafka, setup.dlq), 30, message="the dead letter")
    assert len(letters) == 1
    h = headers_of(letters[0])
    assert (h["dlq-reason"], h["dlq-attempts"]) == ("sink_error", "4")
    assert metric(setup.port, "edge_consumer_retried_total") == 2 + 3


def test_a_rebalance_after_a_member_dies_keeps_every_effect_exactly_once(setup, consumer) -> None:
    import dataclasses

    from edge_testkit.kafka import create_topics
    from edge_testkit.processes import free_port

    topic = setup.topics[0] + "-four"
    create_topics(setup.kafka, [topic], partitions=4)
    setup.topics = [topic]
    setup.extra = {"batch_max": 50}
    n = 4000
    first = consumer(setup)
    second = consumer(dataclasses.replace(setup, port=free_port()))
    setup.produce([crossing(f"gw-{i % 11}", i // 11 + 1, camera=f"cam-{i % 5}") for i in range(n)], topic)
    wait_for(lambda: table_count(setup.dsn, "events") > 0, 60, interval=0.05, message="the first rows")
    first.kill()  # its partitions go to the survivor, from the last committed offsets
    assert table_count(setup.dsn, "events") < n, "done before the kill: make the stream longer"
    wait_rows(setup.dsn, "events", n, timeout=120, proc=second)
    assert table_count(setup.dsn, "processed") == n
    assert line_total(setup.dsn) == (n, 0)


def test_a_retry_pause_longer_than_max_poll_interval_keeps_the_group_membership(setup, consumer, tmp_path) -> None:
    out = tmp_path / "handled.jsonl"
    setup.extra = {"sink": {"handler": "flaky_handler:handle"},
                   "retry": {"max_attempts": 3, "delay_s": 9.0, "max_delay_s": 9.0},
                   "consumer": {"max.poll.interval.ms": 7000, "session.timeout.ms": 6000,
                                "heartbeat.interval.ms": 1000, "fetch.wait.max.ms": 10}}
    setup.more_env = {"FLAKY_OUT": str(out), "FLAKY_STATE": str(tmp_path)}
    setup.produce([build("gw-6", 1, "t", {"n": 1, "fail": 1}, camera_id="c")])
    proc = consumer(setup)
    wait_for(lambda: out.exists() and out.read_text(), 40, message=lambda: f"the retried record\n{proc.output()[-2000:]}")
    log = proc.output()
    assert "maximum poll interval" not in log
    assert log.count("assigned ") == 1, log  # no second assignment: the group never dropped us
    assert metric(setup.port, "edge_consumer_retried_total") == 1


def test_a_database_down_at_start_is_waited_for_not_dead_lettered(setup, consumer, private_postgres) -> None:
    from edge_testkit.postgres import fresh_database

    setup.dsn = fresh_database(private_postgres.dsn, "edge")
    private_postgres.stop()
    setup.produce([crossing("gw-7", seq) for seq in range(1, 31)])
    proc = consumer(setup)
    wait_for(lambda: (lambda h: h[1]["parts"]["sink"]["state"] == "down" and h[0] == 200)(healthz(setup.port))
             if proc.alive and sink_state(setup.port) else False, 30, interval=0.2, message="sink down in /healthz")
    private_postgres.start()
    wait_rows(setup.dsn, "events", 30, timeout=60, proc=proc)
    assert line_total(setup.dsn) == (30, 0)
    assert read_topic(setup.kafka, setup.dlq, idle_s=0.5) == []
