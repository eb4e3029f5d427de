"""``edge-agent counts``: the line counts the PostgreSQL sink stored, as a table or JSON.

Rows are per device, camera, line and class (and per ``--bucket`` when given: buckets of whole
minutes, since the sink stores minutes); ``lines`` in the JSON sums them per line id with a
``by_class`` split, the shape of ``edge-agent count --json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from edge_agent.common.config import ConfigError, print_problems
from edge_agent.consumer.config import load_consumer
from edge_agent.consumer.postgres import BUCKET_S, parse_ts

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """``15m``, ``1h``, ``1d``, ``900s`` -> seconds (a positive multiple of the stored minute)."""
    m = re.fullmatch(r"\s*(\d{1,7})\s*([smhd])\s*", text or "")
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 15m, 1h, 1d)")
    seconds = int(m.group(1)) * _UNITS[m.group(2)]
    if seconds <= 0 or seconds % BUCKET_S:
        raise ValueError(f"{text!r}: a bucket is a positive number of whole minutes")
    return seconds


def query(conn: psycopg.Connection, schema: str, *, bucket_s: int | None = None, **filters: Any) -> list[dict[str, Any]]:
    """The summed counts under ``filters`` (device, camera, line, class_name, since, until)."""
    where, params = [], []
    for column, key in (("device_id", "device"), ("camera_id", "camera"), ("line_id", "line"), ("class", "class_name")):
        if filters.get(key) is not None:
            where.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
            params.append(filters[key])
    if filters.get("since") is not None:
        where.append(sql.SQL("bucket_start >= %s"))
        params.append(filters["since"])
    if filters.get("until") is not None:
        where.append(sql.SQL("bucket_start < %s"))
        params.append(filters["until"])
    bucket = (sql.SQL("to_timestamp(floor(extract(epoch FROM bucket_start) / {n}) * {n})").format(n=sql.Literal(bucket_s))
              if bucket_s else sql.SQL("NULL::timestamptz"))
    q = sql.SQL("SELECT device_id, camera_id, line_id, class, {bucket} AS b, sum(in_count), sum(out_count) "
                "FROM {schema}.line_counts {where} GROUP BY 1, 2, 3, 4, 5 ORDER BY 5, 1, 2, 3, 4").format(
        bucket=bucket, schema=sql.Identifier(schema),
        where=sql.SQL("WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL(""))
    rows = conn.execute(q, params).fetchall()
    return [{"device": d, "camera": c or None, "line": line, "class": k,
             **({"bucket_start": b.isoformat().replace("+00:00", "Z")} if b is not None else {}),
             "in": int(i), "out": int(o)} for d, c, line, k, b, i, o in rows]


def by_line(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    lines: dict[str, dict[str, Any]] = {}
    for r in rows:
        line = lines.setdefault(r["line"], {"in": 0, "out": 0, "by_class": {}})
        line["in"] += r["in"]
        line["out"] += r["out"]
        cls = line["by_class"].setdefault(r["class"], {"in": 0, "out": 0})
        cls["in"] += r["in"]
        cls["out"] += r["out"]
    return lines


def table(rows: list[dict[str, Any]]) -> str:
    columns = ["bucket_start", "device", "camera", "line", "class", "in", "out"]
    columns = [c for c in columns if any(c in r for r in rows)] or columns[1:]
    cells = [[str(r.get(c) if r.get(c) is not None else "-") for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _time_arg(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_ts(value)
    except ValueError:
        raise ValueError(f"--{name}: not an RFC 3339 time: {value!r} (e.g. 2026-12-01T00:00:00Z)") from None


def counts_command(args: argparse.Namespace) -> int:
    try:
        cfg = load_consumer(Path(args.config))
        if cfg.sink.postgres is None:
            raise ConfigError(["sink.postgres: counts reads the PostgreSQL sink; this file names none"])
        dsn = os.environ.get(cfg.sink.postgres.dsn_env)
        if not dsn:
            raise ConfigError([f"sink.postgres.dsn_env: environment variable {cfg.sink.postgres.dsn_env} is not set"])
        bucket_s = parse_duration(args.bucket) if args.bucket else None
        since, until = _time_arg(args.since, "since"), _time_arg(args.until, "until")
    except ConfigError as e:
        return print_problems(e.problems)
    except ValueError as e:
        print(f"edge-agent counts: {e}", file=sys.stderr)
        return 2
    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            rows = query(conn, cfg.sink.postgres.schema_, bucket_s=bucket_s, device=args.device, camera=args.camera,
                         line=args.line, class_name=args.class_name, since=since, until=until)
    except psycopg.errors.UndefinedTable:
        rows = []  # no consumer has written yet
    except psycopg.Error as e:
        print(f"edge-agent counts: PostgreSQL: {str(e).strip()}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"bucket_s": bucket_s, "rows": rows, "lines": by_line(rows)}))
    else:
        print(table(rows) if rows else "no counts stored for this selection")
    return 0
