from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from typing import cast as type_cast

from sqlalchemy import (
    ARRAY,
    Connection,
    CursorResult,
    Row,
    Text,
    and_,
    bindparam,
    case,
    cast,
    func,
    literal_column,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect
from sqlalchemy.orm import Session

from app.db.aio import Lookup
from app.db.repository import keyset_page
from app.db.session import Database
from app.jobs.models import Artifact, Job, JobEvent, JobShard
from app.jobs.schemas import JobOut
from app.jobs.state import STATES, TIMESTAMP_STATES


def get_for_tenant(session: Session, tenant_id: str, job_id: str) -> Job | None:
    return session.scalars(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id)).one_or_none()


# Everything the API shows about a job as plain columns, built once: the polling path skips statement
# construction and ORM object loading (`metadata` is labelled like the mapped attribute, `metadata_`).
_JOBS = Job.__table__
_VIEW_COLUMNS = (
    "id",
    "status",
    "task",
    "stage",
    "progress",
    "epoch",
    "metrics",
    "error_code",
    "error_message",
    "config",
    "metadata",
    "teacher_file_ids",
    "dataset_file_id",
    "validation_file_id",
    "student_init_file_id",
    "attempts",
    "max_runtime_s",
    "created_at",
    "updated_at",
    *(f"{state}_at" for state in STATES),
)
_VIEW = select(*(_JOBS.c[n].label("metadata_" if n == "metadata" else n) for n in _VIEW_COLUMNS)).where(
    _JOBS.c.id == bindparam("job_id"), _JOBS.c.tenant_id == bindparam("tenant_id")
)


def get_view_for_tenant(session: Session, tenant_id: str, job_id: str) -> Row[Any] | None:
    return session.connection().execute(_VIEW, {"job_id": job_id, "tenant_id": tenant_id}).one_or_none()


def _const(text: str) -> Any:
    """A constant written into the statement (no bound parameter to pass on every call); our own text only."""
    return literal_column("'" + text.replace("'", "''") + "'")


def _pairs(fields: dict[str, Any]) -> list[Any]:
    return [item for name, value in fields.items() for item in (_const(name), value)]


