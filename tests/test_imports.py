"""The import directions in STYLE.md, checked by import-linter over the real source tree."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "KEPT" in result.stdout and "BROKEN" not in result.stdout


def test_api_package_loads_without_torch() -> None:
    # The API image has no torch: importing the app must not pull it in.
    code = "import sys, app.main; assert 'torch' not in sys.modules, 'app imported torch'"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_worker_task_process_loads_without_torch() -> None:
    # The Celery task process supervises; only the stage's spawned child loads the PyTorch core.
    code = "import sys, worker.tasks.jobs; assert 'torch' not in sys.modules, 'task process imported torch'"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _lint_copy_with(tmp_path: Path, module: str, line: str) -> str:
    """import-linter over a copy of the tree in which `module` (a path under it) gained `line`."""
    for part in ("app", "worker"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with (tmp_path / module).open("a") as fh:
        fh.write(f"\n{line}\n")
    result = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0, result.stdout
    return result.stdout


def test_reinstating_the_webhook_circle_breaks_a_contract(tmp_path: Path) -> None:
    out = _lint_copy_with(tmp_path, "app/jobs/service.py", "from app.webhooks import hooks  # noqa: F401")
    assert "the jobs package never imports webhook delivery BROKEN" in out


def test_reinstating_the_core_circle_breaks_a_contract(tmp_path: Path) -> None:
    circle = "from worker.distill import teachers  # noqa: F401"
    out = _lint_copy_with(tmp_path, "worker/distill/students.py", circle)
    assert "no import circle among the PyTorch core's modules BROKEN" in out
