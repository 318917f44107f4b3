"""The core's layering contracts (pyproject.toml, ids `distill-*`) hold, and break on a reinstated circle.

Runs import-linter over a copy of worker/distill, so the circle can be put back without touching the tree.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT = "from importlinter.cli import lint_imports_command; lint_imports_command()"
# The circle issue 14 removed: the student init asked teachers.py for format detection.
CIRCLE = (
    "\n\ndef _reinstated() -> None:\n    from worker.distill.teachers import detect_format  # noqa: F401\n"
)


def _copy_core(tmp_path: Path) -> Path:
    """worker/distill alone under tmp_path, with a config holding only the core's own contracts."""
    (tmp_path / "worker").mkdir()
    shutil.copy(ROOT / "worker" / "__init__.py", tmp_path / "worker" / "__init__.py")
    shutil.copytree(
        ROOT / "worker" / "distill",
        tmp_path / "worker" / "distill",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    contracts = [c for c in settings["contracts"] if c.get("id", "").startswith("distill-")]
    assert {c["id"] for c in contracts} == {"distill-layers", "distill-acyclic"}
    # TOML is a superset of JSON for these values (strings, lists, booleans), so json.dumps writes valid TOML.
    lines = ["[tool.importlinter]", 'root_packages = ["worker"]']
    for contract in contracts:
        lines.append("[[tool.importlinter.contracts]]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in contract.items()]
    (tmp_path / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return tmp_path


def _lint(folder: Path) -> subprocess.CompletedProcess[str]:
    # cwd first on sys.path, so grimp reads the copy rather than the editable install's tree
    return subprocess.run(
        [sys.executable, "-c", LINT, "--no-cache"], cwd=folder, capture_output=True, text=True, timeout=120
    )


def test_core_layers_hold_on_the_real_tree(tmp_path: Path) -> None:
    result = _lint(_copy_core(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("KEPT") == 2


def test_a_reinstated_students_teachers_circle_breaks_both_contracts(tmp_path: Path) -> None:
    folder = _copy_core(tmp_path)
    students = folder / "worker" / "distill" / "students.py"
    students.write_text(students.read_text() + CIRCLE)
    result = _lint(folder)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.count("BROKEN") == 2
    assert "worker.distill.students -> worker.distill.teachers" in result.stdout
