"""Helpers of the consumer tests: write a consumer file, produce envelopes, read the tables and the
consumer's HTTP side. A module of its own (not conftest): the test modules import it by name, and
``conftest`` would be ambiguous with the other test directories' conftest modules."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edge_agent.common.envelope import build, encode
from edge_testkit.kafka import client_config
from edge_testkit.processes import AgentProcess, wait_for

HERE = Path(__file__).resolve().parent


def sql(dsn: str, query: str, *params: Any) -> list[tuple]:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


def table_count(dsn: str, table: str) -> int:
    try:
        return sql(dsn, f"SELECT count(*) FROM edge.{table}")[0][0]
    except Exception:  # noqa: BLE001 - not created yet
        return 0


def crossing(device: str, seq: int, *, camera: str = "cam-1", line: str = "door", direction: str = "in",
             cls: str = "person", ts: str | None = None) -> Any:
    env = build(device, seq, "counting.crossing", {"line": line, "direction": direction, "class": cls,
                                                   "track_id": seq, **({"ts": ts} if ts else {})}, camera_id=camera)
    return env


@dataclass
class Setup:
    """One consumer's topics, file and environment on the shared broker."""

    kafka: Any
    dsn: str
    dir: Path
    topics: list[str]
    dlq: str
    group: str
    port: int
    extra: dict[str, Any] = field(default_factory=dict)  # config keys replaced
    more_env: dict[str, str] = field(default_factory=dict)

    @property
    def config(self) -> dict[str, Any]:
        doc = {"kafka": {"bootstrap_servers": client_config(self.kafka)["bootstrap.servers"]},
               "group": self.group, "topics": self.topics,
               "sink": {"postgres": {"dsn_env": "EDGE_PG_DSN"}},
               "retry": {"max_attempts": 3, "delay_s": 0.2, "max_delay_s": 1.0},
               "dlq": {"topic": self.dlq}, "http": {"listen": f"127.0.0.1:{self.port}"},
               "consumer": {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000, "fetch.wait.max.ms": 10},
               "log": {"format": "text"}}
        doc.update(self.extra)
        return doc

    def write(self) -> Path:
        path = self.dir / f"consumer-{self.group}-{self.port}.yaml"
        path.write_text(yaml.safe_dump(self.config))
        return path

    @property
    def env(self) -> dict[str, str]:
        return {"EDGE_PG_DSN": self.dsn, "PYTHONPATH": str(HERE), **self.more_env}

    def produce(self, envelopes: list[Any], topic: str | None = None, *, one_per_batch: bool = False,
                timestamps: list[int] | None = None) -> None:
        from confluent_kafka import Producer

        p = Producer({**client_config(self.kafka), "linger.ms": 5})
        for i, env in enumerate(envelopes):
            value = env if isinstance(env, bytes) else encode(env)
            key = None if isinstance(env, bytes) else env.kafka_key.encode()
            headers = [] if isinstance(env, bytes) else env.kafka_headers()
            p.produce(topic or self.topics[0], value=value, key=key, headers=headers,
                      **({"timestamp": timestamps[i]} if timestamps else {}))
            if one_per_batch:
                p.flush(10)  # Tansu's high watermark is right only for one-record batches
        assert p.flush(20) == 0


def healthz(port: int) -> tuple[int, dict[str, Any]]:
    import httpx

    r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    return r.status_code, r.json()


def sink_state(port: int) -> str | None:
    """The sink part's state in /healthz, None while the consumer does not answer yet."""
    import httpx

    try:
        return healthz(port)[1]["parts"]["sink"]["state"]
    except (httpx.HTTPError, KeyError):
        return None


def metric(port: int, name: str, labels: dict[str, str] | None = None) -> float:
    import httpx

    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total += sample.value
    return total


def wait_rows(dsn: str, table: str, n: int, timeout: float = 60.0, proc: AgentProcess | None = None) -> int:
    def enough() -> bool:
        if proc is not None and not proc.alive:
            raise AssertionError(f"consumer exited ({proc.returncode}):\n{proc.output()[-3000:]}")
        return table_count(dsn, table) >= n
    wait_for(enough, timeout, interval=0.2, message=lambda: f"{n} rows in edge.{table} (have {table_count(dsn, table)})")
    return table_count(dsn, table)


def headers_of(record: Any) -> dict[str, str]:
    return {k: v.decode() for k, v in record.headers.items()}


def as_json(value: bytes) -> Any:
    return json.loads(value)
