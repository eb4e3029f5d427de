"""Hostile config files: ``check-config`` always answers with problem lines, a running agent's
live config refuses every broken edit, keeps what runs, and still takes the next good edit."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.agent.config import AgentConfig
from edge_agent.agent.liveconfig import ConfigChange, ConfigRejected, LiveConfig
from edge_agent.cli import main as cli_main
from edge_agent.common.envelope import Draft
from edge_testkit.processes import wait_for

VALID_AGENT: dict[str, Any] = {
    "device_id": "gw-1",
    "outbox": {"path": "/tmp/never-opened/outbox"},
    "cameras": [{"id": "cam-1", "source": "rtsp://cam.local/stream", "fps": 5,
                 "lines": [{"id": "door", "points": [[0.5, 0.0], [0.5, 1.0]]}]}],
    "report": {"interval_s": 60},
}
VALID_BRIDGE: dict[str, Any] = {"kafka": {"bootstrap_servers": "127.0.0.1:9092"}, "max_message_bytes": "1MB"}

json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30)
json_values = st.recursive(json_leaf, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=12), kids, max_size=4), max_leaves=20)

# Texts that have broken parsers before: deep nesting, bad encodings, YAML tags and aliases.
nasty_texts = st.sampled_from([
    b"[" * 5000, b"{a: " * 3000, b"\xff\xfe\x00", b"!!python/object/apply:os.system [echo]",
    b"a: &a [1]\nb: *a\nc: *b\n", b"device_id: [\n", b"\x00" * 10, b"- 1\n- 2\n", b"'", b"%YAML 9.9\n---\n",
    b"device_id: gw\ncameras: [{id: c, source: '0', fps: .nan}]\n",
    b"device_id: gw\noutbox: {max_bytes: 99999999999999999999999999999TiB}\n",
])


def _mutate(base: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    """``base`` with ``value`` set at a path of existing or new keys."""
    doc: dict[str, Any] = yaml.safe_load(yaml.safe_dump(base))
    node: Any = doc
    for key in path[:-1]:
        if not isinstance(node, dict):
            break
        node = node.setdefault(key, {})
    if isinstance(node, dict) and path:
        node[path[-1]] = value
    return doc


keys = st.sampled_from(["device_id", "mqtt", "port", "cameras", "fps", "lines", "points", "outbox",
                        "max_bytes", "http", "listen", "kafka", "tls", "ca", "password_env", "x"])
mutations = st.builds(_mutate, st.sampled_from([VALID_AGENT, VALID_BRIDGE]), st.lists(keys, min_size=1, max_size=4),
                      json_values)
hostile_files = (st.binary(max_size=300) | nasty_texts
                 | json_values.map(lambda v: yaml.safe_dump(v).encode())
                 | mutations.map(lambda d: yaml.safe_dump(d).encode()))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=hostile_files)
def test_check_config_answers_every_file_with_exit_0_or_2_and_field_paths(
        tmp_path: Path, capsys: pytest.CaptureFixture, raw: bytes) -> None:
    path = tmp_path / "edge.yaml"
    path.write_bytes(raw)
    code = cli_main(["check-config", "-c", str(path)])
    out, err = capsys.readouterr()
    assert code in (0, 2)
    if code == 2:
        lines = err.strip().splitlines()
        assert lines and all(": " in line for line in lines), err
    else:
        assert "valid" in out


@pytest.fixture
def running_live_config(tmp_path: Path) -> Any:
    """A LiveConfig as the daemon runs it: watching its file, applying and auditing changes."""
    path = tmp_path / "agent.yaml"
    path.write_bytes(yaml.safe_dump(VALID_AGENT).encode())
    applied: list[ConfigChange] = []
    audits: list[Draft] = []
    lock = threading.Lock()

    def on_change(change: ConfigChange) -> None:
        with lock:
            applied.append(change)

    live = LiveConfig(path, emit=audits.append, on_change=on_change)
    live.start_watching()
    yield live, applied, audits
    live.stop_watching()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=hostile_files)
def test_a_running_live_config_refuses_broken_edits_and_keeps_taking_good_ones(
        running_live_config: Any, raw: bytes) -> None:
    live, applied, _audits = running_live_config
    before = live.state
    live.path.write_bytes(raw)
    try:
        change = live.reload(source="file")
    except ConfigRejected as e:
        assert e.problems and all(isinstance(p, str) for p in e.problems)
        assert live.state is before, "a refused edit must leave the running config alone"
    else:
        assert change is None or isinstance(live.config, AgentConfig)
    # Whatever came before, a good edit still applies (through the watcher, as a hand edit would).
    fps = before.config.cameras[0].fps + 1 if before.config.cameras else 5
    good = _mutate(VALID_AGENT, ["cameras"], [{**VALID_AGENT["cameras"][0], "fps": fps % 100 + 1}])
    count = len(applied)
    live.path.write_bytes(yaml.safe_dump(good).encode())
    wait_for(lambda: len(applied) > count and live.config.cameras[0].fps == fps % 100 + 1, timeout=10,
             message="the watcher applied the good edit after a hostile one")
