"""The two tasks, called as a worker calls them, on a real embedded service (SQLite, folder, broker)."""

from __future__ import annotations

import io

import torch

from tests.support.api import events, submit, tiny_job
from worker.tasks.jobs import run_distill, run_soft_label


def statuses(http, job_id: str) -> list[str]:  # type: ignore[no-untyped-def]
    events = http.get(f"/v1/jobs/{job_id}/events").json()["data"]
    return [e["data"]["to"] for e in events if e["kind"] == "status"]


def test_soft_label_hands_over_to_distill_which_publishes_the_student(service, submit_job, tiny_inputs):
    job_id = submit_job()
    assert service.queued_messages() == [("distill.soft_label", [job_id])]  # enqueued by the API after commit

    run_soft_label(service.ctx, job_id)
    job = service.http.get(f"/v1/jobs/{job_id}").json()
    assert (job["status"], job["progress"]) == ("soft_labeling", 1.0)
    assert ("distill.distill", [job_id]) in service.queued_messages()
    names = {a["name"] for a in service.http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]}
    assert names == {"soft_labels_manifest.json"}

    run_distill(service.ctx, job_id)
    job = service.http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job
    assert statuses(service.http, job_id) == [
        "queued",
        "soft_labeling",
        "distilling",
        "evaluating",
        "exporting",
        "succeeded",
    ]
    events = service.http.get(f"/v1/jobs/{job_id}/events").json()["data"]
    assert [e["data"]["epoch"] for e in events if e["kind"] == "epoch" and e["data"]["stage"] == "distilling"]
    names = {a["name"] for a in service.http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]}
    assert {"student.pt", "report.json", "model_card.json", "soft_labels_manifest.json"} <= names
    # The finished job shows its result (the report's headline), not the last epoch of the baseline run.
    report = service.http.get(f"/v1/jobs/{job_id}/artifacts/report.json").json()
    assert job["metrics"]["student_accuracy"] == report["student"]["accuracy"]
    assert job["metrics"]["baseline_accuracy"] == (report["baseline"] or {}).get("accuracy")
    assert job["metrics"]["kd_gain_points"] == report["kd_gain_points"]
    assert job["metrics"]["temperature"] == report["hyperparameters"]["temperature"]
    assert "phase" not in job["metrics"]
    student = torch.jit.load(io.BytesIO(service.http.get(f"/v1/jobs/{job_id}/artifacts/student.pt").content))
    assert student(torch.zeros(5, 8)).shape == (5, 3)
    assert not service.ctx.work_dir(job_id).exists()  # scratch is cleared once the job is done

    # A second delivery of either message, after the fact, changes nothing.
    before = service.http.get(f"/v1/jobs/{job_id}/events").json()["data"]
    run_soft_label(service.ctx, job_id)
    run_distill(service.ctx, job_id)
    assert service.http.get(f"/v1/jobs/{job_id}/events").json()["data"] == before


def test_a_delivery_while_another_worker_holds_the_job_is_a_no_op(service, submit_job):
    from dataclasses import replace

    from worker.tasks.jobs import claim_job

    job_id = submit_job()
    first = claim_job(service.ctx, job_id, ("queued", "soft_labeling"), resumable=("soft_labeling",))
    assert first is not None and first.attempts == 1
    other = replace(service.ctx, worker_id="another-worker")
    run_soft_label(other, job_id)  # the lease is live: nothing happens
    job = service.http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "soft_labeling" and job["progress"] == 0.0
    assert [e["kind"] for e in service.http.get(f"/v1/jobs/{job_id}/events").json()["data"]] == [
        "status",
        "status",
    ]


def test_a_second_job_on_the_same_files_reuses_the_stored_soft_labels(service, submit_job, tiny_inputs):
    first = submit_job()
    run_soft_label(service.ctx, first)
    shards = {p.name: p.read_bytes() for p in (service.ctx.work_dir(first) / "soft_labels").glob("*.npz")}

    # The same teacher and data uploaded again (new file ids, same bytes) and the same soft-label settings;
    # another student and method: the soft labels do not depend on them.
    second = submit(
        service.http, *tiny_inputs, **tiny_job(method="soft_target", temperature=3.0, alpha=0.7)
    )
    run_soft_label(service.ctx, second)
    job = service.http.get(f"/v1/jobs/{second}").json()
    assert (job["status"], job["progress"]) == ("soft_labeling", 1.0), job
    assert job["metrics"]["reused"] is True  # the last shard came from the first job, not from the teacher
    reused = [e["data"] for e in events(service.http, second) if e["kind"] == "soft_labels_reused"]
    assert reused and reused[0]["from_job"] == first
    again = {p.name: p.read_bytes() for p in (service.ctx.work_dir(second) / "soft_labels").glob("*.npz")}
    assert again == shards

    # Different soft-label settings never reuse them (and the donor query is scoped to the tenant).
    third = submit(service.http, *tiny_inputs, **tiny_job(shard_size=64))
    run_soft_label(service.ctx, third)
    assert not [e for e in events(service.http, third) if e["kind"] == "soft_labels_reused"]
    assert service.http.get(f"/v1/jobs/{third}").json()["metrics"]["reused"] is False
