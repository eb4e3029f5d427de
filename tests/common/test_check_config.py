"""check-config catches what would fail at run time, each as one ``path: message`` line and exit 2:
class names the model does not report, a model file that is missing or not ONNX, missing TLS
files, unknown source schemes, duplicate YAML keys, an HTTP listen address without a host. Items
are named by id, unknown keys get a suggestion, and ``--env-file`` reads the unit's secrets so the
shipped examples pass on a host that has their files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edge_agent.agent.config import AgentConfig, load_agent
from edge_agent.agent.liveconfig import ConfigRejected, LiveConfig
from edge_agent.bridge.config import load_bridge
from edge_agent.cli import EXTRA_MODULES
from edge_agent.cli import main as cli_main
from edge_agent.common.config import ConfigError, parse_yaml_mapping
from edge_agent.common.envfile import parse_env_file
from edge_agent.vision.onnx_file import file_class_names

REPO = Path(__file__).resolve().parents[2]
AGENT_EXAMPLE = REPO / "examples" / "agent.yaml"
BRIDGE_EXAMPLES = [REPO / "examples" / "bridge.yaml", REPO / "systemd" / "bridge.yaml.example"]
AGENT_ENV = REPO / "systemd" / "agent.env.example"
BRIDGE_ENV = REPO / "systemd" / "bridge.env.example"
# The target host's directories the examples name; the tests move them under a temp root.
HOST_DIRS = ("/etc/edge-agent/", "/etc/edge-bridge/", "/opt/edge-agent/")


@pytest.fixture(autouse=True)
def no_edge_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Secrets come only from what a test gives (an --env-file), never from the developer's shell."""
    for name in [n for n in os.environ if n.startswith("EDGE_")]:
        monkeypatch.delenv(name)


def check(path: Path, *args: str, capsys: pytest.CaptureFixture) -> tuple[int, list[str], str]:
    """``edge-agent check-config -c PATH ARGS``: (exit code, problem lines, stdout)."""
    code = cli_main(["check-config", "-c", str(path), *args])
    out, err = capsys.readouterr()
    return code, [line for line in err.splitlines() if line.strip()], out


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def agent_yaml(model: Path | str, cameras: str = "", **sections: str) -> str:
    text = f"device_id: gw-1\nmodel: {{path: '{model}', classes: [person]}}\n"
    text += "".join(f"{key}: {value}\n" for key, value in sections.items())
    return text + (f"cameras:\n{cameras}" if cameras else "")


CAMERA = "  - {id: cam-1, source: 'rtsp://10.0.0.5/s'}\n"


def rerooted(example: Path, root: Path) -> Path:
    """The example with the host paths it names moved under ``root`` (where a test puts the files)."""
    text = example.read_text()
    for prefix in HOST_DIRS:
        text = text.replace(prefix, f"{root}{prefix}")
    return write(root, text, example.name)