def _utc_text(column: Any) -> Any:
    """A timestamp as pydantic writes an aware UTC datetime: microseconds only when there are any, then Z."""
    utc = func.timezone(_const("UTC"), column)
    whole, micro = _const('YYYY-MM-DD"T"HH24:MI:SS"Z"'), _const('YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
    return case(
        (func.date_trunc(_const("second"), utc) == utc, func.to_char(utc, whole)),
        else_=func.to_char(utc, micro),
    )


# The same view rendered to `JobOut`'s JSON by PostgreSQL itself, keys in the model's order: the polled read
# then decodes no jsonb and builds no model (about a fifth of its CPU). `test_read_pool` holds it equal to
# `job_out`, field for field.
_C = _JOBS.c
_EMPTY: Any = literal_column("'{}'::jsonb")
_JSON_FIELDS: dict[str, Any] = {
    "id": _C.id,
    "status": _C.status,
    "task": _C.task,
    "stage": _C.stage,
    "progress": _C.progress,
    "epoch": _C.epoch,
    "metrics": func.coalesce(_C.metrics, _EMPTY),
    "error": case(
        (_C.error_code.is_(None), null()),
        else_=func.json_build_object(
            *_pairs({"code": _C.error_code, "message": func.coalesce(_C.error_message, _const(""))})
        ),
    ),
    "config": _C.config,
    "metadata": func.coalesce(_C.metadata, _EMPTY),
    "teacher_file_ids": _C.teacher_file_ids,
    "dataset_file_id": _C.dataset_file_id,
    "validation_file_id": _C.validation_file_id,
    "student_init_file_id": _C.student_init_file_id,
    "attempts": _C.attempts,
    "max_runtime_s": _C.max_runtime_s,
    "created_at": _utc_text(_C.created_at),
    "updated_at": _utc_text(_C.updated_at),
    "timestamps": func.json_strip_nulls(
        func.json_build_object(*_pairs({state: _utc_text(_C[f"{state}_at"]) for state in TIMESTAMP_STATES}))
    ),
}
assert list(_JSON_FIELDS) == list(JobOut.model_fields), "the SQL view must follow JobOut"
# Keyed by (job id, tenant id): concurrent polls are answered by one statement over arrays of their keys.
_KEYS = (
    func.unnest(bindparam("job_ids", type_=ARRAY(Text)), bindparam("tenant_ids", type_=ARRAY(Text)))
    .table_valued("job_id", "tenant_id", with_ordinality="ord")
    .render_derived(name="q")
)
_VIEW_JSON = select(
    _KEYS.c.ord, cast(func.json_build_object(*_pairs(_JSON_FIELDS)), Text).label("body")
).join_from(_KEYS, _JOBS, and_(_C.id == _KEYS.c.job_id, _C.tenant_id == _KEYS.c.tenant_id))
_PSYCOPG: Any = psycopg_dialect()  # type: ignore[no-untyped-call]  # SQLAlchemy's dialects are unannotated
_VIEW_JSON_LOOKUP = Lookup(str(_VIEW_JSON.compile(dialect=_PSYCOPG)), ("job_ids", "tenant_ids"))


async def get_json_for_tenant_async(db: Database, tenant_id: str, job_id: str) -> str | None:
    """`JobOut` as JSON text, on the async read pool (PostgreSQL), as a server-side prepared statement."""
    row = await db.lookup(_VIEW_JSON_LOOKUP, (job_id, tenant_id))
    return None if row is None else row.body


def get(session: Session, job_id: str, *, fresh: bool = False) -> Job | None:
    """Unscoped, for the worker. `fresh` reloads a row that a Core UPDATE may have changed."""
    return session.get(Job, job_id, populate_existing=fresh)


def get_by_idempotency_key(session: Session, tenant_id: str, key: str) -> Job | None:
    query = select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key)
    return session.scalars(query).one_or_none()


def list_for_tenant(
    session: Session, tenant_id: str, *, status: str | None, cursor: str | None, limit: int
) -> list[Job]:
    query = select(Job).where(Job.tenant_id == tenant_id)
    if status is not None:
        query = query.where(Job.status == status)
    return list(session.scalars(keyset_page(query, Job.created_at, Job.id, cursor, limit)))


def current_state(session: Session, job_id: str) -> tuple[str, int | None, str | None] | None:
    """`(status, epoch, phase)` read from the database, not from the session's cached object; the phase
    ("distill", "finetune", "baseline") is the one the last progress report named in its metrics."""
    row = session.execute(select(Job.status, Job.epoch, Job.metrics).where(Job.id == job_id)).one_or_none()
    if row is None:
        return None
    phase = row.metrics.get("phase") if isinstance(row.metrics, dict) else None
    return row.status, row.epoch, phase if isinstance(phase, str) else None


def _set_if(session: Session, job_id: str, expected: str, values: dict[str, Any], *extra: Any) -> bool:
    """Compare-and-set: `UPDATE jobs SET ... WHERE id = :id AND status = :expected [AND extra]`."""
    stmt = update(Job).where(Job.id == job_id, Job.status == expected, *extra).values(**values)
    result = session.execute(stmt.execution_options(synchronize_session=False))
    return type_cast(CursorResult[Any], result).rowcount == 1


def set_if_status(session: Session, job_id: str, expected: str, values: dict[str, Any]) -> bool:
    """`values` written only while the job is still in `expected` (a status change, progress)."""
    return _set_if(session, job_id, expected, values)


