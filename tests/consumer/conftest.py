"""Consumer tests: the session Kafka (Tansu or EDGE_TEST_KAFKA), a private PostgreSQL cluster
(or EDGE_TEST_PG); the helpers to write a consumer file, produce envelopes and read the tables
are in consumer_helpers.py."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from consumer_helpers import Setup
from edge_testkit.kafka import create_topics
from edge_testkit.postgres import PostgresCluster, fresh_database, postgres_installed, start_postgres
from edge_testkit.processes import AgentProcess, free_port


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not os.environ.get("EDGE_TEST_PG") and not postgres_installed():
        pytest.fail("PostgreSQL is not installed: run scripts/setup_env.sh (apt-get install postgresql)")
    server = start_postgres(tmp_path_factory.mktemp("pg"))
    yield server
    server.remove()


@pytest.fixture
def pg_dsn(postgres: Any) -> str:
    return fresh_database(postgres.dsn, f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def private_postgres(tmp_path: Path) -> Iterator[PostgresCluster]:
    """A cluster of the test's own, to stop and start (skips when EDGE_TEST_PG names the server)."""
    if os.environ.get("EDGE_TEST_PG"):
        pytest.skip("EDGE_TEST_PG is set: stopping the database needs a private cluster")
    cluster = PostgresCluster().start()
    yield cluster
    cluster.remove()


@pytest.fixture
def setup(kafka: Any, pg_dsn: str, tmp_path: Path) -> Setup:
    tag = uuid.uuid4().hex[:8]
    topics = [f"c-events-{tag}", f"c-results-{tag}"]
    dlq = f"c-dlq-{tag}"
    create_topics(kafka, [*topics, dlq], partitions=2)
    return Setup(kafka, pg_dsn, tmp_path, topics, dlq, f"g-{tag}", free_port())


@pytest.fixture
def consumer(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., AgentProcess]]:
    """Factory: ``consumer(setup)`` -> a started ``edge-agent consume`` (killed after the test)."""
    started: list[AgentProcess] = []

    def start(s: Setup, *args: str) -> AgentProcess:
        path = s.write()
        proc = AgentProcess(["consume", "-c", str(path), *args], tmp_path / f"consume-{len(started)}.log", env=s.env)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.kill()
        if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
            print(f"--- consumer output ---\n{proc.output()[-4000:]}")