def place(path: Path | None, content: Path | str = "placeholder\n") -> None:
    """A file where the config names one: a link to ``content`` when it is a path, else that text."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, Path):
        path.symlink_to(content)
    else:
        path.write_text(content)


# --- the shipped examples ------------------------------------------------------------------------

def test_agent_example_passes_on_a_host_with_its_files(tmp_path: Path, model_path: Path, capsys) -> None:
    """What an operator runs after install.sh: every file the example names is checked, and there."""
    path = rerooted(AGENT_EXAMPLE, tmp_path)
    cfg = load_agent(path)
    assert cfg.mqtt.tls is not None and cfg.cameras, "the example shows TLS and a camera"
    for tls_file in (cfg.mqtt.tls.ca, cfg.mqtt.tls.cert, cfg.mqtt.tls.key):
        place(tls_file)
    place(cfg.model.path, model_path)
    code, problems, out = check(path, "--env-file", str(AGENT_ENV), capsys=capsys)
    assert (code, problems) == (0, []) and "valid agent config" in out


@pytest.mark.parametrize("example", BRIDGE_EXAMPLES, ids=lambda p: p.name)
def test_bridge_examples_pass_on_a_host_with_their_files(tmp_path: Path, example: Path, capsys) -> None:
    path = rerooted(example, tmp_path)
    cfg = load_bridge(path)
    place(cfg.mqtt.tls.ca if cfg.mqtt.tls else None)
    place(cfg.kafka.ssl.ca if cfg.kafka.ssl else None)
    code, problems, out = check(path, "--env-file", str(BRIDGE_ENV), capsys=capsys)
    assert (code, problems) == (0, []) and "valid bridge config" in out


def test_agent_example_names_each_file_missing_on_this_host(capsys) -> None:
    """The file checks are on by default: in a checkout the example's host files are reported."""
    if any(Path(d).exists() for d in HOST_DIRS):
        pytest.skip("an installed host: the example's files may be here")
    code, problems, _ = check(AGENT_EXAMPLE, "--env-file", str(AGENT_ENV), capsys=capsys)
    assert code == 2
    assert problems == ["mqtt.tls.ca: /etc/edge-agent/ca.crt: no such file",
                        "mqtt.tls.cert: /etc/edge-agent/gw-001.crt: no such file",
                        "mqtt.tls.key: /etc/edge-agent/gw-001.key: no such file",
                        "model.path: /opt/edge-agent/models/yolox_nano.onnx: no such file"]


@pytest.mark.parametrize("example, env", [(AGENT_EXAMPLE, AGENT_ENV), *[(b, BRIDGE_ENV) for b in BRIDGE_EXAMPLES]],
                         ids=lambda p: p.name)
