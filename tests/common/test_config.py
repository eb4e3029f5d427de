"""Config models and ``edge-agent check-config``: valid files pass, every kind of bad file
exits 2 with one line per problem that names the dotted field path, and the file is left alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from edge_agent.agent.config import load_agent, parse_agent
from edge_agent.bridge.config import load_bridge
from edge_agent.common.config import _SIZE_UNITS, ConfigError, HttpConfig, parse_bytes
from edge_agent.common.wire import STREAMS
from edge_agent.config_check import kind_of
from edge_agent.vision.config import CameraConfig

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
MINIMAL_AGENT = "device_id: gw-001\n"
AGENT_WITH_LINE = """\
device_id: gw-001
mqtt: {host: 127.0.0.1, port: 1883}
cameras:
  - id: cam-1
    source: file:///tmp/clip.mp4
    lines: [{id: door, points: [[0.5, 0.0], [0.5, 1.0]]}]
"""


def check_config(path: Path, env: dict[str, str] | None = None, *args: str) -> subprocess.CompletedProcess[str]:
    """``edge-agent check-config -c PATH [ARGS]`` as a user runs it (a child process)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
    return subprocess.run([sys.executable, "-m", "edge_agent", "check-config", "-c", str(path), *args], check=False,
                          capture_output=True, text=True, timeout=60, env={**clean, **(env or {})}, cwd=REPO)


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problem_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


# --- valid files -----------------------------------------------------------------------------

def test_example_agent_matches_design_shape() -> None:
    cfg = load_agent(EXAMPLES / "agent.yaml")
    assert cfg.device_id == "gw-001"
    assert cfg.outbox.max_bytes == 2**30  # "1GiB"
    line = cfg.cameras[0].lines[0]
    assert line.points == ((0.5, 0.0), (0.5, 1.0))
    assert cfg.commands.hmac_secret_env == "EDGE_CMD_SECRET"


def test_example_bridge_matches_design_shape() -> None:
    cfg = load_bridge(EXAMPLES / "bridge.yaml")
    assert cfg.kafka.security_protocol == "SASL_SSL" and cfg.kafka.sasl is not None
    assert cfg.mqtt.share_group == "bridge"
    assert set(cfg.topics) == set(STREAMS)


def test_config_without_cameras_is_valid(tmp_path: Path) -> None:
    result = check_config(write(tmp_path, MINIMAL_AGENT))
    assert result.returncode == 0, result.stderr
    assert load_agent(tmp_path / "cfg.yaml").cameras == []


def test_minimal_bridge_file_is_told_apart_by_its_keys(tmp_path: Path) -> None:
    result = check_config(write(tmp_path, "kafka: {bootstrap_servers: '127.0.0.1:9092'}\n"))
    assert result.returncode == 0, result.stderr
    assert "valid bridge config" in result.stdout


# --- bad files: exit 2, one line per problem naming the field --------------------------------

@pytest.mark.parametrize("text,expected", [
    (MINIMAL_AGENT + "bogus_key: 1\n", "bogus_key: unknown key"),
    (MINIMAL_AGENT + "mqtt: {port: 70000}\n", "mqtt.port: "),
    (MINIMAL_AGENT + "mqtt: {port: not-a-port}\n", "mqtt.port: "),
    (MINIMAL_AGENT + "mqtt: {tls: {cert: /a.crt}}\n", "mqtt.tls: "),
    (MINIMAL_AGENT + "outbox: {max_bytes: lots}\n", "outbox.max_bytes: "),
    (AGENT_WITH_LINE.replace("[0.5, 1.0]", "[1.5, 1.0]"), "cameras[cam-1].lines[door].points.1.0: "),
    (AGENT_WITH_LINE.replace("[0.5, 1.0]", "[0.5, 0.0]"), "cameras[cam-1].lines[door]: "),
    (AGENT_WITH_LINE.replace("[[0.5, 0.0], [0.5, 1.0]]", "[[0.5, 0.0]]"),
     "cameras[cam-1].lines[door].points.1: Field required"),
    (AGENT_WITH_LINE.replace("id: door", "id: door, colour: red"), "cameras[cam-1].lines[door].colour: unknown key"),
    ("mqtt: {host: x}\n", "device_id: "),
    ("kafka: {security_protocol: SASL_SSL}\n", "kafka: "),
    ("kafka: {bootstrap_servers: x, linger: 5}\n", "kafka.linger: unknown key"),
])
def test_bad_field_is_named(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    result = check_config(path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = problem_lines(result)
    assert any(line.startswith(expected) for line in lines), lines
    assert path.read_text() == text  # checking never touches the file


def test_every_problem_gets_its_own_line(tmp_path: Path) -> None:
    text = MINIMAL_AGENT + "bogus_key: 1\nmqtt: {port: 0, keepalive_s: 1}\n"
    lines = problem_lines(check_config(write(tmp_path, text)))
    assert sorted(line.split(":")[0] for line in lines) == ["bogus_key", "mqtt.keepalive_s", "mqtt.port"]


def test_missing_file(tmp_path: Path) -> None:
    result = check_config(tmp_path / "nope.yaml")
    assert result.returncode == 2
    assert problem_lines(result) == [f"(file): cannot read {tmp_path / 'nope.yaml'}: No such file or directory"]


@pytest.mark.parametrize("text", ["device_id: [unclosed\n", "a: b: c\n", "\tdevice_id: x\n"])
def test_invalid_yaml(tmp_path: Path, text: str) -> None:
    result = check_config(write(tmp_path, text))
    assert result.returncode == 2
    lines = problem_lines(result)
    assert len(lines) == 1 and lines[0].startswith("(file): not valid YAML"), lines
    assert "line" in lines[0]  # the YAML error says where


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    result = check_config(write(tmp_path, "- a\n- b\n"))
    assert result.returncode == 2
    assert problem_lines(result) == ["(file): the top level must be a mapping"]


def test_unset_secret_variable_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL_AGENT + "commands: {hmac_secret_env: EDGE_TEST_UNSET_SECRET}\n")
    result = check_config(path)
    assert result.returncode == 2
    assert problem_lines(result) == ["commands.hmac_secret_env: environment variable EDGE_TEST_UNSET_SECRET is not set"]
    assert check_config(path, {"EDGE_TEST_UNSET_SECRET": "x"}).returncode == 0


def test_unset_secrets_in_lists_name_the_index(tmp_path: Path) -> None:
    text = "kafka: {}\nhttp: {tokens: [{token_env: EDGE_T1, role: admin}, {token_env: EDGE_T2, role: auditor}]}\n"
    result = check_config(write(tmp_path, text), {"EDGE_T1": "x"})
    assert problem_lines(result) == ["http.tokens.1.token_env: environment variable EDGE_T2 is not set"]


# --- the models themselves -------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [("1GiB", 2**30), ("500MB", 500 * 10**6), ("1048576", 2**20),
                                           ("1.5 KiB", 1536), (4096, 4096)])
