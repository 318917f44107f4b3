"""The hostile suite drives the real API and runs the real tasks in-process (the embedded service of
tests/worker), so a refused input is shown the way a user meets it: a 4xx, or a failed job with a code."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.worker.conftest import Service
from tests.worker.conftest import service as service  # noqa: F401  (fixture reused)
from tests.worker.conftest import tiny_inputs as tiny_inputs  # noqa: F401
from worker.tasks.jobs import run_soft_label

JOB_CONFIG = {
    "epochs": 1,
    "method": "hinton",
    "temperature": 2.0,
    "alpha": 0.5,
    "baseline": False,
    "export_formats": ["torchscript"],
}
PREFLIGHT_DEADLINE_S = 30.0  # generous on 2 shared cores; a healthy preflight takes a few seconds


def upload(svc: Service, purpose: str, name: str, data: bytes) -> str:
    r = svc.http.post("/v1/files", data={"purpose": purpose}, files={"file": (name, data)})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def run_until_verdict(
    svc: Service,
    teacher: tuple[str, bytes],
    dataset: tuple[str, bytes],
    *,
    student_init: tuple[str, bytes] | None = None,
    **config: Any,
) -> tuple[dict[str, Any], float]:
    """Upload, submit, run the soft-label task once (preflight comes first); the job and the seconds taken."""
    body: dict[str, Any] = {
        "teacher_file_ids": [upload(svc, "teacher", *teacher)],
        "dataset_file_id": upload(svc, "dataset", *dataset),
        "student": "mlp:hidden=8",
        "config": {**JOB_CONFIG, **config},
    }
    if student_init is not None:
        body["student_init_file_id"] = upload(svc, "student_init", *student_init)
    r = svc.http.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    started = time.monotonic()
    run_soft_label(svc.ctx, job_id)
    elapsed = time.monotonic() - started
    return svc.http.get(f"/v1/jobs/{job_id}").json(), elapsed


def assert_failed_fast(job: dict[str, Any], elapsed: float, code: str) -> None:
    assert job["status"] == "failed", job
    assert job["error"]["code"] == code, job["error"]
    assert len(job["error"]["message"]) > 20  # a sentence a user can act on, not a bare code
    assert elapsed < PREFLIGHT_DEADLINE_S, f"refusal took {elapsed:.1f} s"


@pytest.fixture
def teacher_bytes(tiny_inputs: tuple[Path, Path]) -> tuple[str, bytes]:  # noqa: F811
    return ("teacher.pt", tiny_inputs[0].read_bytes())


@pytest.fixture
def dataset_bytes(tiny_inputs: tuple[Path, Path]) -> tuple[str, bytes]:  # noqa: F811
    return ("train.npz", tiny_inputs[1].read_bytes())