def test_readme_command_passes_in_the_checkout(example: Path, env: Path) -> None:
    """``edge-agent check-config -c examples/agent.yaml --env-file systemd/agent.env.example --skip-files``
    from the checkout, as a user types it (a child process, no EDGE_* variables of the caller)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
    proc = subprocess.run([sys.executable, "-m", "edge_agent", "check-config", "-c", str(example.relative_to(REPO)),
                           "--env-file", str(env.relative_to(REPO)), "--skip-files"],
                          cwd=REPO, env=clean, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_without_the_env_file_the_unset_secrets_are_named(capsys) -> None:
    code, problems, _ = check(AGENT_EXAMPLE, "--skip-files", capsys=capsys)
    assert code == 2
    assert problems == ["mqtt.password_env: environment variable EDGE_MQTT_PASSWORD is not set",
                        "cameras[cam-1].password_env: environment variable EDGE_CAM1_PASSWORD is not set",
                        "commands.hmac_secret_env: environment variable EDGE_CMD_SECRET is not set"]


def test_an_env_file_that_cannot_be_read_is_one_line(tmp_path: Path, capsys) -> None:
    code, problems, _ = check(AGENT_EXAMPLE, "--env-file", str(tmp_path / "none.env"), capsys=capsys)
    assert code == 2 and problems == [f"--env-file: cannot read {tmp_path / 'none.env'}: No such file or directory"]


def test_check_config_reads_the_model_with_the_base_dependencies_only(tmp_path: Path, model_path: Path) -> None:
    """On a host without the agent extra (no onnxruntime) the model file and its classes are still checked."""
    good = write(tmp_path, agent_yaml(model_path, CAMERA), "good.yaml")
    bad = write(tmp_path, agent_yaml(model_path, CAMERA).replace("[person]", "[persn]"), "bad.yaml")
    block = "import sys\nfor m in %r: sys.modules[m] = None\n" % ((*EXTRA_MODULES["agent"], *EXTRA_MODULES["bridge"]),)
    code = block + "from edge_agent.cli import main\nsys.exit(main(['check-config', '-c', sys.argv[1]]))"
    runs = [subprocess.run([sys.executable, "-c", code, str(p)], cwd=REPO, capture_output=True, text=True, timeout=60)
            for p in (good, bad)]
    assert runs[0].returncode == 0, runs[0].stderr
    assert runs[1].returncode == 2
    assert runs[1].stderr.strip() == "model.classes: unknown class 'persn'; did you mean person?"


# --- class names the model does not report -------------------------------------------------------

@pytest.mark.parametrize("cameras, expected", [
    ("  - {id: cam-1, source: '0', lines: [{id: door, points: [[0.5, 0], [0.5, 1]], classes: [persn]}]}\n",
     "cameras[cam-1].lines[door].classes: unknown class 'persn'; did you mean person?"),
    ("  - {id: cam-1, source: '0', zones: [{id: hall, polygon: [[0, 0], [1, 0], [1, 1]], classes: [car]}]}\n",
     "cameras[cam-1].zones[hall].classes: class 'car' is not in model.classes [person]: the detector drops it, "
     "so it is never counted"),
    ("  - {id: cam-1, source: '0', lines: [{id: a, points: [[0, 0], [1, 1]], classes: [persn, kar]}]}\n",
     "cameras[cam-1].lines[a].classes: unknown classes 'persn' (did you mean person?), 'kar' (did you mean car?)"),
])
def test_line_and_zone_classes_must_be_counted_classes(tmp_path: Path, model_path: Path, cameras: str,
                                                       expected: str, capsys) -> None:
    code, problems, _ = check(write(tmp_path, agent_yaml(model_path, cameras)), capsys=capsys)
    assert (code, problems) == (2, [expected])


def test_model_classes_must_be_names_the_model_reports(tmp_path: Path, model_path: Path, capsys) -> None:
    path = write(tmp_path, agent_yaml(model_path, CAMERA).replace("[person]", "[person, persn]"))
    assert check(path, capsys=capsys)[:2] == (2, ["model.classes: unknown class 'persn'; did you mean person?"])


def test_every_class_kept_lets_a_line_count_any_class_of_the_model(tmp_path: Path, model_path: Path, capsys) -> None:
    cameras = "  - {id: cam-1, source: '0', lines: [{id: door, points: [[0.5, 0], [0.5, 1]], classes: [bus]}]}\n"
    path = write(tmp_path, agent_yaml(model_path, cameras).replace("classes: [person]", "classes: []"))
    assert check(path, capsys=capsys)[0] == 0


def test_a_yolox_model_checked_away_from_its_file_is_taken_as_coco(tmp_path: Path, capsys) -> None:
    """--skip-files (or a missing file) still catches a typo: YOLOX models are COCO, as the detector assumes."""
    path = write(tmp_path, agent_yaml(tmp_path / "absent.onnx", CAMERA).replace("[person]", "[persn]"))
    assert check(path, "--skip-files", capsys=capsys)[:2] == (
        2, ["model.classes: unknown class 'persn'; did you mean person?"])


def test_an_ultralytics_model_reports_the_class_names_of_its_metadata(tmp_path: Path, capsys) -> None:
    """A custom YOLOv8 export: its own names, read from the file without onnxruntime, the same the detector reads."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["output"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 6, 8400])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 6, 8400])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    helper.set_model_props(model, {"names": "{0: 'forklift', 1: 'pallet'}", "stride": "32"})
    path = tmp_path / "forklifts.onnx"
    onnx.save(model, str(path))
    assert file_class_names(path) == ("forklift", "pallet")
    cfg = agent_yaml(path, CAMERA).replace("[person]", "[forklift, palet]").replace("{path:", "{format: yolov8, path:")
    assert check(write(tmp_path, cfg), capsys=capsys)[:2] == (
        2, ["model.classes: unknown class 'palet'; did you mean pallet?"])
    assert check(write(tmp_path, cfg.replace("palet", "pallet")), capsys=capsys)[0] == 0