def take_lease(
    session: Session, job_id: str, status: str, worker_id: str, until: datetime, now: datetime
) -> bool:
    """Take a running stage over (one more attempt) if its lease is free, expired or already this worker's,
    and no shard task of it is unfinished (the stage is then its shards' to finish, not a task's)."""
    free = or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now, Job.lease_owner == worker_id)
    values = {
        "lease_owner": worker_id,
        "lease_expires_at": until,
        "updated_at": now,
        "attempts": Job.attempts + 1,
    }
    return _set_if(session, job_id, status, values, free, ~_unfinished_shards(job_id).exists())


def take_free_lease(session: Session, job_id: str, status: str, worker_id: str, until: datetime) -> bool:
    """Take the lease of a job nobody holds, counting no attempt (the worker that finished its last shard)."""
    values = {"lease_owner": worker_id, "lease_expires_at": until}
    return _set_if(session, job_id, status, values, Job.lease_owner.is_(None))


def lock_job(session: Session, job_id: str, now: datetime) -> str | None:
    """Lock the job's row for the rest of the transaction (and touch it); its status, None if it is gone.
    A write, not SELECT FOR UPDATE, so that SQLite, which ignores the latter, serializes the same way."""
    stmt = update(Job).where(Job.id == job_id).values(updated_at=now).returning(Job.status)
    return session.execute(stmt.execution_options(synchronize_session=False)).scalar_one_or_none()


def extend_lease(session: Session, job_id: str, status: str, worker_id: str, until: datetime) -> bool:
    """The heartbeat: only the lease's holder extends it, only while the job is in `status`."""
    return _set_if(session, job_id, status, {"lease_expires_at": until}, Job.lease_owner == worker_id)


def release_lease(session: Session, job_id: str, status: str, worker_id: str, values: dict[str, Any]) -> bool:
    """The holder gives the lease up (the job waits for its next task), writing `values` with it."""
    changes = {"lease_owner": None, "lease_expires_at": None, **values}
    return _set_if(session, job_id, status, changes, Job.lease_owner == worker_id)


def clear_expired_lease(session: Session, job_id: str, status: str, owner: str | None, now: datetime) -> bool:
    """The reaper's take: clear a lease still `owner`'s and still expired (concurrent reapers act once)."""
    values = {"lease_owner": None, "lease_expires_at": None, "updated_at": now}
    return _set_if(session, job_id, status, values, Job.lease_owner == owner, Job.lease_expires_at < now)


def touch_if_unchanged(
    session: Session, job_id: str, status: str, updated_at: datetime, now: datetime
) -> bool:
    """Claim a stale job for one re-send: wins only if nobody touched the row since it was read."""
    return _set_if(session, job_id, status, {"updated_at": now}, Job.updated_at == updated_at)


def count_active_by_status(session: Session, tenant_id: str, states: Sequence[str]) -> dict[str, int]:
    query = (
        select(Job.status, func.count())
        .where(Job.tenant_id == tenant_id, Job.status.in_(states))
        .group_by(Job.status)
    )
    return {status: count for status, count in session.execute(query).all()}


def count_by_status(session: Session) -> dict[str, int]:
    """Every tenant's jobs by status (the metrics endpoint)."""
    return {
        status: count
        for status, count in session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
    }


def recently_finished_stamps(
    session: Session, states: Sequence[str], limit: int
) -> list[tuple[datetime | None, ...]]:
    """Each state's timestamp (in STATES order) of the newest finished jobs (the metrics' durations)."""
    columns = [getattr(Job, f"{s}_at") for s in STATES]
    query = select(*columns).where(Job.status.in_(states)).order_by(Job.updated_at.desc()).limit(limit)
    return [tuple(row) for row in session.execute(query).all()]


def running_metrics(session: Session, states: Sequence[str]) -> list[tuple[str, dict[str, Any] | None]]:
    """`(status, metrics)` of every running job (the metrics endpoint's throughput gauges)."""
    query = select(Job.status, Job.metrics).where(Job.status.in_(states))
    return [(row.status, row.metrics) for row in session.execute(query).all()]


