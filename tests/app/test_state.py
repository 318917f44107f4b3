"""The state machine and the worker-facing service functions, driven the way `worker/tasks` calls them:
a session per step, committed by `session_scope`."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.db.base import utcnow
from app.db.session import Database, session_scope
from app.jobs import lifecycle, service
from app.jobs.models import Job
from app.jobs.state import (
    PIPELINE,
    RUNNING,
    STATES,
    TERMINAL,
    InvalidTransition,
    can_transition,
    check_transition,
)
from tests.app.conftest import Tenant
from tests.support.api import inputs, job_body


def test_transition_table() -> None:
    for src, dst in zip(PIPELINE, PIPELINE[1:], strict=False):
        assert can_transition(src, dst)
    for state in STATES:
        for end in ("failed", "cancelled"):
            assert can_transition(state, end) == (state not in TERMINAL)
        for terminal in TERMINAL:
            assert not can_transition(terminal, state)
    assert not can_transition("queued", "distilling")  # no skipping stages
    assert not can_transition("distilling", "soft_labeling")  # no going back
    with pytest.raises(InvalidTransition):
        check_transition("succeeded", "queued")


@pytest.fixture
def job_id(client: TestClient, alice: Tenant) -> str:
    teacher, dataset = inputs(client, alice.headers)
    return client.post("/v1/jobs", headers=alice.headers, json=job_body(teacher, dataset)).json()["id"]


def test_a_job_runs_through_every_stage_with_timestamps_events_and_artifacts(
    client: TestClient, alice: Tenant, db: Database, job_id: str
) -> None:
    previous = "queued"
    for stage in RUNNING:
        with session_scope(db) as session:
            job = lifecycle.claim_stage(session, job_id, previous, stage, "worker-1")
            assert job is not None and job.status == stage and job.lease_owner == "worker-1"
        previous = stage
        if stage == "distilling":
            for epoch in (1, 1, 2):  # the same epoch reported twice writes one epoch event
                with session_scope(db) as session:
                    assert lifecycle.record_progress(
                        session, job_id, epoch / 2, epoch, {"val_acc": 0.5 + epoch / 10, "loss": float("nan")}
                    )
            assert client.get(f"/v1/jobs/{job_id}", headers=alice.headers).json()["epoch"] == 2
    with session_scope(db) as session:
        lifecycle.add_artifact(session, job_id, "report.json", "k1", 10, "a" * 64, "application/json")
        # the same artifact again, as a rerun of the stage writes it
        lifecycle.add_artifact(session, job_id, "report.json", "k2", 12, "b" * 64, "application/json")
        assert lifecycle.finish_job(session, job_id)
    job = client.get(f"/v1/jobs/{job_id}", headers=alice.headers).json()
    assert job["status"] == "succeeded" and job["progress"] == 1.0 and job["attempts"] == 1
    assert list(job["timestamps"]) == list(PIPELINE)
    stamps = [job["timestamps"][s] for s in PIPELINE]
    assert stamps == sorted(stamps)
    assert job["metrics"] == {"val_acc": 0.7, "loss": None}  # NaN is not JSON: stored as null
    events = client.get(f"/v1/jobs/{job_id}/events", headers=alice.headers).json()["data"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["data"]["to"] for e in events if e["kind"] == "status"] == list(PIPELINE)
    assert [e["data"]["epoch"] for e in events if e["kind"] == "epoch"] == [1, 2]
    artifacts = client.get(f"/v1/jobs/{job_id}/artifacts", headers=alice.headers).json()["data"]
    assert artifacts == [
        {"name": "report.json", "size": 12, "sha256": "b" * 64, "content_type": "application/json"}
    ]


def test_each_phase_numbers_its_epochs_and_every_epoch_event_names_its_phase(
    client: TestClient, alice: Tenant, db: Database, job_id: str
) -> None:
    previous = "queued"
    for stage in ("soft_labeling", "distilling"):
        with session_scope(db) as session:
            lifecycle.claim_stage(session, job_id, previous, stage, "worker-1")
        previous = stage
    # Distillation ends at epoch 1, then fine-tuning and the baseline each count from 1 again; a resumed
    # stage reports the baseline's epoch 1 a second time.
    for phase, epoch in (("distill", 1), ("finetune", 1), ("baseline", 1), ("baseline", 1), ("baseline", 2)):
        with session_scope(db) as session:
            assert lifecycle.record_progress(session, job_id, 0.5, epoch, {"phase": phase, "loss": 1.0})
    events = client.get(f"/v1/jobs/{job_id}/events", headers=alice.headers).json()["data"]
    epochs = [(e["data"]["phase"], e["data"]["epoch"]) for e in events if e["kind"] == "epoch"]
    assert epochs == [("distill", 1), ("finetune", 1), ("baseline", 1), ("baseline", 2)]


def test_claim_stage_is_compare_and_set(db: Database, job_id: str) -> None:
    with session_scope(db) as session:
        assert lifecycle.claim_stage(session, job_id, "queued", "soft_labeling", "worker-1") is not None
    with session_scope(db) as session:  # a second delivery of the same task: a cheap no-op
        assert lifecycle.claim_stage(session, job_id, "queued", "soft_labeling", "worker-2") is None
    with session_scope(db) as session:  # the stage is leased: another worker cannot take it over
        assert lifecycle.claim_stage(session, job_id, "soft_labeling", "soft_labeling", "worker-2") is None
    with pytest.raises(InvalidTransition), session_scope(db) as session:
        lifecycle.claim_stage(session, job_id, "soft_labeling", "exporting", "worker-1")


def test_an_expired_lease_is_taken_over_and_counted_as_an_attempt(db: Database, job_id: str) -> None:
    with session_scope(db) as session:
        lifecycle.claim_stage(session, job_id, "queued", "soft_labeling", "worker-1")
        assert lifecycle.renew_lease(session, job_id, "worker-1")
        assert not lifecycle.renew_lease(session, job_id, "worker-2")
    with session_scope(db) as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
        assert [j.id for j in lifecycle.jobs_with_expired_lease(session)] == [job_id]
    with session_scope(db) as session:
        job = lifecycle.claim_stage(session, job_id, "soft_labeling", "soft_labeling", "worker-2")
        assert job is not None and job.attempts == 2 and job.lease_owner == "worker-2"
        events = service.list_events(session, job.tenant_id, job_id, after=0, limit=100)
        assert events[-1].kind == "resumed" and events[-1].data == {
            "stage": "soft_labeling",
            "worker_id": "worker-2",
            "attempt": 2,
        }


def test_cancel_stops_the_worker_at_its_next_report(
    client: TestClient, alice: Tenant, db: Database, job_id: str
) -> None:
    with session_scope(db) as session:
        lifecycle.claim_stage(session, job_id, "queued", "soft_labeling", "worker-1")
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=alice.headers).json()["status"] == "cancelled"
    with session_scope(db) as session:
        assert not lifecycle.record_progress(session, job_id, 0.5, None, {})
        assert lifecycle.claim_stage(session, job_id, "soft_labeling", "distilling", "worker-1") is None
        assert not lifecycle.fail_job(session, job_id, "worker_lost", "too late")
        assert not lifecycle.finish_job(session, job_id)
    job = client.get(f"/v1/jobs/{job_id}", headers=alice.headers).json()
    assert job["status"] == "cancelled" and job["stage"] == "soft_labeling" and job["error"] is None


def test_fail_job_records_a_stable_code_and_message(
    client: TestClient, alice: Tenant, db: Database, job_id: str
) -> None:
    with session_scope(db) as session:
        lifecycle.claim_stage(session, job_id, "queued", "soft_labeling", "worker-1")
        assert lifecycle.fail_job(session, job_id, "invalid_teacher", "teacher.pt is not a model")
    job = client.get(f"/v1/jobs/{job_id}", headers=alice.headers).json()
    assert job["status"] == "failed" and job["error"] == {
        "code": "invalid_teacher",
        "message": "teacher.pt is not a model",
    }
    last = client.get(f"/v1/jobs/{job_id}/events", headers=alice.headers).json()["data"][-1]
    assert last["data"] == {
        "from": "soft_labeling",
        "to": "failed",
        "code": "invalid_teacher",
        "message": "teacher.pt is not a model",
    }


def test_job_inputs_resolve_the_files_in_slot_order(db: Database, client: TestClient, alice: Tenant) -> None:
    teacher, dataset = inputs(client, alice.headers)
    job_id = client.post(
        "/v1/jobs", headers=alice.headers, json=job_body(teacher, dataset, validation_file_id=dataset)
    ).json()["id"]
    with session_scope(db) as session:
        job = lifecycle.get_job_for_worker(session, job_id)
        assert job is not None
        found = lifecycle.job_inputs(session, job)
        assert [f.id for f in found.teachers] == [teacher] and found.dataset.id == dataset
        assert found.validation is not None and found.student_init is None
        assert found.dataset.key.startswith(f"tenants/{job.tenant_id}/files/")
