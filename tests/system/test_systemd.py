"""systemd units and the install script: verified by systemd's own checker, installed into a staging root."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = ["edge-agent.service", "edge-bridge.service", "edge-consumer.service"]
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def read_unit(name: str) -> configparser.RawConfigParser:
    # strict=False: systemd allows a key to repeat (SystemCallFilter=); the last one wins here.
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(REPO / "systemd" / name)
    return parser


def with_local_binary(name: str, into: Path) -> Path:
    """verify checks that ExecStart exists: point it at this checkout's console script."""
    exe = Path(sys.executable).with_name("edge-agent")
    text = (REPO / "systemd" / name).read_text().replace("/opt/edge-agent/venv/bin/edge-agent", str(exe))
    out = into / name
    out.write_text(text)
    return out


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("name", UNITS)
def test_systemd_analyze_verify_is_clean(name: str, tmp_path: Path) -> None:
    unit = with_local_binary(name, tmp_path)
    proc = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)], capture_output=True, text=True,
                          timeout=60)
    # verify exits 0 on unknown keys too: any output at all is a finding.
    assert proc.returncode == 0 and proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stderr


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    unit = with_local_binary("edge-agent.service", tmp_path)
    unit.write_text(unit.read_text().replace("Type=notify", "Type=notifyy"))
    proc = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)], capture_output=True, text=True,
                          timeout=60)
    assert "notifyy" in proc.stderr


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("name", UNITS)
def test_hardening_keeps_the_exposure_score_low(name: str, tmp_path: Path) -> None:
    """systemd's own scoring (0 = locked down, 10 = exposed); 1.8 and 1.5 when written."""
    import re

    unit = with_local_binary(name, tmp_path)
    proc = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", str(unit)],
                          capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout + proc.stderr)
    if m is None:
        pytest.skip("this systemd-analyze cannot score unit files offline")
    assert float(m.group(1)) <= 2.5, proc.stdout[-3000:]


@pytest.mark.parametrize("name", UNITS)
def test_units_ask_for_notify_watchdog_restart_and_hardening(name: str) -> None:
    svc = read_unit(name)["Service"]
    assert svc["Type"] == "notify" and svc["Restart"] == "on-failure"
    assert int(svc["WatchdogSec"]) > 0 and svc["StateDirectory"] and svc["ConfigurationDirectory"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelTunables", "ProtectKernelModules",
                "ProtectControlGroups", "RestrictNamespaces"):
        assert svc[key] == "yes", key
    assert svc["ProtectSystem"] == "strict" and svc["CapabilityBoundingSet"] == ""
    assert "AF_PACKET" not in svc["RestrictAddressFamilies"] and svc["SystemCallArchitectures"] == "native"
    assert svc.get("User") or svc.get("DynamicUser") == "yes"


def test_agent_unit_can_rewrite_its_config_and_read_cameras() -> None:
    svc = read_unit("edge-agent.service")["Service"]
    assert svc["User"] == "edge-agent" and svc["SupplementaryGroups"] == "video"
    assert "/etc/edge-agent" in svc["ReadWritePaths"]  # set_config under ProtectSystem=strict
    assert "char-video4linux" in svc["DeviceAllow"]
    assert "-HUP" in svc["ExecReload"]


GPU_DROP_IN = REPO / "systemd" / "edge-agent-gpu.conf"
GPU_DEVICE_CLASSES = {"char-nvidia", "char-nvidia-uvm", "char-drm"}


def with_gpu_drop_in(into: Path, text: str | None = None) -> Path:
    """The agent's unit with the GPU drop-in beside it, where systemd looks for drop-ins."""
    unit = with_local_binary("edge-agent.service", into)
    drop_dir = into / "edge-agent.service.d"
    drop_dir.mkdir()
    (drop_dir / "gpu.conf").write_text(GPU_DROP_IN.read_text() if text is None else text)
    return unit


def device_classes(text: str) -> set[str]:
    return {line.split("=", 1)[1].split()[0] for line in text.splitlines() if line.startswith("DeviceAllow=")}


def test_the_default_unit_stays_closed_to_gpus_and_the_drop_in_opens_them() -> None:
    svc = read_unit("edge-agent.service")["Service"]
    assert svc["DevicePolicy"] == "closed"
    assert not device_classes((REPO / "systemd" / "edge-agent.service").read_text()) & GPU_DEVICE_CLASSES
    drop_in = GPU_DROP_IN.read_text()
    assert GPU_DEVICE_CLASSES <= device_classes(drop_in)
    keys = {line.split("=", 1)[0] for line in drop_in.splitlines() if "=" in line and not line.startswith("#")}
    assert not keys & {"DevicePolicy", "PrivateDevices"}  # adds to the unit's list, never widens the policy
    groups = {g for line in drop_in.splitlines() if line.startswith("SupplementaryGroups=")
              for g in line.split("=", 1)[1].split()}
    assert {"render", "video"} <= groups


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_is_clean_with_the_gpu_drop_in(tmp_path: Path) -> None:
    unit = with_gpu_drop_in(tmp_path)
    proc = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stderr


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_verify_reads_the_gpu_drop_in(tmp_path: Path) -> None:
    """The clean verify above is only worth something if systemd read the drop-in."""
    unit = with_gpu_drop_in(tmp_path, GPU_DROP_IN.read_text().replace("MemoryMax=", "MemoryMaxx="))
    proc = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)], capture_output=True, text=True,
                          timeout=60)
    assert "MemoryMaxx" in proc.stderr and "gpu.conf" in proc.stderr