@dataclass(frozen=True)
class WebhookTarget:
    url: str | None
    tenant_id: str
    metadata: dict[str, Any] | None
    error_code: str | None
    error_message: str | None


def webhook_target(connection: Connection, job_id: str) -> WebhookTarget | None:
    """What a status webhook needs of its job, read on the flushing connection (inside a mapper event)."""
    query = select(Job.webhook_url, Job.tenant_id, Job.metadata_, Job.error_code, Job.error_message)
    row = connection.execute(query.where(Job.id == job_id)).first()
    return None if row is None else WebhookTarget(*row)


def list_in_states_for_tenant(session: Session, tenant_id: str, states: Sequence[str]) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.tenant_id == tenant_id, Job.status.in_(states))))


def next_event_seq(session: Session, job_id: str) -> int | None:
    """Atomically hand out the job's next event number (the row lock orders concurrent writers)."""
    stmt = update(Job).where(Job.id == job_id).values(event_seq=Job.event_seq + 1).returning(Job.event_seq)
    return session.execute(stmt.execution_options(synchronize_session=False)).scalar_one_or_none()


def list_events(session: Session, job_id: str, *, after: int, limit: int) -> list[JobEvent]:
    query = (
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.seq > after)
        .order_by(JobEvent.seq)
        .limit(limit)
    )
    return list(session.scalars(query))


def list_artifacts(session: Session, job_id: str) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))


def get_artifact(session: Session, job_id: str, name: str) -> Artifact | None:
    query = select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name)
    return session.scalars(query).one_or_none()


def expired_leases(session: Session, states: Sequence[str], now: datetime, limit: int) -> list[Job]:
    query = (
        select(Job)
        .where(Job.status.in_(states), Job.lease_expires_at.is_not(None), Job.lease_expires_at < now)
        .order_by(Job.lease_expires_at)
        .limit(limit)
    )
    return list(session.scalars(query))


def stale_unleased(session: Session, states: Sequence[str], before: datetime, limit: int) -> list[Job]:
    """Jobs waiting with no lease holder and untouched since `before`: their task message may be lost."""
    query = (
        select(Job)
        .where(Job.status.in_(states), Job.lease_expires_at.is_(None), Job.updated_at < before)
        .order_by(Job.updated_at)
        .limit(limit)
    )
    return list(session.scalars(query))


def past_soft_labels_for_tenant(
    session: Session, tenant_id: str, task: str, exclude_job_id: str, limit: int
) -> list[Job]:
    """The tenant's newest jobs of `task` whose soft labels are finished (handed to distillation or
    later, not failed or cancelled), other than `exclude_job_id`."""
    done = or_(
        Job.status.in_(("distilling", "evaluating", "exporting", "succeeded")),
        and_(Job.status == "soft_labeling", Job.lease_owner.is_(None), Job.progress >= 1.0),
    )
    query = (
        select(Job)
        .where(Job.tenant_id == tenant_id, Job.task == task, Job.id != exclude_job_id, done)
        .order_by(Job.created_at.desc())
        .limit(limit)
    )
    return list(session.scalars(query))


# ---- the shard tasks of a split soft-label stage (each query names its job) --------------------------------


def _unfinished_shards(job_id: Any) -> Any:
    return select(JobShard.number).where(JobShard.job_id == job_id, JobShard.status != "done")


def add_shards(session: Session, job_id: str, ranges: Sequence[tuple[str, int, int]], now: datetime) -> None:
    session.add_all(
        JobShard(
            job_id=job_id,
            number=number,
            split=split,
            row_start=start,
            row_end=end,
            status="waiting",
            progress=0.0,
            attempts=0,
            updated_at=now,
        )
        for number, (split, start, end) in enumerate(ranges)
    )
    session.flush()


def list_shards(session: Session, job_id: str) -> list[JobShard]:
    query = select(JobShard).where(JobShard.job_id == job_id).order_by(JobShard.number)
    return list(session.scalars(query.execution_options(populate_existing=True)))