def test_parse_bytes(text: str | int, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "1XB", "-5MB"])
def test_parse_bytes_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes(text)


@given(st.integers(min_value=0, max_value=2**50), st.sampled_from(["", "B", "KiB", "MiB", "GiB", "kb", "MB"]))
def test_parse_bytes_scales_by_unit(n: int, unit: str) -> None:
    assert parse_bytes(f"{n}{unit}") == n * _SIZE_UNITS[unit.lower()]


def test_duplicate_ids_are_refused() -> None:
    cam = {"id": "cam-1", "source": "0", "lines": [{"id": "a", "points": [[0, 0], [1, 1]]}],
           "zones": [{"id": "a", "polygon": [[0, 0], [1, 0], [1, 1]]}]}
    with pytest.raises(ConfigError) as err:
        parse_agent({"device_id": "gw", "cameras": [cam]})
    assert err.value.problems == ["cameras[cam-1]: Value error, line/zone ids must be unique per camera: a"]
    with pytest.raises(ConfigError) as err:
        parse_agent({"device_id": "gw", "cameras": [{"id": "cam-1", "source": "0"}, {"id": "cam-1", "source": "1"}]})
    assert err.value.problems == ["(file): Value error, camera ids must be unique: cam-1"]


def test_http_listen_host_port() -> None:
    assert HttpConfig(listen="[::1]:9108").host_port == ("::1", 9108)
    with pytest.raises(ValidationError, match="listen"):
        HttpConfig(listen="localhost")


def test_kind_of() -> None:
    assert kind_of({"kafka": {}}) == "bridge"
    assert kind_of({"device_id": "x", "kafka": {}}) == "agent"  # then kafka is an unknown key
    assert kind_of({}) == "agent"


# --- camera credentials from the environment -------------------------------------------------

def test_camera_credentials_can_come_from_the_environment(tmp_path: Path) -> None:
    text = MINIMAL_AGENT + ("cameras: [{id: cam-1, source: 'rtsp://10.0.0.5/s', username: viewer, "
                            "password_env: EDGE_TEST_CAM_PW}]\n")
    result = check_config(write(tmp_path, text), None, "--skip-files")  # no model file here
    assert problem_lines(result) == ["cameras[cam-1].password_env: environment variable EDGE_TEST_CAM_PW is not set"]
    assert check_config(write(tmp_path, text), {"EDGE_TEST_CAM_PW": "x"}, "--skip-files").returncode == 0


@pytest.mark.parametrize("camera, why", [
    ({"source": "rtsp://10.0.0.5/s", "password_env": "PW"}, "password_env needs a username"),
    ({"source": "/dev/video0", "username": "u"}, "stream URL"),
    ({"source": "file:///a.mp4", "username": "u"}, "stream URL"),
    ({"source": "rtsp://a:b@10.0.0.5/s", "username": "u"}, "not both"),
])
def test_camera_credentials_need_a_stream_url_without_its_own(camera: dict, why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        CameraConfig(id="c", **camera)
