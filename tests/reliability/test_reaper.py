"""The reaper re-drives jobs whose worker died (lease expired) and jobs whose message was lost (a crash
between commit and enqueue), and a re-driven job runs once, to the end, resuming what was done."""

from __future__ import annotations

import sqlite3
from datetime import timedelta

from app.db import session_scope
from app.db.base import utcnow
from app.jobs import lifecycle
from tests.support.services import Embedded
from tests.worker.conftest import service as service  # noqa: F401  (fixtures reused)
from tests.worker.conftest import submit_job as submit_job  # noqa: F401
from tests.worker.conftest import tiny_inputs as tiny_inputs  # noqa: F401
from worker.reaper import reap_once
from worker.tasks.jobs import run_distill, run_soft_label

LATER = timedelta(hours=1)


def drop_messages(svc: Embedded) -> None:
    """What a crash between commit and enqueue, or a broker that lost its queue, leaves behind."""
    with sqlite3.connect(svc.broker_file) as conn:
        conn.execute("DELETE FROM kombu_message")


def take_and_die(svc: Embedded, job_id: str, expected: str, stage: str, worker_id: str) -> None:
    """A worker claims the stage and is SIGKILLed: its lease is simply never renewed nor released."""
    with session_scope(svc.ctx.db) as session:
        assert lifecycle.claim_stage(session, job_id, expected, stage, worker_id, lease_s=30) is not None


def kinds(svc: Embedded, job_id: str) -> list[str]:
    return [e["kind"] for e in svc.http.get(f"/v1/jobs/{job_id}/events").json()["data"]]


def test_a_lost_worker_is_detected_and_the_job_resumes_to_success(service, submit_job):  # noqa: F811
    job_id = submit_job()
    run_soft_label(service.ctx, job_id)
    drop_messages(service)
    take_and_die(service, job_id, "soft_labeling", "distilling", "dead-worker")

    assert reap_once(service.ctx) == {"worker_lost": [], "requeued": []}  # the lease is still alive
    assert reap_once(service.ctx, now=utcnow() + LATER)["worker_lost"] == [job_id]
    assert service.queued_messages() == [("distill.distill", [job_id])]
    assert reap_once(service.ctx, now=utcnow() + LATER)["worker_lost"] == []  # reported once

    run_distill(service.ctx, job_id)  # the re-driven delivery
    job = service.http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job
    assert kinds(service, job_id).count("worker_lost") == 1
    assert kinds(service, job_id).count("resumed") == 1


def test_a_stage_whose_worker_dies_every_time_fails_with_worker_lost(service, submit_job):  # noqa: F811
    job_id = submit_job()  # the fixture allows 2 attempts
    drop_messages(service)
    take_and_die(service, job_id, "queued", "soft_labeling", "dead-1")  # attempt 1
    now = utcnow() + LATER
    assert reap_once(service.ctx, now=now)["worker_lost"] == [job_id]
    take_and_die(service, job_id, "soft_labeling", "soft_labeling", "dead-2")  # attempt 2 (a takeover)
    assert reap_once(service.ctx, now=now + LATER)["worker_lost"] == [job_id]

    run_soft_label(service.ctx, job_id)  # attempt 3 would pass max_attempts
    job = service.http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost", job
    assert "lost 2 times" in job["error"]["message"]
    assert kinds(service, job_id).count("worker_lost") == 2
    assert reap_once(service.ctx, now=now + 2 * LATER) == {"worker_lost": [], "requeued": []}


def test_a_job_committed_but_never_enqueued_is_requeued_and_runs_once(service, submit_job):  # noqa: F811
    job_id = submit_job(epochs=1)
    drop_messages(service)  # the API committed the row, then died before the publish
    assert reap_once(service.ctx)["requeued"] == []  # young jobs are left alone
    assert reap_once(service.ctx, now=utcnow() + LATER)["requeued"] == [job_id]
    assert service.queued_messages() == [("distill.soft_label", [job_id])]

    run_soft_label(service.ctx, job_id)
    run_soft_label(service.ctx, job_id)  # a duplicate delivery (the original message resurfacing) is a no-op
    drop_messages(service)  # and the hand-over message is lost too
    assert reap_once(service.ctx, now=utcnow() + LATER)["requeued"] == [job_id]
    assert service.queued_messages() == [("distill.distill", [job_id])]  # straight on to distill
    run_distill(service.ctx, job_id)
    run_distill(service.ctx, job_id)
    job = service.http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job
    events = service.http.get(f"/v1/jobs/{job_id}/events").json()["data"]
    assert [e["data"]["to"] for e in events if e["kind"] == "status"].count("succeeded") == 1
    assert not [e for e in events if e["kind"] == "worker_lost"]
    names = [a["name"] for a in service.http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]]
    assert len(names) == len(set(names))  # no duplicate artifacts


def test_a_job_cancelled_while_no_worker_ran_never_starts(service, submit_job):  # noqa: F811
    job_id = submit_job()
    assert service.http.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    run_soft_label(service.ctx, job_id)  # the message delivered once a worker comes back
    run_distill(service.ctx, job_id)
    assert reap_once(service.ctx, now=utcnow() + LATER) == {"worker_lost": [], "requeued": []}
    job = service.http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["timestamps"].get("soft_labeling") is None, job
    assert kinds(service, job_id) == ["status", "status"]  # queued, cancelled: nothing ran
    assert not service.ctx.work_dir(job_id).exists()
