"""``make demo``: end to end on the real clip (slow), and its pieces (asset checks, configs)."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.agent.config import parse_agent
from edge_agent.bridge.config import parse_bridge

REPO = Path(__file__).resolve().parents[2]


def _load_demo():
    spec = importlib.util.spec_from_file_location("edge_demo", REPO / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["edge_demo"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


demo = _load_demo()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_make_demo_ends_with_counts_in_kafka_and_postgres(footage, model_path) -> None:
    footage("PETS09-S2L1")  # skips when the shared clip is missing (the download is not reachable here)
    run = subprocess.run(["make", "demo"], cwd=REPO, capture_output=True, text=True, timeout=850)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    lines = run.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert set(result) == {"frames", "lines", "kafka", "postgres"}
    assert 700 <= result["frames"] <= 795  # the clip has 795 frames; live pacing may skip a few
    v = result["lines"]["v"]
    assert v["in"] > 0 and v["out"] > 0
    assert result["kafka"]["ai.inference.results"] > 0
    # agent.started, camera.online, camera.offline (end of file), agent.stopped
    assert result["kafka"]["camera.events"] >= 4
    assert result["kafka"]["dlq"] == 0
    # the consumer stored every event once, and its counts are the agent's
    assert result["postgres"]["counts_match"] is True
    assert {k: (x["in"], x["out"]) for k, x in result["postgres"]["lines"].items()} == {"v": (v["in"], v["out"])}
    assert result["postgres"]["events"] >= result["kafka"]["camera.events"]
    assert any("crossed line v" in line for line in lines), "no live view of crossings"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_make_demo_with_rabbitmq_ends_with_messages_per_queue(footage, model_path) -> None:
    footage("PETS09-S2L1")
    run = subprocess.run(["make", "demo", "BROKER=rabbitmq"], cwd=REPO, capture_output=True, text=True, timeout=550)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(result) == {"frames", "lines", "rabbitmq"}
    v = result["lines"]["v"]
    assert v["in"] > 0 and v["out"] > 0
    queues = result["rabbitmq"]
    assert set(queues) == {"camera.queue", "ai.queue", "notification.queue", "audit.queue", "dlq.queue"}
    assert queues["ai.queue"] > 0 and queues["camera.queue"] >= 4 and queues["dlq.queue"] == 0


def test_generated_configs_are_valid_for_the_real_loaders(tmp_path: Path) -> None:
    bridge = parse_bridge(demo.bridge_config(1883, "127.0.0.1:9092", 8080))
    assert bridge.http.tokens[0].role == "admin" and bridge.broker == "kafka"
    assert parse_bridge(demo.bridge_config(1883, "", 8080, amqp_url="amqp://guest@127.0.0.1:5672/%2F")).broker == \
        "rabbitmq"
    agent = parse_agent(demo.agent_config(1883, 9108, tmp_path / "clip.avi", tmp_path / "m.onnx", 10.0, tmp_path, 5.0))
    [cam] = agent.cameras
    assert cam.fps == 10.0 and not cam.loop
    assert cam.lines[0].points == ((0.5, 0.0), (0.5, 1.0))  # the line v:0.5,0,0.5,1
    assert agent.report.interval_s == 5.0


def _opener(payload: bytes):
    return lambda url: io.BytesIO(payload)


def test_download_keeps_a_file_only_when_its_checksum_matches(tmp_path: Path) -> None:
    good = b"frames of a clip"
    asset = demo.Asset("test clip", "footage/x.avi", "https://example.invalid/x.avi", hashlib.sha256(good).hexdigest())
    dest = tmp_path / "x.avi"
    assert demo.download_checked(asset, dest, opener=_opener(good)) == dest
    assert dest.read_bytes() == good

    other = tmp_path / "y.avi"
    with pytest.raises(demo.DemoError, match="sha256"):
        demo.download_checked(asset, other, opener=_opener(b"tampered"))
    assert list(tmp_path.iterdir()) == [dest]  # nothing half-written or unverified left behind


def test_a_failed_download_says_where_it_tried(tmp_path: Path) -> None:
    def refuse(url: str):
        raise OSError("network unreachable")

    asset = demo.Asset("test clip", "footage/x.avi", "https://example.invalid/x.avi", "0" * 64)
    with pytest.raises(demo.DemoError, match="example.invalid.*unreachable"):
        demo.download_checked(asset, tmp_path / "x.avi", opener=refuse)
    assert list(tmp_path.iterdir()) == []


def test_shared_copy_wins_and_matches_the_published_checksum(shared_dir: Path, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGE_SHARED_DIR", str(shared_dir))
    clip = demo.locate(demo.CLIP, tmp_path)
    assert clip == shared_dir / demo.CLIP.shared_path
    assert demo.sha256_of(clip) == demo.CLIP.sha256  # the checksum a download is held to is the real one
    assert demo.sha256_of(demo.locate(demo.MODEL, tmp_path)) == demo.MODEL.sha256


def test_the_central_view_detects_a_seq_gap_and_drops_duplicates() -> None:
    view = demo.CentralView(demo.read_kafka("unused:1"))

    def env(seq: int, type_: str, data: dict | None = None, id_: str | None = None) -> bytes:
        return json.dumps({"id": id_ or f"id-{seq}", "device_id": demo.DEVICE, "seq": seq, "type": type_,
                           "data": data or {}}).encode()

    view._add("camera.events", env(1, "agent.started"))
    view._add("ai.inference.results", env(3, "counting.interval",
                                          {"frames": 50, "lines": {"v": {"in": 1, "out": 0,
                                                                         "cumulative": {"in": 4, "out": 2}}}}))
    view._add("ai.inference.results", env(3, "counting.interval", {"frames": 50}))  # a resend
    view._add("camera.events", env(4, "agent.stopped"))
    assert not view.complete()  # seq 2 missing
    view._add("ai.inference.results", env(2, "counting.crossing", {"line": "v", "direction": "in"}))
    assert view.complete()
    frames, lines, records = view.snapshot()
    assert (frames, lines, view.duplicates) == (50, {"v": {"in": 4, "out": 2}}, 1)
    assert records == {"camera.events": 2, "ai.inference.results": 3}
    view._add("camera.events", b"not json")  # counted, never breaks the view
    assert view.snapshot()[2]["camera.events"] == 3


def test_without_shared_a_verified_local_copy_is_used_and_a_wrong_one_is_not(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("EDGE_SHARED_DIR", str(tmp_path / "no-shared"))
    right, wrong = tmp_path / "right.avi", tmp_path / "wrong.avi"
    right.write_bytes(b"the real clip")
    wrong.write_bytes(b"something else")
    asset = demo.Asset("test clip", "footage/x.avi", "https://example.invalid/x.avi",
                       hashlib.sha256(b"the real clip").hexdigest(), elsewhere=(str(wrong), str(right)))
    assert demo.locate(asset, tmp_path / "cache") == right
    only_wrong = demo.Asset(asset.name, asset.shared_path, asset.url, asset.sha256, elsewhere=(str(wrong),))
    monkeypatch.setattr(demo.urllib.request, "urlopen", lambda url: io.BytesIO(b"tampered"))
    with pytest.raises(demo.DemoError, match="sha256"):
        demo.locate(only_wrong, tmp_path / "cache")


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


@pytest.mark.timeout(240)
def test_a_terminated_demo_stops_everything_it_started(tmp_path: Path, model_path, footage) -> None:
    import re
    import signal

    from edge_testkit.processes import wait_for

    footage("PETS09-S2L1")
    workdir = tmp_path / "demo"
    log = tmp_path / "demo.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "demo.py"), "--workdir", str(workdir)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    try:
        wait_for(lambda: "counting people" in log.read_text() or proc.poll() is not None, 150,
                 message="the demo's agent running")
        assert proc.poll() is None, log.read_text()
        kafka_url = "tcp://" + re.search(r"\(Tansu\) ([\d.]+:\d+)", log.read_text()).group(1)
        assert _processes_mentioning(str(workdir)) and _processes_mentioning(kafka_url)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert json.loads(log.read_text().strip().splitlines()[-1]) == {"error": "interrupted"}
    assert _processes_mentioning(str(workdir)) == [] and _processes_mentioning(kafka_url) == []
