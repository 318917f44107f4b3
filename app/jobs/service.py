"""Jobs as the HTTP API serves them: submission (validated, idempotent, enqueued after commit), reads,
cancel. Every move of a job (the API's cancel included) and everything a worker does to one is
`app.jobs.lifecycle`'s.

Services flush; the caller's edge (request dependency or `app.db.session_scope`) commits.
"""

from __future__ import annotations

import hashlib
import json
from functools import partial
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.db.base import utcnow
from app.db.session import Database, on_commit
from app.errors import InvalidRequest
from app.files import repository as files_repository
from app.jobs import lifecycle, repository
from app.jobs.exceptions import ArtifactNotFound, IdempotencyConflict, JobFinished, JobNotFound
from app.jobs.models import Artifact, Job, JobEvent
from app.jobs.schemas import JobCreate, job_out
from app.limits import JobCaps, check_job_caps
from app.paging import split_page
from app.queue import Enqueuer
from app.receivers import url_refusal

# ---- submission and reads (the HTTP API) -------------------------------------------------------------


def create_job(
    session: Session,
    tenant_id: str,
    request: JobCreate,
    *,
    idempotency_key: str | None,
    enqueue: Enqueuer,
    max_attempts: int = 3,
    caps: JobCaps | None = None,
    private_webhooks: bool = False,
) -> tuple[Job, bool]:
    """Validate and insert a queued job; returns `(job, created)`. The enqueue hook runs after commit.
    A `webhook_url` must not point at a refused address (`app.receivers`; loopback and private
    ones only with `private_webhooks`).

    With an `Idempotency-Key`, a retry with the same body returns the first job (`created=False`) and a
    different body is a 409. Two concurrent first requests race on the unique key; the loser returns the
    winner's job.
    """
    _check_webhook_url(request, private_webhooks)
    request_hash = _request_hash(request)
    if idempotency_key is not None:
        existing = repository.get_by_idempotency_key(session, tenant_id, idempotency_key)
        if existing is not None:
            return _replay(existing, request_hash), False
    _check_input_files(session, tenant_id, request)
    if caps is not None:
        check_job_caps(session, tenant_id, caps)
    now = utcnow()
    job = Job(
        tenant_id=tenant_id,
        status="queued",
        task=request.task,
        config=request.distill_config(),
        metadata_=request.metadata,
        teacher_file_ids=request.teacher_file_ids,
        dataset_file_id=request.dataset_file_id,
        validation_file_id=request.validation_file_id,
        student_init_file_id=request.student_init_file_id,
        webhook_url=None if request.webhook_url is None else str(request.webhook_url),
        metrics={},
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        max_attempts=max_attempts,
        max_runtime_s=request.max_runtime_s,
        created_at=now,
        updated_at=now,
        queued_at=now,
    )
    try:
        with session.begin_nested():
            session.add(job)
            session.flush()
    except IntegrityError:
        existing = (
            None
            if idempotency_key is None
            else repository.get_by_idempotency_key(session, tenant_id, idempotency_key)
        )
        if existing is None:
            raise
        return _replay(existing, request_hash), False
    lifecycle.record_event(session, job.id, "status", {"from": None, "to": "queued"})
    on_commit(session, partial(enqueue, job.id))
    return job, True


def _check_webhook_url(request: JobCreate, private_webhooks: bool) -> None:
    """Early and clear feedback for a URL that could never be delivered to; the dispatcher checks the
    address again on every connection, which is what stops a name that resolves elsewhere later."""
    if request.webhook_url is None:
        return
    reason = url_refusal(str(request.webhook_url), allow_private=private_webhooks)
    if reason is not None:
        raise InvalidRequest("webhook_url", reason, code="webhook_url_refused")