def test_set_config_refuses_an_unknown_class_with_422(tmp_path: Path, model_path: Path) -> None:
    """The rule lives in the config models: a remote set_config gets it as run and check-config do."""
    from edge_agent.agent.commands import CommandError, SetConfigArgs, set_config

    path = write(tmp_path, agent_yaml(model_path, CAMERA), "agent.yaml")
    live = LiveConfig(path, check_secrets=False)

    class Control:  # the daemon's set_config, without the daemon
        def set_config(self, patch: dict, expected_version: str, *, correlation_id: str | None) -> dict:
            return {"version": live.apply_patch(patch, expected_version, correlation_id=correlation_id).version}

    camera = {"id": "cam-1", "source": "rtsp://10.0.0.5/s",
              "lines": [{"id": "door", "points": [[0.5, 0], [0.5, 1]], "classes": ["persn"]}]}
    before = path.read_bytes()
    with pytest.raises(CommandError) as err:
        set_config(Control(), SetConfigArgs(patch={"cameras": [camera]}, expected_version=live.state.version),
                   correlation_id=None)
    assert err.value.code == 422
    assert str(err.value) == ("invalid config: cameras[cam-1].lines[door].classes: unknown class 'persn'; "
                              "did you mean person?")
    assert path.read_bytes() == before
    with pytest.raises(ConfigRejected, match=r"model\.classes: unknown class 'persn'"):
        live.apply_patch({"model": {"classes": ["persn"]}}, live.state.version)


# --- the model file ------------------------------------------------------------------------------

def _pytorch_checkpoint(path: Path) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as z:  # torch.save's layout: a zip with a pickle inside
        z.writestr("model/data.pkl", b"\x80\x02}q\x00.")
    return path


def _truncated(folder: Path, model: Path) -> Path:
    path = folder / "cut.onnx"
    path.write_bytes(model.read_bytes()[:100_000])  # a download cut short
    return path


BAD_MODEL_FILES = {
    "missing": (lambda folder, model: folder / "absent.onnx", "no such file"),
    "directory": (lambda folder, model: folder, "not a regular file"),
    "pytorch": (lambda folder, model: _pytorch_checkpoint(folder / "yolox_nano.pt"),
                "not an ONNX model: a PyTorch checkpoint (zip or pickle): export the model to ONNX first"),
    "empty": (lambda folder, model: write(folder, "", "empty.onnx"), "not an ONNX model: an empty file"),
    "truncated": (_truncated, "not an ONNX model: the file ends inside a field (truncated?)"),
    "html": (lambda folder, model: write(folder, "<html>404 Not Found</html>\n", "page.onnx"),
             "not an ONNX model: not the layout of an ONNX model"),
}


@pytest.mark.parametrize("kind", BAD_MODEL_FILES)
def test_a_model_file_the_agent_cannot_load_is_named(tmp_path: Path, model_path: Path, kind: str, capsys) -> None:
    make, message = BAD_MODEL_FILES[kind]
    folder = tmp_path / "models"
    folder.mkdir()
    bad = make(folder, model_path)
    code, problems, _ = check(write(tmp_path, agent_yaml(bad, CAMERA)), capsys=capsys)
    assert (code, problems) == (2, [f"model.path: {bad}: {message}"])


def test_a_model_file_without_read_permission_is_named(tmp_path: Path, model_path: Path, capsys) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    copy = tmp_path / "model.onnx"
    copy.write_bytes(model_path.read_bytes())
    copy.chmod(0)
    code, problems, _ = check(write(tmp_path, agent_yaml(copy, CAMERA)), capsys=capsys)
    assert (code, problems) == (2, [f"model.path: {copy}: cannot read: Permission denied"])


def test_an_agent_without_cameras_needs_no_model_file(tmp_path: Path, capsys) -> None:
    assert check(write(tmp_path, agent_yaml(tmp_path / "absent.onnx")), capsys=capsys)[0] == 0


def test_run_refuses_a_model_that_is_not_onnx_in_one_line(tmp_path: Path) -> None:
    """The detector (run, count) says the same as check-config instead of onnxruntime's traceback."""
    pytest.importorskip("onnxruntime")
    from edge_agent.vision.config import ModelConfig
    from edge_agent.vision.detect import Detector, ModelFileError

    pt = _pytorch_checkpoint(tmp_path / "yolox_nano.pt")
    with pytest.raises(ModelFileError) as err:
        Detector(ModelConfig(path=pt))
    assert str(err.value) == (f"model.path: {pt}: not an ONNX model: a PyTorch checkpoint (zip or pickle): "
                              "export the model to ONNX first")


