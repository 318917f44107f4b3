"""`distill admin create-key` / `revoke-key`, run as an operator would, and the key used on the API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app

ROOT = Path(__file__).resolve().parents[2]


def distill(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_")} | {"PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_a_created_key_opens_the_api_and_a_revoked_one_no_longer_does(tmp_path: Path):
    created = distill("admin", "create-key", "--tenant", "acme", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("dsk_") and len(key) > 40

    settings = Settings(database_url=f"sqlite:///{tmp_path / '.distill' / 'distill.db'}",
                        storage_path=tmp_path / "objects", key_cache_ttl_s=0)  # fmt: skip
    with TestClient(create_app(settings)) as http:
        assert http.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert distill("admin", "revoke-key", key, cwd=tmp_path).stdout.strip() == "revoked"
        assert http.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    again = distill("admin", "revoke-key", key, cwd=tmp_path)
    assert again.returncode == 1 and "no such active key" in again.stderr


def test_unknown_queues_are_refused_before_a_worker_starts(tmp_path: Path):
    result = distill("worker", "--queues", "soft_label,training", cwd=tmp_path)
    assert result.returncode == 2 and "unknown queue" in result.stderr
