"""The import directions in STYLE.md, checked by import-linter over the real source tree."""

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
