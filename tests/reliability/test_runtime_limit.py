"""A job past its `max_runtime_s` is stopped through the train loop's `stop` hook, fails with `timeout` and
keeps its last student checkpoint; a cancel with `keep_partial=true` keeps it too."""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support import api
from tests.support.api import tiny_job
from tests.support.processes import run_in_thread, stage_child
from tests.support.services import Embedded
from tests.worker.conftest import service as service  # noqa: F401  (fixtures reused)
from tests.worker.conftest import tiny_inputs as tiny_inputs  # noqa: F401
from worker.distill.students import build_student
from worker.tasks.jobs import run_distill, run_soft_label

pytestmark = pytest.mark.e2e
torch.set_num_threads(1)


def endless_job(svc: Embedded, inputs: tuple[Path, Path], **fields: object) -> str:
    """A job of far more epochs than the test waits for: only a stop ends it."""
    return api.submit(svc.http, *inputs, **tiny_job(5000), **fields)


def partial_student_accuracy(svc: Embedded, job_id: str, dataset: Path) -> float:
    r = svc.http.get(f"/v1/jobs/{job_id}/artifacts/partial_student.pt")
    assert r.status_code == 200
    student = build_student("mlp:hidden=8", (8,), 3)
    student.load_state_dict(torch.load(io.BytesIO(r.content), weights_only=True))
    data = np.load(dataset)
    with torch.no_grad():
        predicted = student(torch.from_numpy(data["x"])).argmax(-1).numpy()
    return float((predicted == data["y"]).mean())


def test_max_runtime_s_is_part_of_the_job_and_validated(service, tiny_inputs):  # noqa: F811
    job_id = endless_job(service, tiny_inputs, max_runtime_s=3600)
    assert service.http.get(f"/v1/jobs/{job_id}").json()["max_runtime_s"] == 3600
    body = {"teacher_file_ids": ["f"], "dataset_file_id": "d", "max_runtime_s": 0}
    r = service.http.post("/v1/jobs", json=body)
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")


def stopped_with_exit_status(caplog: pytest.LogCaptureFixture, job_id: str) -> list[int | None]:
    """The child exit statuses the worker logged for this job's stopped stages."""
    return [
        r.args[-1]  # type: ignore[index]
        for r in caplog.records
        if r.getMessage().startswith(f"job {job_id}: stage") and "stopped" in r.getMessage()
    ]


def test_a_job_past_its_max_runtime_fails_with_timeout_and_keeps_the_student(service, tiny_inputs, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, logger="worker.tasks.jobs")
    job_id = endless_job(service, tiny_inputs, max_runtime_s=25)
    run_soft_label(service.ctx, job_id)
    started = time.monotonic()
    thread = run_in_thread(run_distill, service.ctx, job_id)
    child = stage_child()
    thread.join(60)
    assert not thread.is_alive() and not child.is_alive()
    assert time.monotonic() - started < 45
    # Exit status 0: the child left through the train loop's stop hook, not by dying from the signal.
    assert stopped_with_exit_status(caplog, job_id) == [0]

    job = service.http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "timeout", job
    assert "max_runtime_s of 25 s" in job["error"]["message"]
    assert job["epoch"] >= 1
    assert api.artifact_names(service.http, job_id) == {"soft_labels_manifest.json", "partial_student.pt"}
    assert partial_student_accuracy(service, job_id, tiny_inputs[1]) > 0.8  # trained weights, not an init
    assert not service.ctx.work_dir(job_id).exists()


def test_cancel_with_keep_partial_keeps_the_last_student_checkpoint(service, tiny_inputs, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, logger="worker.tasks.jobs")
    job_id = endless_job(service, tiny_inputs)
    run_soft_label(service.ctx, job_id)
    thread = run_in_thread(run_distill, service.ctx, job_id)
    child = stage_child()
    api.wait_for_epoch(service.http, job_id, 5)
    r = service.http.post(f"/v1/jobs/{job_id}/cancel", params={"keep_partial": "true"})
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    thread.join(60)
    assert not thread.is_alive() and not child.is_alive()
    assert stopped_with_exit_status(caplog, job_id) == [0]

    assert service.http.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
    assert api.artifact_names(service.http, job_id) == {"soft_labels_manifest.json", "partial_student.pt"}
    assert partial_student_accuracy(service, job_id, tiny_inputs[1]) > 0.6  # chance is 1/3
    assert not service.ctx.work_dir(job_id).exists()
