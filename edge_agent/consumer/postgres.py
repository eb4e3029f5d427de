"""The PostgreSQL sink (psycopg 3): a batch's effect and its ``processed (group, id)`` rows in one
transaction, so that a record delivered twice changes nothing the second time.

Tables (schema ``edge`` by default, created if missing; DESIGN "Downstream"):
- ``events``: one row per envelope id;
- ``line_counts``: per device, camera, line, class and ``BUCKET_S`` bucket of the crossing's ts,
  ``in_count``/``out_count``; one ``counting.crossing`` adds one;
- ``processed``: ``(group, id)`` of every record this group has applied.

A crossing counts only when its ``events`` row is new, so two groups writing one schema still
count it once. ``prepare`` refuses up front what PostgreSQL would refuse for ever (a non-UUID
id, an unreadable ts, NUL characters), so those go to the dlq without retries.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import Counter as Tally
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import psycopg
from psycopg import sql

from edge_agent.consumer.sink import Item, PartialFailure, Poison, SinkDown, WriteResult

log = logging.getLogger(__name__)

BUCKET_S = 60  # the stored granularity of line_counts; `counts --bucket` sums whole minutes
CROSSING = "counting.crossing"
DIRECTIONS = ("in", "out")

SCHEMA_SQL = """
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.events (
    id uuid PRIMARY KEY, device_id text NOT NULL, camera_id text, seq bigint NOT NULL, type text NOT NULL,
    ts timestamptz NOT NULL, topic text NOT NULL, data jsonb NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX IF NOT EXISTS events_device_seq ON {schema}.events (device_id, seq);
CREATE TABLE IF NOT EXISTS {schema}.line_counts (
    device_id text NOT NULL, camera_id text NOT NULL, line_id text NOT NULL, class text NOT NULL,
    bucket_start timestamptz NOT NULL, bucket_s integer NOT NULL,
    in_count bigint NOT NULL DEFAULT 0, out_count bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (device_id, camera_id, line_id, class, bucket_start, bucket_s));
CREATE TABLE IF NOT EXISTS {schema}.processed (
    "group" text NOT NULL, id text NOT NULL, processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY ("group", id));
"""


@dataclass(slots=True, frozen=True)
class Row:
    """An item as the tables take it (made by ``prepare``)."""

    id: str
    ts: datetime
    data_json: str
    crossing: tuple[str, str, str, str, datetime] | None  # camera, line, class, direction, bucket start


def parse_ts(text: Any) -> datetime:
    """RFC 3339 -> an aware datetime (naive means UTC); ValueError otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"not a timestamp: {text!r}"[:200])
    ts = datetime.fromisoformat(text)
    return ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)


def bucket_start(ts: datetime, bucket_s: int = BUCKET_S) -> datetime:
    epoch = ts.timestamp()
    return datetime.fromtimestamp(epoch - epoch % bucket_s, timezone.utc)


def _crossing_of(item: Item, ts: datetime) -> tuple[str, str, str, str, datetime]:
    data = item.envelope.data
    line, direction, cls = data.get("line"), data.get("direction"), data.get("class", "")
    if not isinstance(line, str) or not line or direction not in DIRECTIONS or not isinstance(cls, str):
        raise Poison("invalid_data", f"{CROSSING} needs data.line, data.direction in/out and a string class")
    when = parse_ts(data["ts"]) if "ts" in data else ts
    return item.envelope.camera_id or "", line, cls, direction, bucket_start(when)


def to_row(item: Item) -> Row:
    """The row of an item, or Poison naming why PostgreSQL could never take it."""
    env = item.envelope
    try:
        uid = str(uuid.UUID(env.id))
    except ValueError:
        raise Poison("invalid_envelope", f"id {env.id!r} is not a UUID"[:300]) from None
    try:
        ts = parse_ts(env.ts)
        crossing = _crossing_of(item, ts) if env.type == CROSSING else None
    except (ValueError, OverflowError) as e:
        raise Poison("invalid_data", f"unreadable timestamp: {e}"[:300]) from None
    data_json = json.dumps(env.data, ensure_ascii=False, separators=(",", ":"))
    texts = (env.device_id, env.camera_id or "", env.type, data_json, item.topic)
    if any("\x00" in t or "\\u0000" in t for t in texts):  # text and jsonb refuse NUL
        raise Poison("invalid_data", "NUL character in a field PostgreSQL stores as text")
    return Row(uid, ts, data_json, crossing)


