"""Live config: versioned file, merge patches, atomic writes, hand edits via the file watch."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import yaml

from edge_agent.agent.liveconfig import (
    ChangeForbidden,
    ConfigChange,
    ConfigRejected,
    LiveConfig,
    VersionConflict,
    changed_paths,
    version_of,
)
from edge_agent.common.envelope import Draft
from edge_testkit.processes import wait_for

BASE = {
    "device_id": "gw-1",
    "cameras": [
        {"id": "cam-1", "source": "file:///a.avi", "fps": 5},
        {"id": "cam-2", "source": "file:///b.avi", "fps": 5},
    ],
    "report": {"interval_s": 60},
}


class Recorder:
    def __init__(self) -> None:
        self.drafts: list[Draft] = []
        self.changes: list[ConfigChange] = []
        self.lock = threading.Lock()

    def emit(self, draft: Draft) -> None:
        with self.lock:
            self.drafts.append(draft)

    def on_change(self, change: ConfigChange) -> None:
        with self.lock:
            self.changes.append(change)

    def of_type(self, type_: str) -> list[Draft]:
        with self.lock:
            return [d for d in self.drafts if d.type == type_]


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    path = tmp_path / "etc" / "agent.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(BASE))
    return path


@pytest.fixture
def live(cfg_file: Path):
    rec = Recorder()
    lc = LiveConfig(cfg_file, emit=rec.emit, on_change=rec.on_change)
    lc.rec = rec  # type: ignore[attr-defined]
    yield lc
    lc.stop_watching()


def test_version_is_the_hash_of_the_file(live: LiveConfig, cfg_file: Path) -> None:
    assert live.state.version == version_of(cfg_file.read_bytes())
    assert len(live.state.version) == 16


def test_patch_is_merged_written_atomically_with_backup_and_applied(live: LiveConfig, cfg_file: Path) -> None:
    before = cfg_file.read_bytes()
    change = live.apply_patch({"report": {"interval_s": 30}, "cameras": [
        {"id": "cam-1", "source": "file:///a.avi", "fps": 2},
        {"id": "cam-2", "source": "file:///b.avi", "fps": 5}]}, live.state.version)
    assert change.version == version_of(cfg_file.read_bytes()) == live.state.version
    assert (cfg_file.parent / "agent.yaml.bak").read_bytes() == before
    on_disk = yaml.safe_load(cfg_file.read_text())
    assert on_disk["report"]["interval_s"] == 30 and on_disk["device_id"] == "gw-1"
    assert change.changed == ["cameras.cam-1.fps", "report.interval_s"]
    assert live.config.report.interval_s == 30
    assert [c.changed for c in live.rec.changes] == [change.changed]  # type: ignore[attr-defined]
    audit = live.rec.of_type("config.changed")  # type: ignore[attr-defined]
    assert audit[0].stream == "audit.logs" and audit[0].data["source"] == "remote"
    assert audit[0].data["changed"] == change.changed
    assert not list(cfg_file.parent.glob(".agent.yaml.*.tmp"))  # no temp file left behind


def test_null_in_a_merge_patch_removes_a_key(live: LiveConfig, cfg_file: Path) -> None:
    live.apply_patch({"report": None}, live.state.version)
    assert "report" not in yaml.safe_load(cfg_file.read_text())
    assert live.config.report.interval_s == 60  # back to the default


def test_stale_version_is_refused_and_nothing_changes(live: LiveConfig, cfg_file: Path) -> None:
    before = cfg_file.read_bytes()
    with pytest.raises(VersionConflict) as e:
        live.apply_patch({"report": {"interval_s": 1}}, "0123456789abcdef")
    assert e.value.current == live.state.version
    assert cfg_file.read_bytes() == before and not live.rec.changes  # type: ignore[attr-defined]


@pytest.mark.parametrize("patch, field", [
    ({"report": {"interval_s": -1}}, "report.interval_s"),
    ({"bogus": 1}, "bogus"),
    ({"cameras": [{"id": "x"}]}, "cameras[x].source"),
    ({"mqtt": {"password_env": "EDGE_TEST_SURELY_UNSET_VAR"}}, "mqtt.password_env"),
])
def test_invalid_patch_is_rejected_and_the_file_and_running_config_stay(
        live: LiveConfig, cfg_file: Path, patch: dict, field: str) -> None:
    before, version = cfg_file.read_bytes(), live.state.version
    with pytest.raises(ConfigRejected) as e:
        live.apply_patch(patch, version)
    assert any(p.startswith(field) for p in e.value.problems), e.value.problems
    assert cfg_file.read_bytes() == before and live.state.version == version
    assert not live.rec.changes  # type: ignore[attr-defined]


def test_a_patch_that_is_not_an_object_is_rejected(live: LiveConfig) -> None:
    with pytest.raises(ConfigRejected):
        live.apply_patch(["not", "an", "object"], live.state.version)  # type: ignore[arg-type]


def test_patch_is_checked_against_the_file_on_disk_not_the_running_copy(live: LiveConfig, cfg_file: Path) -> None:
    # A hand edit the watcher has not picked up yet: the operator's version is stale.
    cfg_file.write_text(yaml.safe_dump({**BASE, "report": {"interval_s": 10}}))
    with pytest.raises(VersionConflict):
        live.apply_patch({"report": {"interval_s": 20}}, live.state.version)


@pytest.mark.timeout(30)
def test_hand_edit_is_picked_up_by_the_watch(live: LiveConfig, cfg_file: Path) -> None:
    live.start_watching()
    edited = {**BASE, "cameras": [BASE["cameras"][0]]}
    tmp = cfg_file.with_suffix(".swp")
    tmp.write_text(yaml.safe_dump(edited))
    os.replace(tmp, cfg_file)  # how editors save
    wait_for(lambda: live.rec.changes, 10)  # type: ignore[attr-defined]
    change = live.rec.changes[0]  # type: ignore[attr-defined]
    assert change.source == "file" and change.changed == ["cameras.cam-2"]
    assert [c.id for c in live.config.cameras] == ["cam-1"]
    assert live.rec.of_type("config.changed")[0].data["source"] == "file"  # type: ignore[attr-defined]


@pytest.mark.timeout(30)
def test_broken_hand_edit_is_refused_audited_once_and_running_config_kept(
        live: LiveConfig, cfg_file: Path) -> None:
    live.start_watching()
    version = live.state.version
    cfg_file.write_text("device_id: gw-1\ncameras: [ {id: cam-1\n")  # unbalanced: not YAML
    wait_for(lambda: live.rec.of_type("config.rejected"), 10)  # type: ignore[attr-defined]
    rejected = live.rec.of_type("config.rejected")[0]  # type: ignore[attr-defined]
    assert rejected.data["running_version"] == version and "YAML" in rejected.data["problems"][0]
    assert live.state.version == version and len(live.config.cameras) == 2
    # SIGHUP path: the same broken bytes are not audited twice.
    live.request_reload()
    with pytest.raises(ConfigRejected):
        live.reload()
    assert len(live.rec.of_type("config.rejected")) == 1  # type: ignore[attr-defined]
    # Fixing the file is picked up.
    cfg_file.write_text(yaml.safe_dump({**BASE, "report": {"interval_s": 5}}))
    wait_for(lambda: live.config.report.interval_s == 5, 10)


def test_our_own_write_does_not_count_as_a_second_change(live: LiveConfig) -> None:
    live.start_watching()
    live.apply_patch({"report": {"interval_s": 7}}, live.state.version)
    # The watcher sees the rename; reloading the same bytes is no change.
    assert live.reload() is None
    assert len(live.rec.changes) == 1  # type: ignore[attr-defined]


def test_changed_paths_keys_lists_of_objects_by_id() -> None:
    old = {"cameras": [{"id": "a", "fps": 1}, {"id": "b", "fps": 1}], "x": [1, 2]}
    new = {"cameras": [{"id": "b", "fps": 1}, {"id": "a", "fps": 2}, {"id": "c"}], "x": [1, 3]}
    assert changed_paths(old, new) == ["cameras.a.fps", "cameras.c", "x"]


def test_a_deleted_config_file_is_refused_and_the_running_config_stays(live: LiveConfig, cfg_file: Path) -> None:
    version = live.state.version
    cfg_file.unlink()
    with pytest.raises(ConfigRejected) as e:
        live.reload()
    assert "cannot read" in e.value.problems[0] and live.state.version == version
    assert live.rec.of_type("config.rejected")[0].data["running_version"] == version  # type: ignore[attr-defined]
    with pytest.raises(ConfigRejected):
        live.apply_patch({"report": {"interval_s": 1}}, version)


@pytest.mark.timeout(30)
def test_request_reload_works_without_the_file_watch(live: LiveConfig, cfg_file: Path) -> None:
    """The SIGHUP path: no inotify involved."""
    live.start_watching(file_watch=False)
    cfg_file.write_text(yaml.safe_dump({**BASE, "report": {"interval_s": 9}}))
    live.request_reload()
    wait_for(lambda: live.rec.changes, 10)  # type: ignore[attr-defined]
    assert live.config.report.interval_s == 9 and live.rec.changes[0].source == "file"  # type: ignore[attr-defined]


# --- what a remote patch may change -------------------------------------------------------------

CAM_WITH_ENV_PASSWORD = {"id": "cam-3", "source": "rtsp://10.0.0.3/s", "username": "viewer",
                         "password_env": "EDGE_TEST_CAM3_PW"}


@pytest.fixture
def guarded(cfg_file: Path, monkeypatch: pytest.MonkeyPatch):
    """A live config with a camera whose password comes from the environment, and the secrets set."""
    for var in ("EDGE_TEST_CAM3_PW", "EDGE_TEST_CMD_SECRET", "EDGE_TEST_OTHER"):
        monkeypatch.setenv(var, "x")
    cfg_file.write_text(yaml.safe_dump({**BASE, "cameras": BASE["cameras"] + [CAM_WITH_ENV_PASSWORD],
                                        "commands": {"hmac_secret_env": "EDGE_TEST_CMD_SECRET"}}))
    rec = Recorder()
    lc = LiveConfig(cfg_file, emit=rec.emit, on_change=rec.on_change)
    lc.rec = rec  # type: ignore[attr-defined]
    return lc


def cameras_with(**cam3: object) -> list[dict]:
    return BASE["cameras"] + [{**CAM_WITH_ENV_PASSWORD, **cam3}]


@pytest.mark.parametrize("patch, refused", [
    ({"mqtt": {"host": "10.6.6.6"}}, ["mqtt.host"]),
    ({"mqtt": {"password_env": "EDGE_TEST_CMD_SECRET", "tls": None}}, ["mqtt.password_env"]),
    ({"mqtt": {"tls": {"insecure": True}}}, ["mqtt.tls.insecure"]),
    ({"commands": {"hmac_secret_env": "EDGE_TEST_OTHER"}}, ["commands.hmac_secret_env"]),
    ({"commands": None}, ["commands.hmac_secret_env"]),  # deleting the section would turn signing off
    ({"commands": {"enabled": False}}, ["commands.enabled"]),
    ({"device_id": "gw-2"}, ["device_id"]),
    ({"http": {"listen": "0.0.0.0:9108"}}, ["http.listen"]),
    ({"outbox": {"path": "/tmp/x"}}, ["outbox.path"]),
    ({"state_dir": "/tmp/state"}, ["state_dir"]),
    ({"model": {"path": "/tmp/evil.onnx", "confidence": 0.5}}, ["model.path"]),
    ({"cameras": cameras_with(password_env="EDGE_TEST_CMD_SECRET")}, ["cameras.cam-3.password_env"]),
    ({"cameras": cameras_with(source="rtsp://10.6.6.6/s")}, ["cameras.cam-3.source"]),  # would take the password along
    ({"cameras": cameras_with(username="root")}, ["cameras.cam-3.username"]),
    ({"cameras": BASE["cameras"]}, ["cameras.cam-3.password_env", "cameras.cam-3.source", "cameras.cam-3.username"]),
    ({"cameras": cameras_with() + [{"id": "cam-9", "source": "rtsp://10.6.6.6/s", "username": "u",
                                    "password_env": "EDGE_TEST_CMD_SECRET"}]},
     ["cameras.cam-9.password_env", "cameras.cam-9.source", "cameras.cam-9.username"]),
])
def test_a_remote_patch_may_not_change_identity_endpoints_secrets_or_paths(
        guarded: LiveConfig, cfg_file: Path, patch: dict, refused: list[str]) -> None:
    before, version = cfg_file.read_bytes(), guarded.state.version
    with pytest.raises(ChangeForbidden) as e:
        guarded.apply_patch(patch, version)
    assert e.value.paths == refused
    assert cfg_file.read_bytes() == before and guarded.state.version == version
    assert not (cfg_file.parent / "agent.yaml.bak").exists()
    assert not guarded.rec.changes  # type: ignore[attr-defined]


@pytest.mark.parametrize("patch", [
    {"report": {"interval_s": 5}},
    {"log": {"level": "DEBUG"}},
    {"model": {"confidence": 0.5, "nms_iou": 0.5, "classes": ["person", "car"], "threads": 1}},
    {"cameras": cameras_with(fps=2, lines=[{"id": "door_env", "points": [[0.5, 0.0], [0.5, 1.0]]}])},
    {"cameras": [{"id": "cam_env", "source": "rtsp://10.0.0.9/s", "enabled": False}] + cameras_with()},
    {"cameras": [BASE["cameras"][0], CAM_WITH_ENV_PASSWORD]},  # removing a camera without env credentials
])
def test_a_remote_patch_may_change_cameras_report_log_and_model_knobs(guarded: LiveConfig, patch: dict) -> None:
    change = guarded.apply_patch(patch, guarded.state.version)
    assert change.changed


def test_hand_edits_are_not_restricted(guarded: LiveConfig, cfg_file: Path) -> None:
    doc = yaml.safe_load(cfg_file.read_text())
    doc["mqtt"] = {"host": "10.0.0.77"}
    doc["commands"]["hmac_secret_env"] = "EDGE_TEST_OTHER"
    cfg_file.write_text(yaml.safe_dump(doc))
    change = guarded.reload()
    assert change is not None and {"mqtt.host", "commands.hmac_secret_env"} <= set(change.changed)


def test_a_config_fetched_masked_and_sent_back_keeps_its_credentials(cfg_file: Path) -> None:
    from edge_agent.agent.liveconfig import redact

    cfg_file.write_text(yaml.safe_dump({**BASE, "cameras": [{"id": "cam-1", "source": "rtsp://admin:pw@10.0.0.1/s"}]}))
    live = LiveConfig(cfg_file)
    shown = redact(live.state.document)
    assert shown["cameras"][0]["source"] == "rtsp://***@10.0.0.1/s"
    shown["cameras"][0]["fps"] = 2
    change = live.apply_patch({"cameras": shown["cameras"]}, live.state.version)
    assert change.changed == ["cameras.cam-1.fps"]
    assert yaml.safe_load(cfg_file.read_text())["cameras"][0]["source"] == "rtsp://admin:pw@10.0.0.1/s"


def test_the_backup_keeps_the_config_files_mode(cfg_file: Path) -> None:
    cfg_file.chmod(0o600)
    backup = cfg_file.parent / "agent.yaml.bak"
    backup.write_text("old")
    backup.chmod(0o644)  # a backup from before: it must not keep a wider mode either
    live = LiveConfig(cfg_file)
    live.apply_patch({"report": {"interval_s": 5}}, live.state.version)
    assert backup.stat().st_mode & 0o777 == 0o600 and cfg_file.stat().st_mode & 0o777 == 0o600


def test_temp_files_of_a_crashed_write_are_removed_at_start(cfg_file: Path) -> None:
    stale = [cfg_file.parent / ".agent.yaml.0123456789abcdef.tmp", cfg_file.parent / ".agent.yaml.k2j4_x9q.tmp",
             cfg_file.parent / ".agent.yaml.bak.0123456789abcdef.tmp"]
    others = [cfg_file.parent / ".other.yaml.0123456789abcdef.tmp", cfg_file.parent / "notes.tmp"]
    for path in stale + others:
        path.write_text("half written")
    LiveConfig(cfg_file)
    assert [p for p in stale if p.exists()] == [] and all(p.exists() for p in others)
