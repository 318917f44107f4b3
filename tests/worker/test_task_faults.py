"""A stage killed (as by the OOM killer) costs one attempt; cancel stops a running stage in seconds."""

from __future__ import annotations

import os
import signal
import time

from tests.support.api import submit, tiny_job
from tests.support.data import write_inputs
from tests.support.processes import run_in_thread, stage_child
from worker.tasks.jobs import run_distill, run_soft_label


def kill_stage(task, service, job_id: str) -> None:  # type: ignore[no-untyped-def]
    thread = run_in_thread(task, service.ctx, job_id)
    os.kill(stage_child().pid, signal.SIGKILL)
    thread.join(60)
    assert not thread.is_alive()


def test_a_killed_stage_is_retried_and_the_next_attempt_succeeds(service, submit_job):
    job_id = submit_job()
    kill_stage(run_soft_label, service, job_id)

    job = service.http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "soft_labeling"  # not failed: one attempt is gone, the job is not
    events = service.http.get(f"/v1/jobs/{job_id}/events").json()["data"]
    failed = [e["data"] for e in events if e["kind"] == "attempt_failed"]
    assert [(f["code"], f["attempt"]) for f in failed] == [("stage_killed", 1)]
    assert "out-of-memory" in failed[0]["message"]
    assert (
        service.queued_messages().count(("distill.soft_label", [job_id])) == 2
    )  # the retry, after a back-off

    run_soft_label(service.ctx, job_id)  # the retry's delivery takes the stage over and finishes it
    job = service.http.get(f"/v1/jobs/{job_id}").json()
    assert (job["status"], job["progress"]) == ("soft_labeling", 1.0)
    kinds = [e["kind"] for e in service.http.get(f"/v1/jobs/{job_id}/events").json()["data"]]
    assert kinds.count("resumed") == 1
    assert ("distill.distill", [job_id]) in service.queued_messages()


def test_a_stage_that_dies_every_time_fails_the_job_after_max_attempts(service, submit_job):
    job_id = submit_job()  # the fixture's settings allow 2 attempts
    kill_stage(run_soft_label, service, job_id)
    kill_stage(run_soft_label, service, job_id)
    job = service.http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "stage_killed" and "attempt 2 of 2" in job["error"]["message"]


def cancel_mid_stage(service, task, job_id: str, running, what: str) -> dict:  # type: ignore[no-untyped-def]
    """Run `task` in a thread; once `running(job)` holds, cancel over HTTP. The stage (thread and child) must
    stop within 10 s; returns the job as the API then shows it."""
    thread = run_in_thread(task, service.ctx, job_id)
    child = stage_child()
    deadline = time.monotonic() + 60
    while not running(service.http.get(f"/v1/jobs/{job_id}").json()):
        assert time.monotonic() < deadline, f"{what} never reported progress"
        time.sleep(0.05)
    cancelled_at = time.monotonic()
    assert service.http.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    thread.join(30)
    assert not thread.is_alive() and not child.is_alive()
    assert time.monotonic() - cancelled_at < 10
    return service.http.get(f"/v1/jobs/{job_id}").json()


def test_cancel_stops_a_running_stage_within_seconds(service, submit_job):
    job_id = submit_job(epochs=2000)
    run_soft_label(service.ctx, job_id)
    job = cancel_mid_stage(service, run_distill, job_id, lambda j: (j["epoch"] or 0) >= 1, "training")
    assert job["status"] == "cancelled"
    names = {a["name"] for a in service.http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]}
    assert names == {"soft_labels_manifest.json"}  # no student from a cancelled run
    assert not service.ctx.work_dir(job_id).exists()


def test_cancel_stops_a_running_soft_label_stage_within_seconds(service, tmp_path):
    """The other long stage: the teacher mid-way through its shards (a deliberately slow TorchScript one)."""
    import numpy as np
    import torch

    class SlowTeacher(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = torch.nn.Linear(8, 256)
            self.w = torch.nn.Parameter(torch.randn(256, 256) / 16)
            self.head = torch.nn.Linear(256, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            for _ in range(2000):  # tens of milliseconds a shard of 10 rows: 120 shards take seconds
                h = torch.tanh(h @ self.w)
            return self.head(h)

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(1200, 8)).astype(np.float32), rng.integers(0, 3, 1200).astype(np.int64)
    teacher, dataset = write_inputs(tmp_path, SlowTeacher().eval(), x, y)
    job_id = submit(service.http, teacher, dataset, **tiny_job(shard_size=10))
    mid_way = lambda j: 0 < j["progress"] < 0.5  # noqa: E731 - read as "once the job is mid-way"
    job = cancel_mid_stage(service, run_soft_label, job_id, mid_way, "soft labelling")
    assert job["status"] == "cancelled" and job["timestamps"].get("distilling") is None
    assert service.http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"] == []
    assert ("distill.distill", [job_id]) not in service.queued_messages()  # never handed on
    assert not service.ctx.work_dir(job_id).exists()


def test_a_cancel_landing_while_outputs_upload_leaves_no_artifact(service, submit_job, monkeypatch):
    """The stage is done, its outputs are uploading, and the user cancels: the job stays cancelled and shows
    no artifact of that stage (recorded only in the transaction that hands the job on or finishes it)."""
    import worker.tasks.jobs as jobs

    real_upload = jobs._upload

    def cancel_then_upload(ctx, claim, name, path):  # type: ignore[no-untyped-def]
        service.http.post(f"/v1/jobs/{claim.job_id}/cancel")
        return real_upload(ctx, claim, name, path)

    job_id = submit_job()
    monkeypatch.setattr(jobs, "_upload", cancel_then_upload)
    run_soft_label(service.ctx, job_id)  # the manifest uploads after the cancel
    assert service.http.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
    assert service.http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"] == []
    assert ("distill.distill", [job_id]) not in service.queued_messages()
    assert not service.ctx.work_dir(job_id).exists()

    other = submit_job()
    monkeypatch.setattr(jobs, "_upload", real_upload)
    run_soft_label(service.ctx, other)
    monkeypatch.setattr(jobs, "_upload", cancel_then_upload)
    run_distill(service.ctx, other)  # the student uploads after the cancel
    assert service.http.get(f"/v1/jobs/{other}").json()["status"] == "cancelled"
    names = {a["name"] for a in service.http.get(f"/v1/jobs/{other}/artifacts").json()["data"]}
    assert names == {"soft_labels_manifest.json"}  # the earlier stage's, nothing of the cancelled one
    assert not service.ctx.work_dir(other).exists()