def _request_hash(request: JobCreate) -> str:
    canonical = json.dumps(request.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _replay(job: Job, request_hash: str) -> Job:
    if job.request_hash != request_hash:
        raise IdempotencyConflict()
    return job


def _check_input_files(session: Session, tenant_id: str, request: JobCreate) -> None:
    """Every referenced file exists for this tenant and has the purpose its slot needs; all errors at once."""
    slots: list[tuple[str, str | None, str]] = [
        *((f"teacher_file_ids.{i}", fid, "teacher") for i, fid in enumerate(request.teacher_file_ids)),
        ("dataset_file_id", request.dataset_file_id, "dataset"),
        ("validation_file_id", request.validation_file_id, "dataset"),
        ("student_init_file_id", request.student_init_file_id, "student_init"),
    ]
    found = files_repository.get_many_for_tenant(session, tenant_id, [fid for _, fid, _ in slots if fid])
    errors: list[dict[str, str]] = []
    for field, file_id, purpose in slots:
        if file_id is None:
            continue
        file = found.get(file_id)
        if file is None:
            errors.append({"field": field, "message": f"no such file {file_id!r}"})
        elif file.purpose != purpose:
            errors.append(
                {
                    "field": field,
                    "message": f"file {file_id!r} has purpose {file.purpose!r}, expected {purpose!r}",
                }
            )
    if errors:
        first, *more = errors
        raise InvalidRequest(first["field"], first["message"], code="invalid_input_file", more=more)


def get_job(session: Session, tenant_id: str, job_id: str) -> Job:
    job = repository.get_for_tenant(session, tenant_id, job_id)
    if job is None:
        raise JobNotFound()
    return job


async def job_json(db: Database, tenant_id: str, job_id: str) -> bytes:
    """`GET /v1/jobs/{id}` as JSON bytes, the path every client polls: on PostgreSQL one prepared query on
    the async read pool (no thread hop, no ORM objects); elsewhere one column query in the thread pool."""
    if db.dialect == "postgresql":
        body = await repository.get_json_for_tenant_async(db, tenant_id, job_id)
        if body is None:
            raise JobNotFound()
        return body.encode()
    row = await run_in_threadpool(_read_view, db, tenant_id, job_id)
    if row is None:
        raise JobNotFound()
    return job_out(row).model_dump_json().encode()


def _read_view(db: Database, tenant_id: str, job_id: str) -> Any:
    with db.read_factory() as session:
        return repository.get_view_for_tenant(session, tenant_id, job_id)


def list_jobs(
    session: Session, tenant_id: str, *, status: str | None, cursor: str | None, limit: int
) -> tuple[list[Job], str | None]:
    rows = repository.list_for_tenant(session, tenant_id, status=status, cursor=cursor, limit=limit)
    return split_page(rows, limit, lambda j: (j.created_at, j.id))


def list_events(session: Session, tenant_id: str, job_id: str, *, after: int, limit: int) -> list[JobEvent]:
    get_job(session, tenant_id, job_id)
    return repository.list_events(session, job_id, after=after, limit=limit)


def cancel_job(session: Session, tenant_id: str, job_id: str, *, keep_partial: bool = False) -> Job:
    """Cancel now: the row is the truth, so a worker notices at its next claim or progress report.
    `keep_partial`: the worker that stops the stage uploads the last student checkpoint first."""
    get_job(session, tenant_id, job_id)
    if not lifecycle.cancel(session, job_id, keep_partial=keep_partial):
        raise JobFinished(lifecycle.refresh(session, job_id).status)
    return lifecycle.refresh(session, job_id)


def list_artifacts(session: Session, tenant_id: str, job_id: str) -> list[Artifact]:
    get_job(session, tenant_id, job_id)
    return repository.list_artifacts(session, job_id)


def get_artifact(session: Session, tenant_id: str, job_id: str, name: str) -> Artifact:
    get_job(session, tenant_id, job_id)
    artifact = repository.get_artifact(session, job_id, name)
    if artifact is None:
        raise ArtifactNotFound(name)
    return artifact
