"""The Grafana dashboard (deploy/grafana/edge-agent.json) shows metrics the code exports.

Every PromQL expression of the dashboard, its panels' and its variables', may only name series
that the running daemons export: the families in prometheus_client's registry once the agent's
and the bridge's daemon modules are imported (so a renamed metric fails here), plus what
Prometheus makes itself (``up``). promtool (Debian package ``prometheus``) parses every
expression when installed.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "edge-agent.json"
# What the daemons import to run: every metric they can export is registered by then.
DAEMON_MODULES = ("edge_agent.agent.daemon", "edge_agent.bridge.daemon")
PROMETHEUS_OWN = {"up"}
# PromQL words that stand where a metric name could and are not followed by "(".
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
                   "and", "or", "unless", "inf", "nan"}
# The sample names a family of each type exposes (prometheus_client's names, with _total for counters).
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created"), "info": ("_info",), "stateset": ("",), "enum": ("",),
            "untyped": ("",), "unknown": ("",)}


def exported_series() -> set[str]:
    """Every series name the agent and the bridge can export."""
    for module in DAEMON_MODULES:
        importlib.import_module(module)
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in SUFFIXES[family.type])
        names.update(sample.name for sample in family.samples)
    return names


def metric_names_in(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions (followed by
    "("), keywords, label names (inside {} or a grouping), durations or numbers."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values, Grafana variables inside them
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges, $__rate_interval
    # Groupings go whole, so that "sum by (l) (x)" reads as the call "sum (x)".
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for m in re.finditer(r"(?<![\w$.:])([A-Za-z_:][\w:]*)(?!\w)(\s*\()?", text):
        word, is_call = m.group(1), m.group(2) is not None
        if not is_call and word.lower() not in PROMQL_KEYWORDS:
            names.add(word)
    return names


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(doc: dict) -> Iterator[dict]:
    """Every panel, rows' nested panels included, rows themselves excluded."""
    for panel in doc["panels"]:
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def variable_queries(doc: dict) -> Iterator[tuple[str, str]]:
    """(variable, the PromQL selector its label_values() query reads)."""
    for var in doc["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\)\s*", query)
        assert m, f"variable {var['name']}: expected label_values(selector, label), got {query!r}"
        yield var["name"], m.group(1)


def expressions(doc: dict) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and variable query of the dashboard."""
    for panel in panels(doc):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} target {target.get('refId')}", target["expr"]
    for name, selector in variable_queries(doc):
        yield f"variable {name}", selector


def test_every_expression_names_metrics_the_daemons_export() -> None:
    exported = exported_series() | PROMETHEUS_OWN
    seen: set[str] = set()
    for where, expr in expressions(dashboard()):
        names = metric_names_in(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        unknown = names - exported
        assert not unknown, f"{where} reads series nobody exports: {sorted(unknown)} in {expr!r}"
        seen |= names
    # The dashboard covers both sides: counting, outbox and uplink of the agent; the bridge's path.
    for needed in ("edge_camera_fps", "edge_crossings_total", "edge_outbox_depth", "edge_mqtt_connected",
                   "edge_bridge_delivery_seconds_bucket", "edge_bridge_dlq_total", "edge_bridge_inflight"):
        assert needed in seen, f"no panel shows {needed}"


def test_every_panel_has_a_datasource_and_a_query() -> None:
    doc = dashboard()
    variables = {var["name"]: var for var in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in doc["panels"]] + [p["id"] for row in doc["panels"] for p in row.get("panels", [])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(doc):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], panel["title"]
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], panel["title"]
        assert panel.get("description"), f"panel {panel['title']!r}: say what it shows and from which metric"
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, panel["title"]
    assert 36 <= doc["schemaVersion"] <= 41 and doc["uid"] and doc["title"]


def test_name_extraction_catches_a_renamed_metric() -> None:
    # The checks above are worth something only if a wrong name is seen, wherever it stands.
    expr = ('histogram_quantile(0.95, sum by (instance, le) (rate(edge_bridge_delivery_secs_bucket'
            '{instance=~"$bridge"}[$__rate_interval]))) / clamp_min(edge_bridge_inflight offset 5m, 1e-9)')
    assert metric_names_in(expr) == {"edge_bridge_delivery_secs_bucket", "edge_bridge_inflight"}
    assert metric_names_in('sum(rate(edge_frames_total{result="error"}[5m])) > bool 0') == {"edge_frames_total"}
    exported = exported_series()
    assert "edge_bridge_delivery_secs_bucket" not in exported
    assert {"edge_frames_total", "edge_inference_seconds_bucket", "edge_camera_fps"} <= exported


def as_plain_promql(expr: str) -> str:
    """Grafana's variables replaced by what Prometheus would be sent."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
def test_promtool_parses_every_expression(tmp_path: Path) -> None:
    rules = [{"record": f"edge:dashboard_check_{i}", "expr": as_plain_promql(expr)}
             for i, (_, expr) in enumerate(expressions(dashboard()))]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    check = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