def test_run_exits_2_naming_a_model_file_that_is_not_there(tmp_path: Path) -> None:
    """Before: the camera failed to start again and again, with a traceback each time."""
    pytest.importorskip("onnxruntime")
    cfg = write(tmp_path, agent_yaml(tmp_path / "absent.onnx", cameras=CAMERA))
    proc = subprocess.run([sys.executable, "-m", "edge_agent", "run", "-c", str(cfg)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"model.path: {tmp_path / 'absent.onnx'}: no such file"


# --- TLS files -----------------------------------------------------------------------------------

def test_missing_agent_tls_files_are_named(tmp_path: Path, capsys) -> None:
    place(tmp_path / "ca.crt")
    tls = f"{{tls: {{ca: {tmp_path / 'ca.crt'}, cert: {tmp_path / 'gw.crt'}, key: {tmp_path / 'gw.key'}}}}}"
    code, problems, _ = check(write(tmp_path, agent_yaml("m.onnx", mqtt=tls)), capsys=capsys)
    assert (code, problems) == (2, [f"mqtt.tls.cert: {tmp_path / 'gw.crt'}: no such file",
                                    f"mqtt.tls.key: {tmp_path / 'gw.key'}: no such file"])


def test_missing_bridge_tls_files_are_named_for_mqtt_and_kafka(tmp_path: Path, capsys) -> None:
    text = (f"mqtt: {{tls: {{ca: {tmp_path / 'ca.crt'}}}}}\n"
            f"kafka: {{security_protocol: SSL, ssl: {{ca: {tmp_path / 'kafka-ca.crt'}}}}}\n")
    code, problems, _ = check(write(tmp_path, text), capsys=capsys)
    assert (code, problems) == (2, [f"mqtt.tls.ca: {tmp_path / 'ca.crt'}: no such file",
                                    f"kafka.ssl.ca: {tmp_path / 'kafka-ca.crt'}: no such file"])


def test_skip_files_leaves_the_files_alone(tmp_path: Path, capsys) -> None:
    text = agent_yaml(tmp_path / "absent.onnx", CAMERA, mqtt=f"{{tls: {{ca: {tmp_path / 'ca.crt'}}}}}")
    path = write(tmp_path, text)
    assert check(path, capsys=capsys)[0] == 2
    assert check(path, "--skip-files", capsys=capsys)[0] == 0


# --- camera sources ------------------------------------------------------------------------------

@pytest.mark.parametrize("source, expected", [
    ("rtps://10.0.0.5/s", "unknown scheme 'rtps'; did you mean rtsp? (known: rtsp, rtsps, rtmp, http, https, udp, "
                          "tcp, file; or /dev/videoN, N, a file path)"),
    ("htp://cam/video.mjpg", "unknown scheme 'htp'; did you mean http?"),
    ("rtsp:/10.0.0.5/s", "the URL has no host: rtsp://HOST/…"),
])
def test_a_source_nothing_can_open_is_refused(tmp_path: Path, source: str, expected: str, capsys) -> None:
    camera = f"  - {{id: cam-1, source: '{source}'}}\n"
    code, problems, _ = check(write(tmp_path, agent_yaml("m.onnx", camera)), "--skip-files", capsys=capsys)
    assert code == 2 and len(problems) == 1 and problems[0].startswith(f"cameras[cam-1].source: {expected}"), problems


@pytest.mark.parametrize("source", ["0", "/dev/video0", "file:///srv/clip.mp4", "/srv/clip.mp4", "clip.mp4",
                                    "rtsp://10.0.0.5:554/s", "RTSPS://cam/s", "http://cam/video.mjpg",
                                    "udp://@:1234"])
def test_sources_capture_opens_are_taken(tmp_path: Path, source: str, capsys) -> None:
    camera = f"  - {{id: cam-1, source: '{source}'}}\n"
    assert check(write(tmp_path, agent_yaml("m.onnx", camera)), "--skip-files", capsys=capsys)[0] == 0


# --- duplicate YAML keys -------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("device_id: a\nlog: {level: INFO}\ndevice_id: b\n", ["device_id: duplicate key, on lines 1 and 3"]),
    ("device_id: a\ncameras:\n  - id: cam-1\n    source: '0'\n    fps: 5\n    fps: 10\n",
     ["cameras[cam-1].fps: duplicate key, on lines 5 and 6"]),
    ("device_id: a\nmqtt: {port: 1883, port: 8883}\n", ["mqtt.port: duplicate key, twice on line 2"]),
    ("device_id: a\ncameras:\n  - {source: '0', lines: [], lines: []}\n",
     ["cameras.0.lines: duplicate key, twice on line 3"]),
])
def test_a_key_given_twice_is_refused(tmp_path: Path, text: str, expected: list[str], capsys) -> None:
    assert check(write(tmp_path, text), "--skip-files", capsys=capsys)[:2] == (2, expected)
    with pytest.raises(ConfigError) as err:  # the one reader of run and the live config
        parse_yaml_mapping(text)
    assert err.value.problems == expected


