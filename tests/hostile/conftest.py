"""The hostile suite drives the real API and runs the real tasks in-process (the embedded service of
tests/worker), so a refused input is shown the way a user meets it: a 4xx, or a failed job with a code."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.api import create_job, get_job, tiny_job, upload, upload_inputs
from tests.support.services import Embedded
from tests.worker.conftest import service as service  # noqa: F401  (fixture reused)
from tests.worker.conftest import tiny_inputs as tiny_inputs  # noqa: F401
from worker.tasks.jobs import run_soft_label

PREFLIGHT_DEADLINE_S = 30.0  # generous on 2 shared cores; a healthy preflight takes a few seconds


def run_until_verdict(
    svc: Embedded,
    teacher: tuple[str, bytes],
    dataset: tuple[str, bytes],
    *,
    student_init: tuple[str, bytes] | None = None,
    **config: Any,
) -> tuple[dict[str, Any], float]:
    """Upload, submit a one-epoch job (`config` added), run the soft-label task once (preflight comes
    first); the job and the seconds taken."""
    teacher_id, dataset_id = upload_inputs(svc.http, teacher, dataset)
    fields = tiny_job(1, **config)
    if student_init is not None:
        fields["student_init_file_id"] = upload(svc.http, "student_init", student_init)["id"]
    job_id = create_job(svc.http, teacher_id, dataset_id, **fields)
    started = time.monotonic()
    run_soft_label(svc.ctx, job_id)
    elapsed = time.monotonic() - started
    return get_job(svc.http, job_id), elapsed


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
