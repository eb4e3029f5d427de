"""atomic_write: all or nothing, the file's mode kept, and no temp file of a crashed write left for good."""

from __future__ import annotations

from pathlib import Path

from edge_agent.common.files import atomic_write, remove_stale_temps


def test_a_write_replaces_the_file_keeping_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("old")
    path.chmod(0o600)
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new" and path.stat().st_mode & 0o777 == 0o600
    atomic_write(path, b"newer", mode=0o640)
    assert path.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temp file left


def test_the_first_write_of_a_path_removes_what_a_crashed_one_left(tmp_path: Path) -> None:
    path = tmp_path / "counts.json"
    crashed = tmp_path / ".counts.json.00112233aabbccdd.tmp"
    sibling = tmp_path / ".counts.json.bak.00112233aabbccdd.tmp"  # another file's: not ours to remove
    crashed.write_text("half")
    sibling.write_text("half")
    atomic_write(path, b"{}")
    assert not crashed.exists() and sibling.exists()


def test_remove_stale_temps_names_what_it_removed(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    left = tmp_path / ".agent.yaml.abcdefgh.tmp"  # the mkstemp name of earlier versions
    left.write_text("x")
    assert remove_stale_temps(path) == [left.absolute()]
    assert remove_stale_temps(tmp_path / "missing-dir" / "x") == []
