"""Jobs: submission (validated, idempotent, enqueued after commit), reads, cancel, and the worker-facing
functions named in docs/architecture.md. Every state change goes through `_transition`, a compare-and-set
on the row that also stamps `<state>_at` and writes a `status` event.

Services flush; the caller's edge (request dependency or `app.db.session_scope`) commits.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import or_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.db.base import utcnow
from app.db.session import Database, on_commit
from app.errors import InvalidRequest
from app.files import repository as files_repository
from app.files.models import File
from app.jobs import repository
from app.jobs.exceptions import ArtifactNotFound, IdempotencyConflict, JobFinished, JobNotFound
from app.jobs.models import Artifact, Job, JobEvent
from app.jobs.schemas import JobCreate, job_out
from app.jobs.state import RUNNING, check_transition, is_terminal, timestamp_column
from app.limits import JobCaps, check_job_caps
from app.paging import split_page
from app.queue import Enqueuer
from app.webhooks import hooks as _webhook_hooks  # noqa: F401  (status events also go to the job's webhook)
from app.webhooks.receivers import url_refusal

DEFAULT_LEASE_S = 120
MAX_MESSAGE_CHARS = 4000


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
    A `webhook_url` must not point at a refused address (`app.webhooks.receivers`; loopback and private
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
    add_event(session, job.id, "status", {"from": None, "to": "queued"})
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
    event = {"by": "user", "keep_partial": keep_partial}
    values = {"keep_partial": keep_partial}
    if not _transition(session, job_id, "cancelled", values=values, event=event, clear_lease=True):
        raise JobFinished(_refresh(session, job_id).status)
    return _refresh(session, job_id)


def list_artifacts(session: Session, tenant_id: str, job_id: str) -> list[Artifact]:
    get_job(session, tenant_id, job_id)
    return repository.list_artifacts(session, job_id)


def get_artifact(session: Session, tenant_id: str, job_id: str, name: str) -> Artifact:
    get_job(session, tenant_id, job_id)
    artifact = repository.get_artifact(session, job_id, name)
    if artifact is None:
        raise ArtifactNotFound(name)
    return artifact


# ---- the state machine's one writer ---------------------------------------------------------------------


def _transition(
    session: Session,
    job_id: str,
    new: str,
    *,
    expected: str | None = None,
    values: dict[str, Any] | None = None,
    event: dict[str, Any] | None = None,
    clear_lease: bool = False,
) -> bool:
    """Move the job to `new` if the machine allows it from its current state (or only from `expected`).

    Compare-and-set on the status read just before, retried if another writer moved it in between.
    Returns False when the job is missing, terminal, or not in `expected`.
    """
    for _ in range(5):
        state = repository.current_state(session, job_id)
        if state is None:
            return False
        current = state[0]
        if (expected is not None and current != expected) or is_terminal(current):
            return False
        check_transition(current, new)
        now = utcnow()
        changes: dict[str, Any] = {
            "status": new,
            timestamp_column(new): now,
            "updated_at": now,
            **(values or {}),
        }
        if new in RUNNING:
            changes.update(stage=new, progress=0.0)
        if clear_lease:
            changes.update(lease_owner=None, lease_expires_at=None)
        if repository.update_if_status(session, job_id, current, changes):
            add_event(session, job_id, "status", {"from": current, "to": new, **(event or {})})
            return True
    return False


def _refresh(session: Session, job_id: str) -> Job:
    job = repository.get(session, job_id, fresh=True)
    if job is None:
        raise JobNotFound()
    return job


# ---- worker-facing (docs/architecture.md); each takes the task's session ----------------------------


@dataclass(frozen=True)
class JobInputs:
    teachers: list[File]
    dataset: File
    validation: File | None
    student_init: File | None


def get_job_for_worker(session: Session, job_id: str) -> Job | None:
    return repository.get(session, job_id, fresh=True)


def job_inputs(session: Session, job: Job) -> JobInputs:
    """The job's input files in slot order (rows only; `app.files.service.storage_for` finds their store)."""
    ids = [*job.teacher_file_ids, job.dataset_file_id, job.validation_file_id, job.student_init_file_id]
    files = files_repository.get_many(session, [i for i in ids if i])
    return JobInputs(
        teachers=[files[i] for i in job.teacher_file_ids],
        dataset=files[job.dataset_file_id],
        validation=files.get(job.validation_file_id) if job.validation_file_id else None,
        student_init=files.get(job.student_init_file_id) if job.student_init_file_id else None,
    )


