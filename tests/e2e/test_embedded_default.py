"""`distill serve` on a bare folder: SQLite, a local object folder and the serverless broker, one command."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

from tests.support.processes import child_env, distill, free_port, serving

pytestmark = pytest.mark.e2e


def test_distill_serve_runs_a_job_end_to_end_with_no_other_server(
    tmp_path: Path, problem, job_runner, evaluate_students
):
    port = free_port()
    cmd = distill("serve", "--port", str(port))
    with serving(cmd, cwd=tmp_path, env=child_env(), port=port, log=tmp_path / "serve.log") as server:
        key_file = tmp_path / ".distill" / "api_key"
        assert key_file.stat().st_mode & 0o077 == 0  # readable by its owner only
        assert str(key_file) in (tmp_path / "serve.log").read_text()  # it says where the key is
        headers = {"Authorization": f"Bearer {key_file.read_text().strip()}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30) as http:
            assert http.get("/readyz").status_code == 200
            result = job_runner(http, problem, tmp_path)
    assert server.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]

    data = tmp_path / ".distill"
    assert (data / "distill.db").is_file() and (data / "broker.sqlite").is_file()
    assert any((data / "objects").rglob("student.onnx"))
    assert result["statuses"][-1] == "succeeded"
    accuracies = evaluate_students(tmp_path, problem)
    assert accuracies["torchscript"] > 0.8 and accuracies["onnx"] > 0.8, accuracies


def test_a_second_start_reuses_the_database_and_the_key(tmp_path: Path):
    import subprocess

    # Migrations and the key happen before the servers start: `--help`-cheap checks need no port.
    code = "from worker.commands.serve import migrate, ensure_local_key; migrate(); print(ensure_local_key())"
    first = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    second = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert first.endswith("True)\n") and second.endswith("False)\n")
    assert first.split(",")[0] == second.split(",")[0]  # the same key