def _install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """install.sh staged into ``root`` (DESTDIR), without dependencies (the project package only)."""
    env = {**os.environ, "DESTDIR": str(root), "PREFIX": "/opt/edge-test", "PIP_ARGS": "--no-deps",
           "PYTHON": sys.executable}
    return subprocess.run(["bash", str(REPO / "scripts" / "install.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=280)


@pytest.mark.timeout(300)
def test_install_script_stages_the_agent_role_and_keeps_existing_configs(tmp_path: Path) -> None:
    root = tmp_path / "root"
    first = _install(root, "--role", "agent")
    assert first.returncode == 0, first.stderr
    assert "installing edge-agent[agent]" in first.stdout  # the camera side's extra, not the bridge's
    assert (root / "opt/edge-test/venv/bin/edge-agent").exists()
    assert (root / "opt/edge-test/docs/agent-reference.md").exists()  # where the README's links lead
    unit = (root / "etc/systemd/system/edge-agent.service").read_text()
    assert "ExecStart=/opt/edge-test/venv/bin/edge-agent run -c /etc/edge-agent/agent.yaml" in unit
    assert oct((root / "etc/edge-agent/agent.env").stat().st_mode & 0o777) == "0o600"
    # Only this role's unit and config on a camera host.
    assert not (root / "etc/systemd/system/edge-bridge.service").exists()
    assert not (root / "etc/edge-bridge").exists()
    check = subprocess.run([str(root / "opt/edge-test/venv/bin/python"), "-c", "import edge_agent"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    # The unit stays closed to GPUs unless asked.
    assert not (root / "etc/systemd/system/edge-agent.service.d").exists()
    # An operator's config survives a re-install (upgrade).
    (root / "etc/edge-agent/agent.yaml").write_text("device_id: mine\n")
    second = _install(root, "--role", "agent")
    assert second.returncode == 0, second.stderr
    assert (root / "etc/edge-agent/agent.yaml").read_text() == "device_id: mine\n"
    assert "keeping existing" in second.stdout


@pytest.mark.timeout(300)
def test_install_script_opens_the_gpu_and_keeps_the_chosen_onnxruntime(tmp_path: Path) -> None:
    """--gpu adds the drop-in; --onnxruntime swaps the runtime build, upgrades keep the swap, and a
    new choice removes the old one (every build installs the same module)."""
    root = tmp_path / "root"
    gpu, other = fake_runtime_wheel(tmp_path / "wheels", "gpu"), fake_runtime_wheel(tmp_path / "wheels", "other")
    first = _install(root, "--role", "agent", "--gpu", "--onnxruntime", str(gpu))
    assert first.returncode == 0, first.stderr
    drop_in = root / "etc/systemd/system/edge-agent.service.d/gpu.conf"
    assert drop_in.read_text() == (REPO / "systemd" / "edge-agent-gpu.conf").read_text()
    site = next((root / "opt/edge-test/venv/lib").glob("python3*/site-packages"))
    marker = site / "edge_fake_runtime_gpu.py"
    assert marker.exists()
    marker.unlink()  # as when an upgrade puts the CPU build's files over it
    upgrade = _install(root, "--role", "agent")  # no --onnxruntime: the choice is remembered
    assert upgrade.returncode == 0, upgrade.stderr
    assert f"replacing onnxruntime with {gpu}" in upgrade.stdout and marker.exists()
    switch = _install(root, "--role", "agent", "--onnxruntime", str(other))
    assert switch.returncode == 0, switch.stderr
    assert (site / "edge_fake_runtime_other.py").exists() and not marker.exists()


def fake_runtime_wheel(into: Path, variant: str) -> Path:
    """A tiny local wheel standing in for an onnxruntime build (no download in tests)."""
    import base64
    import hashlib
    import zipfile

    module = f"edge_fake_runtime_{variant}"
    name = f"{module}-1.0"
    files = {f"{module}.py": b"BUILD = 'fake'\n",
             f"{name}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n".encode(),
             f"{name}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}"
              for path, data in files.items()]
    files[f"{name}.dist-info/RECORD"] = ("\n".join([*record, f"{name}.dist-info/RECORD,,"]) + "\n").encode()
    into.mkdir(parents=True, exist_ok=True)
    wheel = into / f"{name}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


@pytest.mark.timeout(300)
def test_install_script_stages_the_bridge_role_only(tmp_path: Path) -> None:
    root = tmp_path / "root"
    run = _install(root, "--role", "bridge")
    assert run.returncode == 0, run.stderr
    assert "installing edge-agent[bridge]" in run.stdout
    unit = (root / "etc/systemd/system/edge-bridge.service").read_text()
    assert "ExecStart=/opt/edge-test/venv/bin/edge-agent bridge -c /etc/edge-bridge/bridge.yaml" in unit
    assert oct((root / "etc/edge-bridge/bridge.env").stat().st_mode & 0o777) == "0o600"
    assert (root / "etc/edge-bridge/bridge.yaml").exists()
    # No camera-host pieces on a bridge host: no agent unit, config or model directory.
    assert not (root / "etc/systemd/system/edge-agent.service").exists()
    assert not (root / "etc/edge-agent").exists() and not (root / "opt/edge-test/models").exists()


@pytest.mark.timeout(300)
def test_install_script_stages_the_consumer_role_only(tmp_path: Path) -> None:
    root = tmp_path / "root"
    run = _install(root, "--role", "consumer")
    assert run.returncode == 0, run.stderr
    assert "installing edge-agent[consumer]" in run.stdout
    unit = (root / "etc/systemd/system/edge-consumer.service").read_text()
    assert "ExecStart=/opt/edge-test/venv/bin/edge-agent consume -c /etc/edge-consumer/consumer.yaml" in unit
    assert oct((root / "etc/edge-consumer/consumer.env").stat().st_mode & 0o777) == "0o600"
    assert (root / "etc/edge-consumer/consumer.yaml").read_text() == (REPO / "examples/consumer.yaml").read_text()
    # Nothing of the other roles.
    for other in ("edge-agent", "edge-bridge"):
        assert not (root / f"etc/systemd/system/{other}.service").exists()
        assert not (root / f"etc/{other}").exists()


@pytest.mark.parametrize("args, message", [
    (["--role", "agent", "--model", "none.onnx"], "model not found"),
    ([], "--role agent (camera) or --role bridge"),
    (["--role", "camera"], "--role takes agent, bridge or consumer"),
    (["--role", "consumer", "--gpu"], "--gpu and --onnxruntime are for --role agent"),
    (["--role", "bridge", "--model", "none.onnx"], "--model is for --role agent"),
    (["--enable", "agent"], "unknown argument: agent"),
    (["--role", "bridge", "--gpu"], "--gpu and --onnxruntime are for --role agent"),
    (["--role", "agent", "--onnxruntime"], "--onnxruntime needs a package"),
])
def test_install_script_refuses_bad_arguments_clearly(tmp_path: Path, args: list[str], message: str) -> None:
    args = [str(tmp_path / a) if a.endswith(".onnx") else a for a in args]
    proc = subprocess.run(["bash", str(REPO / "scripts" / "install.sh"), *args],
                          env={**os.environ, "DESTDIR": str(tmp_path / "r")}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and message in proc.stderr
    assert not (tmp_path / "r").exists()  # nothing half-installed


def test_example_configs_are_valid(tmp_path: Path) -> None:
    """The configs install.sh installs, with the secrets files it installs beside them. The files they
    name are the target host's (tests/common/test_check_config.py checks them in place)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
    for config, secrets in (("examples/agent.yaml", "systemd/agent.env.example"),
                            ("systemd/bridge.yaml.example", "systemd/bridge.env.example"),
                            ("examples/consumer.yaml", "systemd/consumer.env.example")):
        proc = subprocess.run([sys.executable, "-m", "edge_agent", "check-config", "-c", str(REPO / config),
                               "--env-file", str(REPO / secrets), "--skip-files"],
                              env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr


# --- the notify protocol the units rely on (Type=notify + WatchdogSec), for real processes ---

@pytest.mark.timeout(120)
def test_bridge_speaks_the_notify_protocol_the_unit_expects(tmp_path: Path, mqtt_broker, kafka,
                                                            agent_process) -> None:
    import signal

    import yaml

    from edge_testkit.agent import NotifySocket
    from edge_testkit.processes import free_port, wait_for

    notify = NotifySocket(tmp_path / "notify.sock")
    cfg = {"mqtt": {"host": mqtt_broker.host, "port": mqtt_broker.port, "client_id": "bridge-notify-test"},
           "kafka": {"bootstrap_servers": kafka.bootstrap}, "http": {"listen": f"127.0.0.1:{free_port()}"}}
    (tmp_path / "bridge.yaml").write_text(yaml.safe_dump(cfg))
    try:
        proc = agent_process(["bridge", "-c", str(tmp_path / "bridge.yaml")], env={"NOTIFY_SOCKET": str(notify.path)})
        wait_for(lambda: notify.seen("READY=1"), 60, message=lambda: f"READY=1; output: {proc.output()[-2000:]}")
        # WatchdogSec=60 in edge-bridge.service: without pings systemd would kill a healthy bridge.
        wait_for(lambda: len(notify.seen("WATCHDOG=1")) >= 2, 30, message="watchdog pings")
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(60) == 0
        assert notify.seen("STOPPING=1")
    finally:
        notify.close()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_install_script_passes_shellcheck() -> None:
    proc = subprocess.run(["shellcheck", str(REPO / "scripts" / "install.sh")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout
