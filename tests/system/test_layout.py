"""The layout reads as the architecture and stays that way (docs/architecture.md).

Import rules (import-linter contracts in pyproject.toml), module size, the pip extras of each
side and the CLI's one-line answer when an extra is missing.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from edge_agent.cli import EXTRA_MODULES

REPO = Path(__file__).resolve().parents[2]
MAX_MODULE_LINES = 600


def test_import_rules_hold() -> None:
    """common <- vision <- agent, common <- bridge, no cycles, nothing imports cli (pyproject.toml)."""
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_no_module_is_over_600_lines() -> None:
    sizes = {p.relative_to(REPO).as_posix(): len(p.read_text().splitlines())
             for p in (REPO / "edge_agent").rglob("*.py")}
    too_big = {path: n for path, n in sorted(sizes.items()) if n > MAX_MODULE_LINES}
    assert not too_big, f"split these modules (over {MAX_MODULE_LINES} lines): {too_big}"


def _normalised(requirement: str) -> str:
    """``opencv-python-headless>=4.9`` -> ``opencv-python-headless`` (PEP 503 form)."""
    name = re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.parametrize("extra", sorted(EXTRA_MODULES))
def test_the_cli_checks_exactly_the_modules_of_each_extra(extra: str) -> None:
    """The modules cli.py looks for come from the distributions pyproject.toml lists for that extra."""
    listed = {_normalised(r) for r in tomllib.loads((REPO / "pyproject.toml").read_text())
              ["project"]["optional-dependencies"][extra]}
    providers = importlib.metadata.packages_distributions()
    checked = {_normalised(dist) for module in EXTRA_MODULES[extra] for dist in providers.get(module, [])}
    assert checked == listed


def _run_without(modules: tuple[str, ...], code: str, env: dict[str, str] | None = None
                 ) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter where ``modules`` cannot be imported (as if their extra were absent)."""
    block = "import sys\nfor m in %r: sys.modules[m] = None\n" % (modules,)
    return subprocess.run([sys.executable, "-c", block + code], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("command, extra", [
    (["bridge", "-c", "bridge.yaml"], "bridge"),
    (["run", "-c", "agent.yaml"], "agent"),
    (["outbox", "-c", "agent.yaml"], "agent"),
    (["count", "clip.avi", "--model", "m.onnx"], "agent"),
])
def test_a_command_without_its_extra_exits_2_naming_the_pip_line(command: list[str], extra: str) -> None:
    proc = _run_without(EXTRA_MODULES[extra], f"from edge_agent.cli import main; sys.exit(main({command!r}))")
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert f"pip install 'edge-agent[{extra}]'" in line and line.startswith(f"edge-agent {command[0]}:")


@pytest.mark.parametrize("side, other", [("bridge", "agent"), ("agent", "bridge")])
def test_each_side_imports_without_the_other_sides_extra(side: str, other: str) -> None:
    """A bridge host has no OpenCV and a camera host no Kafka client: each daemon still loads."""
    modules = {"bridge": ["edge_agent.bridge.daemon", "edge_agent.bridge.api"],
               "agent": ["edge_agent.agent.daemon", "edge_agent.vision.offline"]}[side]
    proc = _run_without(EXTRA_MODULES[other], "".join(f"import {m}\n" for m in modules))
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("example, secrets", [("examples/agent.yaml", "systemd/agent.env.example"),
                                              ("systemd/bridge.yaml.example", "systemd/bridge.env.example")])
def test_check_config_runs_with_the_base_dependencies_only(example: str, secrets: str) -> None:
    proc = _run_without((*EXTRA_MODULES["agent"], *EXTRA_MODULES["bridge"]),
                        "from edge_agent.cli import main\n"
                        f"sys.exit(main(['check-config', '-c', {example!r}, '--env-file', {secrets!r}, "
                        "'--skip-files']))")
    assert proc.returncode == 0 and "valid" in proc.stdout, proc.stderr


def test_scripts_and_tests_reach_the_test_kit_without_sys_path_edits() -> None:
    offenders = [p.relative_to(REPO).as_posix()
                 for p in [*(REPO / "scripts").glob("*.py"), *(REPO / "tests").rglob("*.py")]
                 if re.search(r"sys\.path\s*(\.insert|\.append|\[|\+=)", p.read_text())]
    assert offenders == []