class PostgresSink:
    """One connection, reconnected when lost; every write is one transaction."""

    def __init__(self, dsn: str, group: str, schema: str = "edge", *, connect_timeout_s: float = 5.0):
        self.dsn = dsn
        self.group = group
        self.schema = schema
        self.connect_timeout_s = connect_timeout_s
        self._conn: psycopg.Connection | None = None
        self._q = {name: sql.SQL(text).format(schema=sql.Identifier(schema)) for name, text in _QUERIES.items()}

    # --- connection --------------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._drop()
            try:
                conn = psycopg.connect(self.dsn, connect_timeout=max(1, int(self.connect_timeout_s)),
                                       application_name=f"edge-consumer {self.group}"[:63])
                with conn.transaction():
                    conn.execute(sql.SQL(SCHEMA_SQL).format(schema=sql.Identifier(self.schema)))
            except psycopg.Error as e:
                raise SinkDown(f"PostgreSQL: {e}".strip()) from e
            self._conn = conn
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                pass
            self._conn = None

    def ping(self) -> None:
        try:
            self._connection().execute("SELECT 1")
            self._connection().rollback()
        except psycopg.OperationalError as e:
            self._drop()
            raise SinkDown(str(e)) from e

    def close(self) -> None:
        self._drop()

    # --- writing -------------------------------------------------------------------------------

    def prepare(self, item: Item) -> None:
        item.prepared = to_row(item)

    def write(self, items: list[Item]) -> WriteResult:
        """All items in one transaction; when that fails for a record's sake, one transaction each
        up to the failing one (PartialFailure). SinkDown when the server is gone."""
        try:
            return self._write_transaction(items)
        except SinkDown:
            raise
        except psycopg.Error as e:
            if len(items) == 1:
                raise PartialFailure(0, e) from e
            log.warning("batch of %d failed (%s): writing one by one to find the record", len(items), e)
        applied = duplicates = 0
        for done, item in enumerate(items):
            try:
                result = self._write_transaction([item])
            except SinkDown as e:
                raise PartialFailure(done, e) from e
            except psycopg.Error as e:
                raise PartialFailure(done, e) from e
            applied, duplicates = applied + result.applied, duplicates + result.duplicates
        return WriteResult(applied, duplicates)

    def _write_transaction(self, items: list[Item]) -> WriteResult:
        conn = self._connection()
        try:
            with conn.transaction():
                return self._apply(conn, items)
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            # The server went away (possibly during COMMIT: the outcome is unknown, which is
            # fine: a redelivered record finds its processed row, or is applied then).
            if conn.broken or conn.closed or isinstance(e, psycopg.InterfaceError):
                self._drop()
                raise SinkDown(f"PostgreSQL: {e}".strip()) from e
            raise

    def _apply(self, conn: psycopg.Connection, items: list[Item]) -> WriteResult:
        first: dict[str, Item] = {}
        for item in items:
            first.setdefault(item.prepared.id, item)  # the same id twice in one batch: once
        ids = list(first)
        cur = conn.execute(self._q["processed"], (self.group, ids))
        new = [first[row[0]] for row in cur.fetchall()]
        if new:
            rows = [r.prepared for r in new]
            cur = conn.execute(self._q["events"], (
                [r.id for r in rows], [i.envelope.device_id for i in new], [i.envelope.camera_id for i in new],
                [i.envelope.seq for i in new], [i.envelope.type for i in new], [r.ts for r in rows],
                [i.topic for i in new], [r.data_json for r in rows]))
            stored = {str(row[0]) for row in cur.fetchall()}
            self._add_counts(conn, [i for i in new if i.prepared.crossing and i.prepared.id in stored])
        return WriteResult(applied=len(new), duplicates=len(items) - len(new))

    def _add_counts(self, conn: psycopg.Connection, crossings: list[Item]) -> None:
        tally: Tally[tuple[str, str, str, str, datetime, str]] = Tally()
        for item in crossings:
            camera, line, cls, direction, start = item.prepared.crossing
            tally[(item.envelope.device_id, camera, line, cls, start, direction)] += 1
        if not tally:
            return
        keys = sorted({k[:5] for k in tally})  # sorted: concurrent writers lock rows in one order
        conn.execute(self._q["counts"], (
            BUCKET_S, [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys], [k[3] for k in keys],
            [k[4] for k in keys],
            [tally.get((*k, "in"), 0) for k in keys], [tally.get((*k, "out"), 0) for k in keys]))


_QUERIES = {
    "processed": 'INSERT INTO {schema}.processed ("group", id) SELECT %s, unnest(%s::text[]) '
                 'ON CONFLICT DO NOTHING RETURNING id',
    "events": "INSERT INTO {schema}.events (id, device_id, camera_id, seq, type, ts, topic, data) "
              "SELECT * FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::bigint[], %s::text[], "
              "%s::timestamptz[], %s::text[], %s::jsonb[]) ON CONFLICT (id) DO NOTHING RETURNING id",
    "counts": "INSERT INTO {schema}.line_counts AS c (device_id, camera_id, line_id, class, bucket_start, bucket_s, "
              "in_count, out_count) SELECT d, cam, l, k, b, %s, i, o FROM unnest(%s::text[], %s::text[], %s::text[], "
              "%s::text[], %s::timestamptz[], %s::bigint[], %s::bigint[]) AS u(d, cam, l, k, b, i, o) "
              "ON CONFLICT (device_id, camera_id, line_id, class, bucket_start, bucket_s) DO UPDATE SET "
              "in_count = c.in_count + EXCLUDED.in_count, out_count = c.out_count + EXCLUDED.out_count",
}


def seqs_present(sink: PostgresSink, device: str, low: int, high: int) -> set[int]:
    """The seqs of ``device`` between ``low`` and ``high`` that ``events`` holds (the auditor's
    second look: another consumer instance may have stored them)."""
    conn = sink._connection()  # noqa: SLF001 - same module family: the auditor borrows the sink's connection
    q = sql.SQL("SELECT seq FROM {schema}.events WHERE device_id = %s AND seq BETWEEN %s AND %s").format(
        schema=sql.Identifier(sink.schema))
    with conn.transaction():
        return {row[0] for row in conn.execute(q, (device, low, high)).fetchall()}