def get_shard(session: Session, job_id: str, number: int) -> JobShard | None:
    return session.get(JobShard, (job_id, number), populate_existing=True)


def count_unfinished_shards(session: Session, job_id: str) -> int:
    return session.scalar(select(func.count()).select_from(_unfinished_shards(job_id).subquery())) or 0


def _set_shard_if(session: Session, job_id: str, number: int, values: dict[str, Any], *where: Any) -> bool:
    """Compare-and-set on one shard: `UPDATE job_shards SET ... WHERE job_id, number [AND where]`."""
    stmt = (
        update(JobShard)
        .where(JobShard.job_id == job_id, JobShard.number == number, *where)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return type_cast(CursorResult[Any], session.execute(stmt)).rowcount == 1


def take_shard(
    session: Session, job_id: str, number: int, worker_id: str, until: datetime, now: datetime
) -> bool:
    """Claim a waiting shard, or take over a running one whose lease expired or is already this worker's
    (a retried task); one more attempt."""
    free = or_(
        JobShard.status == "waiting",
        and_(
            JobShard.status == "running",
            or_(JobShard.lease_expires_at < now, JobShard.lease_owner == worker_id),
        ),
    )
    values = {
        "status": "running",
        "lease_owner": worker_id,
        "lease_expires_at": until,
        "worker_id": worker_id,
        "attempts": JobShard.attempts + 1,
        "progress": 0.0,
        "updated_at": now,
    }
    return _set_shard_if(session, job_id, number, values, free)


def set_shard_if_held(
    session: Session, job_id: str, number: int, worker_id: str, values: dict[str, Any]
) -> bool:
    """`values` written only while the shard is running under this worker's lease."""
    held = and_(JobShard.status == "running", JobShard.lease_owner == worker_id)
    return _set_shard_if(session, job_id, number, values, held)


def release_expired_shard(
    session: Session, job_id: str, number: int, owner: str | None, now: datetime
) -> bool:
    """The reaper's take: a shard still `owner`'s and still expired goes back to waiting (once)."""
    lost = and_(JobShard.status == "running", JobShard.lease_owner == owner, JobShard.lease_expires_at < now)
    values = {"status": "waiting", "lease_owner": None, "lease_expires_at": None, "updated_at": now}
    return _set_shard_if(session, job_id, number, values, lost)


def touch_shard_if_unchanged(
    session: Session, job_id: str, number: int, updated_at: datetime, now: datetime
) -> bool:
    """Claim a stale waiting shard for one re-send: wins only if nobody touched it since it was read."""
    unchanged = and_(JobShard.status == "waiting", JobShard.updated_at == updated_at)
    return _set_shard_if(session, job_id, number, {"updated_at": now}, unchanged)


def expired_shard_leases(session: Session, now: datetime, limit: int) -> list[JobShard]:
    """Running shards of soft-labelling jobs whose worker stopped heartbeating, in a stable order."""
    query = (
        select(JobShard)
        .join(Job, Job.id == JobShard.job_id)
        .where(
            Job.status == "soft_labeling",
            JobShard.status == "running",
            JobShard.lease_expires_at.is_not(None),
            JobShard.lease_expires_at < now,
        )
        .order_by(JobShard.job_id, JobShard.number)
        .limit(limit)
    )
    return list(session.scalars(query))


def stale_waiting_shards(session: Session, before: datetime, limit: int) -> list[JobShard]:
    """Waiting shards of soft-labelling jobs untouched since `before`: their task message may be lost."""
    query = (
        select(JobShard)
        .join(Job, Job.id == JobShard.job_id)
        .where(Job.status == "soft_labeling", JobShard.status == "waiting", JobShard.updated_at < before)
        .order_by(JobShard.job_id, JobShard.number)
        .limit(limit)
    )
    return list(session.scalars(query))