def test_merge_keys_and_aliases_are_not_duplicates() -> None:
    text = "base: &b {fps: 5, loop: true}\ncam: {<<: *b, fps: 10}\nother: *b\n"
    assert parse_yaml_mapping(text)["cam"] == {"fps": 10, "loop": True}


def test_aliases_are_walked_once() -> None:
    """A billion-laughs document is refused (or read) quickly, not walked exponentially."""
    text = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 10) + "]\n" for i in range(8))
    assert set(parse_yaml_mapping(text)) == {chr(97 + i) for i in range(9)}


# --- http.listen, log.level ----------------------------------------------------------------------

@pytest.mark.parametrize("text, port", [("device_id: a\nhttp: {listen: ':9108'}\n", 9108),
                                        ("kafka: {}\nhttp: {listen: '[]:8080'}\n", 8080)])
def test_listen_without_a_host_is_refused(tmp_path: Path, text: str, port: int, capsys) -> None:
    code, problems, _ = check(write(tmp_path, text), capsys=capsys)
    assert code == 2 and len(problems) == 1
    assert problems[0].endswith(f" has no host: write 127.0.0.1:{port} (this host only) or 0.0.0.0:{port} "
                                "(every interface)") and problems[0].startswith("http.listen: ")


@pytest.mark.parametrize("listen", ["127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", "127.0.0.1:http"])
def test_listen_needs_a_port_in_range(tmp_path: Path, listen: str, capsys) -> None:
    code, problems, _ = check(write(tmp_path, f"device_id: a\nhttp: {{listen: '{listen}'}}\n"), capsys=capsys)
    assert code == 2 and problems == [f"http.listen: expected HOST:PORT with a port from 1 to 65535, "
                                      f"e.g. 127.0.0.1:9108, not {listen!r}"]


@pytest.mark.parametrize("text", ["device_id: a\nlog: {level: info}\n", "kafka: {}\nlog: {level: Warning}\n"])
def test_log_level_is_case_insensitive(tmp_path: Path, text: str, capsys) -> None:
    code, problems, out = check(write(tmp_path, text), capsys=capsys)
    assert (code, problems) == (0, []) and "valid" in out


def test_an_unknown_log_level_is_still_refused(tmp_path: Path, capsys) -> None:
    code, problems, _ = check(write(tmp_path, "device_id: a\nlog: {level: verbose}\n"), capsys=capsys)
    assert code == 2 and len(problems) == 1 and problems[0].startswith("log.level: Input should be 'DEBUG'")


def test_log_level_reaches_python_logging_in_upper_case() -> None:
    assert AgentConfig.model_validate({"device_id": "a", "log": {"level": "debug"}}).log.level == "DEBUG"


# --- paths by id, suggestions --------------------------------------------------------------------