def claim_stage(
    session: Session, job_id: str, expected: str, new: str, worker_id: str, *, lease_s: int = DEFAULT_LEASE_S
) -> Job | None:
    """Compare-and-set `expected -> new` and take the lease; None if another delivery got there first.

    `expected == new` (a running stage) takes over a stage whose lease expired or that this worker
    already holds: a retry after a lost worker. It counts an attempt and writes a `resumed` event.
    """
    now = utcnow()
    lease = {
        "lease_owner": worker_id,
        "lease_expires_at": now + timedelta(seconds=lease_s),
        "updated_at": now,
    }
    if expected == new:
        if new not in RUNNING:
            raise ValueError(f"only a running stage can be resumed, not {new!r}")
        free = or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now, Job.lease_owner == worker_id)
        if not repository.update_if_status(
            session, job_id, expected, {**lease, "attempts": Job.attempts + 1}, free
        ):
            return None
        job = _refresh(session, job_id)
        add_event(session, job_id, "resumed", {"stage": new, "worker_id": worker_id, "attempt": job.attempts})
        return job
    check_transition(expected, new)
    if new not in RUNNING:
        raise ValueError(f"claim_stage enters running stages only, not {new!r}; use finish_job / fail_job")
    if expected == "queued":
        lease["attempts"] = Job.attempts + 1
    if not _transition(session, job_id, new, expected=expected, values=lease, event={"worker_id": worker_id}):
        return None
    return _refresh(session, job_id)


def renew_lease(session: Session, job_id: str, worker_id: str, *, lease_s: int = DEFAULT_LEASE_S) -> bool:
    """Heartbeat: extend the lease while this worker still holds a running job. False: stop working."""
    state = repository.current_state(session, job_id)
    if state is None or state[0] not in RUNNING:
        return False
    now = utcnow()
    return repository.update_if_status(
        session,
        job_id,
        state[0],
        {"lease_expires_at": now + timedelta(seconds=lease_s)},
        Job.lease_owner == worker_id,
    )


def record_progress(
    session: Session, job_id: str, progress: float, epoch: int | None, metrics: dict[str, Any] | None
) -> bool:
    """Store the latest progress (0..1), epoch and metrics; returns False once the job is no longer running
    (cancelled, failed), which tells the worker to stop. A new epoch number also writes an `epoch` event."""
    state = repository.current_state(session, job_id)
    if state is None or state[0] not in RUNNING:
        return False
    status, last_epoch, last_phase = state
    clean_metrics = _json_safe(metrics or {})
    progress = min(1.0, max(0.0, progress)) if math.isfinite(progress) else 0.0
    changes: dict[str, Any] = {"progress": progress, "epoch": epoch, "updated_at": utcnow()}
    if metrics is not None:
        changes["metrics"] = clean_metrics
    if not repository.update_if_status(session, job_id, status, changes):
        return False
    # The distill stage trains up to three models in turn, each counting epochs from 1: an epoch is new when
    # its number or its phase is, and the event names the phase so "epoch 1" is never ambiguous.
    phase = clean_metrics.get("phase") if isinstance(clean_metrics.get("phase"), str) else None
    if epoch is not None and (epoch != last_epoch or phase != last_phase):
        named = {"stage": status, **({"phase": phase} if phase else {}), "epoch": epoch}
        add_event(session, job_id, "epoch", {**named, "metrics": clean_metrics})
    return True


def add_event(session: Session, job_id: str, kind: str, data: dict[str, Any]) -> JobEvent:
    seq = repository.next_event_seq(session, job_id)
    if seq is None:
        raise JobNotFound()
    event = JobEvent(job_id=job_id, seq=seq, kind=kind, data=_json_safe(data))
    session.add(event)
    session.flush()
    return event


def add_artifact(
    session: Session, job_id: str, name: str, key: str, size: int, sha256: str, content_type: str
) -> Artifact:
    """Insert or update by `(job, name)`, so a stage that runs twice does not duplicate its outputs."""
    artifact = repository.get_artifact(session, job_id, name)
    if artifact is None:
        artifact = Artifact(job_id=job_id, name=name)
        session.add(artifact)
    artifact.key, artifact.size, artifact.sha256, artifact.content_type = key, size, sha256, content_type
    session.flush()
    return artifact


def fail_job(session: Session, job_id: str, code: str, message: str) -> bool:
    """Fail from any unfinished state; False if the job had already finished (e.g. cancelled meanwhile)."""
    message = message[:MAX_MESSAGE_CHARS]
    return _transition(
        session,
        job_id,
        "failed",
        values={"error_code": code[:64], "error_message": message},
        event={"code": code, "message": message},
        clear_lease=True,
    )


def finish_job(session: Session, job_id: str, metrics: dict[str, Any] | None = None) -> bool:
    """`exporting -> succeeded`; False if the job is not exporting (cancelled, or finished twice).
    `metrics`, when given, replace the last epoch's: a finished job shows its result, not its last step."""
    values: dict[str, Any] = {"progress": 1.0}
    if metrics is not None:
        values["metrics"] = _json_safe(metrics)
    return _transition(session, job_id, "succeeded", expected="exporting", values=values, clear_lease=True)


def jobs_with_expired_lease(session: Session, now: datetime | None = None, limit: int = 100) -> list[Job]:
    """Running jobs whose worker stopped heartbeating: what a reaper re-drives or fails."""
    return repository.expired_leases(session, RUNNING, now or utcnow(), limit)


def _json_safe(value: Any) -> Any:
    """NaN and infinities are not JSON (PostgreSQL's jsonb refuses them): stored as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
