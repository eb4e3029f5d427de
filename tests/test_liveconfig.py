"""Live config: versioned file, merge patches, atomic writes, hand edits via the file watch."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import yaml

from brokers import wait_for
from edge_agent.envelope import Draft
from edge_agent.liveconfig import (ConfigChange, ConfigRejected, LiveConfig, VersionConflict, changed_paths,
                                   version_of)

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
    ({"cameras": [{"id": "x"}]}, "cameras.0.source"),
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