@pytest.mark.parametrize("cameras, expected", [
    ("  - {id: cam-1, source: '0', fsp: 5}\n", "cameras[cam-1].fsp: unknown key; did you mean fps?"),
    ("  - {id: cam-1, source: '0', lines: [{id: door, points: [[0, 0], [1, 1]], ancor: center}]}\n",
     "cameras[cam-1].lines[door].ancor: unknown key; did you mean anchor?"),
    ("  - {source: '0', fps: 5}\n", "cameras.0.id: Field required"),  # no id: the index
    ("  - {id: 'front door', source: '0', fsp: 5}\n", "cameras.0.id: String should match pattern"),
    ("  - {id: c, source: '0', zones: [{id: z, polygon: [[0, 0], [1, 0], [2, 1]]}]}\n",
     "cameras[c].zones[z].polygon.2.0: Input should be less than or equal to 1"),
])
def test_items_are_named_by_id(tmp_path: Path, cameras: str, expected: str, capsys) -> None:
    code, problems, _ = check(write(tmp_path, agent_yaml("m.onnx", cameras)), "--skip-files", capsys=capsys)
    assert code == 2 and any(p.startswith(expected) for p in problems), problems


def test_duplicate_ids_fall_back_to_the_index(tmp_path: Path, capsys) -> None:
    cameras = "  - {id: cam-1, source: '0', fsp: 5}\n  - {id: cam-1, source: '1'}\n"
    code, problems, _ = check(write(tmp_path, agent_yaml("m.onnx", cameras)), "--skip-files", capsys=capsys)
    assert code == 2 and "cameras.0.fsp: unknown key; did you mean fps?" in problems


@pytest.mark.parametrize("text, expected", [
    ("device_id: a\nmqtt: {hots: broker}\n", "mqtt.hots: unknown key; did you mean host?"),
    ("device_id: a\nmqtt: {tls: {cafile: /x}}\n", "mqtt.tls.cafile: unknown key"),
    ("kafka: {bootstrap_server: 'k:9092'}\n", "kafka.bootstrap_server: unknown key; did you mean bootstrap_servers?"),
    ("device_id: a\nreprot: {interval_s: 5}\n", "reprot: unknown key; did you mean report?"),
    ("device_id: a\nbogus_key: 1\n", "bogus_key: unknown key"),
])
def test_unknown_keys_get_the_closest_field(tmp_path: Path, text: str, expected: str, capsys) -> None:
    code, problems, _ = check(write(tmp_path, text), capsys=capsys)
    assert (code, problems) == (2, [expected])


# --- systemd's EnvironmentFile format ------------------------------------------------------------

def test_env_file_is_read_as_systemd_reads_it() -> None:
    text = ("# a comment\n; another\n\n"
            "A=plain value  \n"
            'B="double \\"quoted\\" $x \\$y"\n'
            "C='single \\n kept'\n"
            "D=line\\\ncontinued\n"
            "  E = spaced\n"
            "not an assignment\n"
            'F="multi\nline"\n'
            'G=a "b" c\n'
            "1BAD=x\n"
            "I=\n"
            "J=#not a comment\n"
            "K=last wins\nK=last\n")
    assert parse_env_file(text) == {"A": "plain value", "B": 'double "quoted" $x $y', "C": "single \\n kept",
                                    "D": "linecontinued", "E": "spaced", "F": "multi\nline", "G": 'a "b" c',
                                    "I": "", "J": "#not a comment", "K": "last"}


def test_env_file_values_count_as_set(tmp_path: Path, capsys) -> None:
    text = "device_id: a\ncommands: {hmac_secret_env: EDGE_TEST_SECRET}\n"
    path = write(tmp_path, text)
    assert check(path, capsys=capsys)[:2] == (2, ["commands.hmac_secret_env: environment variable EDGE_TEST_SECRET "
                                                  "is not set"])
    env = write(tmp_path, "EDGE_TEST_SECRET='s3 cret'\n", "agent.env")
    assert check(path, "--env-file", str(env), capsys=capsys)[0] == 0


def test_one_agent_example() -> None:
    """examples/agent.yaml is the one agent example: install.sh installs it, no second copy drifts."""
    assert not (REPO / "systemd" / "agent.yaml.example").exists()
    install = (REPO / "scripts" / "install.sh").read_text()
    assert '"$SRC/examples/agent.yaml" "$ROOT/etc/edge-agent/agent.yaml"' in install
    assert yaml.safe_load(AGENT_EXAMPLE.read_text())["device_id"]
