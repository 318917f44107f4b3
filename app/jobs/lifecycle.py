"""The one owner of a job's moves and of its attempts on workers.

Every change of a job's status, lease or progress goes through a function here, named for the move: the API
creates and cancels (`record_event` for `queued`, `cancel`); a worker's task claims a stage (`claim`), moves
between the steps of its stage (`claim_stage`), keeps its lease (`renew_lease`), reports (`record_progress`,
`record_event`), records its outputs (`add_artifact`), and ends its attempt in exactly one way: hands the job
on or back (`hand_back`), finishes it (`finish_job`), fails it (`fail_job`), or gives the attempt up to be
retried (`end_attempt`). The reaper clears lost workers' leases and re-sends lost messages (`reap`).

A soft-label stage split over workers moves the same way, one shard at a time: the task that planned it
(`plan_shards`) hands the job's lease back, and each shard task claims its shard (`claim_shard`), keeps its
lease (`renew_shard_lease`), reports (`record_shard_progress`) and ends in one way: `finish_shard` (the
last one takes the job's lease to finish the stage), `end_shard_attempt`, or `fail_shard`.

Each move is a compare-and-set on the row through `app.jobs.repository` (no SQL here) and writes its event;
the transition table is `app.jobs.state`. Functions flush; the caller's edge commits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.files import repository as files_repository
from app.files.models import File
from app.jobs import repository
from app.jobs.exceptions import JobNotFound
from app.jobs.models import Artifact, Job, JobEvent, JobShard
from app.jobs.state import RUNNING, check_transition, is_terminal, timestamp_column

DEFAULT_LEASE_S = 120
MAX_MESSAGE_CHARS = 4000
RETRY_BACKOFF_S = (5, 30, 120)  # after a failed attempt 1, 2, 3+


# ---- the state machine's one writer ---------------------------------------------------------------------


def transition(
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

    Compare-and-set on the status read just before, retried if another writer moved it in between; stamps
    `<state>_at` and writes a `status` event. False when the job is missing, terminal, or not in `expected`.
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
        if repository.set_if_status(session, job_id, current, changes):
            record_event(session, job_id, "status", {"from": current, "to": new, **(event or {})})
            return True
    return False


def cancel(session: Session, job_id: str, *, keep_partial: bool) -> bool:
    """The user's cancel: the row is the truth, so a worker notices at its next claim or report.
    `keep_partial`: the worker that stops the stage uploads the last student checkpoint first."""
    event = {"by": "user", "keep_partial": keep_partial}
    return transition(
        session, job_id, "cancelled", values={"keep_partial": keep_partial}, event=event, clear_lease=True
    )


# ---- an attempt: claim, keep, report -----------------------------------------------------------------------


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


def claim(
    session: Session,
    job_id: str,
    worker_id: str,
    *,
    first: tuple[str, str],
    resumable: tuple[str, ...],
    lease_s: int = DEFAULT_LEASE_S,
) -> Job | None:
    """A task's attempt at its stage: enter it (`first`: expected -> new), or take over a stage in one of
    the `resumable` states whose worker was lost. None: nothing to do here (a duplicate delivery, a job that
    moved on or finished, another live worker holding it, or the last attempt spent: then the job fails
    with `worker_lost`)."""
    job = claim_stage(session, job_id, *first, worker_id, lease_s=lease_s)
    if job is not None:
        return job
    current = get_job_for_worker(session, job_id)
    if current is None or current.status not in resumable or handed_on(current):
        return None
    job = claim_stage(session, job_id, current.status, current.status, worker_id, lease_s=lease_s)
    if job is None:
        return None
    if job.attempts > job.max_attempts:
        lost = job.attempts - 1
        fail_job(
            session, job_id, "worker_lost", f"the worker running this job was lost {lost} times; giving up"
        )
        return None
    return job


def handed_on(job: Job) -> bool:
    """The soft-label stage is done and the job waits for `distill.distill`: a late delivery of the stage's
    own task (a duplicate, a re-send) must not take it back and hand it on a second time."""
    return job.status == "soft_labeling" and job.lease_owner is None and (job.progress or 0.0) >= 1.0


def claim_stage(
    session: Session, job_id: str, expected: str, new: str, worker_id: str, *, lease_s: int = DEFAULT_LEASE_S
) -> Job | None:
    """Compare-and-set `expected -> new` and take the lease; None if another delivery got there first.

    `expected == new` (a running stage) takes over a stage whose lease expired or that this worker
    already holds: a retry after a lost worker. It counts an attempt and writes a `resumed` event.
    """
    now = utcnow()
    until = now + timedelta(seconds=lease_s)
    if expected == new:
        if new not in RUNNING:
            raise ValueError(f"only a running stage can be resumed, not {new!r}")
        if not repository.take_lease(session, job_id, expected, worker_id, until, now):
            return None
        job = refresh(session, job_id)
        record_event(
            session, job_id, "resumed", {"stage": new, "worker_id": worker_id, "attempt": job.attempts}
        )
        return job
    check_transition(expected, new)
    if new not in RUNNING:
        raise ValueError(f"claim_stage enters running stages only, not {new!r}; use finish_job / fail_job")
    lease: dict[str, Any] = {"lease_owner": worker_id, "lease_expires_at": until, "updated_at": now}
    if expected == "queued":
        lease["attempts"] = Job.attempts + 1
    if not transition(session, job_id, new, expected=expected, values=lease, event={"worker_id": worker_id}):
        return None
    return refresh(session, job_id)


def renew_lease(session: Session, job_id: str, worker_id: str, *, lease_s: int = DEFAULT_LEASE_S) -> bool:
    """Heartbeat: extend the lease while this worker still holds a running job. False: stop working."""
    state = repository.current_state(session, job_id)
    if state is None or state[0] not in RUNNING:
        return False
    until = utcnow() + timedelta(seconds=lease_s)
    return repository.extend_lease(session, job_id, state[0], worker_id, until)


def record_progress(
    session: Session, job_id: str, progress: float, epoch: int | None, metrics: dict[str, Any] | None
) -> bool:
    """Store the latest progress (0..1), epoch and metrics; returns False once the job is no longer running
    (cancelled, failed), which tells the worker to stop. A new epoch also writes an `epoch` event."""
    state = repository.current_state(session, job_id)
    if state is None or state[0] not in RUNNING:
        return False
    status, last_epoch, last_phase = state
    clean_metrics = json_safe(metrics or {})
    progress = min(1.0, max(0.0, progress)) if math.isfinite(progress) else 0.0
    changes: dict[str, Any] = {"progress": progress, "epoch": epoch, "updated_at": utcnow()}
    if metrics is not None:
        changes["metrics"] = clean_metrics
    if not repository.set_if_status(session, job_id, status, changes):
        return False
    # The distill stage trains up to three models in turn, each counting epochs from 1: an epoch is new when
    # its number or its phase is, and the event names the phase so "epoch 1" is never ambiguous.
    phase = clean_metrics.get("phase") if isinstance(clean_metrics.get("phase"), str) else None
    if epoch is not None and (epoch != last_epoch or phase != last_phase):
        named = {"stage": status, **({"phase": phase} if phase else {}), "epoch": epoch}
        record_event(session, job_id, "epoch", {**named, "metrics": clean_metrics})
    return True


def record_event(session: Session, job_id: str, kind: str, data: dict[str, Any]) -> JobEvent:
    seq = repository.next_event_seq(session, job_id)
    if seq is None:
        raise JobNotFound()
    event = JobEvent(job_id=job_id, seq=seq, kind=kind, data=json_safe(data))
    session.add(event)
    session.flush()
    return event


add_event = record_event  # the name the worker's calls and the tests have always used


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


# Settings the stored soft labels depend on, by task: with these and the input files' bytes equal, another
# job's soft labels are this job's (the core checks the same identity again before it trusts a shard).
SOFT_LABEL_SETTINGS = {
    "classification": (
        "teacher_format", "teacher_arch", "label_column", "val_fraction", "preprocess",
        "soft_label_format", "topk", "shard_size", "seed", "text_column", "max_length", "augment", "views",
    ),
    "causal_lm": (
        "soft_label_format", "topk", "temperature", "max_length", "text_column", "pack",
        "val_fraction", "seed", "shard_rows", "generate",
    ),
}  # fmt: skip
DONOR_CANDIDATES = 50


def soft_label_donor(session: Session, job: Job) -> str | None:
    """A job of the same tenant whose stored soft labels this job can reuse instead of running its teacher
    again: same task, same input bytes (sha256 of every teacher, the dataset and the validation file) and
    same soft-label settings, its soft-label stage finished. None when there is none."""
    keys = SOFT_LABEL_SETTINGS.get(job.task, ())
    mine = _input_digests(session, job)
    settings = {k: job.config.get(k) for k in keys}
    for other in repository.past_soft_labels_for_tenant(
        session, job.tenant_id, job.task, job.id, DONOR_CANDIDATES
    ):
        if {k: other.config.get(k) for k in keys} == settings and _input_digests(session, other) == mine:
            return other.id
    return None


def _input_digests(session: Session, job: Job) -> tuple[Any, ...]:
    files = job_inputs(session, job)
    optional = files.validation.sha256 if files.validation else None
    return (tuple(f.sha256 for f in files.teachers), files.dataset.sha256, optional)


# ---- an attempt ends: exactly one of these -----------------------------------------------------------------


def hand_back(session: Session, job_id: str, worker_id: str, values: dict[str, Any] | None = None) -> bool:
    """Give up the lease on a still-running job so the next task can claim it at once (the next stage after
    soft labels, with `progress` 1; or the same stage on another worker). False: the job moved on."""
    job = get_job_for_worker(session, job_id)
    if job is None or job.status not in RUNNING:
        return False
    return repository.release_lease(session, job_id, job.status, worker_id, values or {})


def end_attempt(
    session: Session, job_id: str, worker_id: str, code: str | None, message: str
) -> float | None:
    """This attempt ended without a verdict on the job. Returns the delay before the stage's task is sent
    again (the lease handed back), or None when there is nothing to re-send: the job moved on or this worker
    no longer holds it, or `code` (a failed attempt) spent the last attempt, which fails the job with it.
    `code=None` is no failure (a warm shutdown): the stage is re-sent at once, with no back-off."""
    job = get_job_for_worker(session, job_id)
    if job is None or job.status not in RUNNING or job.lease_owner != worker_id:
        return None
    if code is not None and job.attempts >= job.max_attempts:
        fail_job(session, job_id, code, f"{message} (attempt {job.attempts} of {job.max_attempts})")
        return None
    if code is not None:
        failed = {"stage": job.status, "attempt": job.attempts, "code": code, "message": message}
        record_event(session, job_id, "attempt_failed", failed)
    if not hand_back(session, job_id, worker_id):
        return None
    return 0.0 if code is None else float(RETRY_BACKOFF_S[min(job.attempts, len(RETRY_BACKOFF_S)) - 1])


def fail_job(session: Session, job_id: str, code: str, message: str) -> bool:
    """Fail from any unfinished state; False if the job had already finished (e.g. cancelled meanwhile)."""
    message = message[:MAX_MESSAGE_CHARS]
    return transition(
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
        values["metrics"] = json_safe(metrics)
    return transition(session, job_id, "succeeded", expected="exporting", values=values, clear_lease=True)


# ---- a soft-label stage split over workers: its shard tasks ---------------------------------------------
# Every move of a shard locks its job's row first (`repository.lock_job`), so moves of one job's shards are
# serialized: the last shard to finish sees every other one done, and a cancel, a claim and a finish never
# interleave. Each is a compare-and-set on the shard row, so a second delivery of a shard's task is a no-op.


def plan_shards(session: Session, job_id: str, worker_id: str, ranges: list[tuple[str, int, int]]) -> bool:
    """This worker, holding the soft-label stage, splits it into shard tasks over `ranges` (split, start,
    end) and hands the job's lease back: from now on the stage is its shards'. False: the job moved on."""
    now = utcnow()
    if repository.lock_job(session, job_id, now) != "soft_labeling":
        return False
    if not repository.release_lease(session, job_id, "soft_labeling", worker_id, {}):
        return False
    repository.add_shards(session, job_id, ranges, now)
    rows = sum(end - start for _, start, end in ranges)
    record_event(
        session, job_id, "shards_planned", {"shards": len(ranges), "rows": rows, "worker_id": worker_id}
    )
    _show_shards(session, job_id)
    return True


def soft_label_shards(session: Session, job_id: str) -> list[JobShard]:
    """The job's shard tasks, by number; none when its soft-label stage was not split."""
    return repository.list_shards(session, job_id)


def claim_shard(
    session: Session, job_id: str, number: int, worker_id: str, *, lease_s: int = DEFAULT_LEASE_S
) -> tuple[Job, JobShard] | None:
    """A shard task's attempt: take a waiting shard, or take over one whose worker was lost (a `resumed`
    event). None: nothing to do (a duplicate delivery, a shard done or held by a live worker, a job no longer
    soft labelling, or the shard's last attempt spent: then the job fails with `worker_lost`, naming it)."""
    now = utcnow()
    if repository.lock_job(session, job_id, now) != "soft_labeling":
        return None
    if not repository.take_shard(session, job_id, number, worker_id, now + timedelta(seconds=lease_s), now):
        return None
    job, shard = refresh(session, job_id), repository.get_shard(session, job_id, number)
    assert shard is not None
    if shard.attempts > job.max_attempts:
        lost = shard.attempts - 1
        message = f"the worker running {describe_shard(shard)} was lost {lost} times; giving up"
        fail_job(session, job_id, "worker_lost", message)
        return None
    data = {
        "stage": "soft_labeling",
        "shard": number,
        "split": shard.split,
        "rows": [shard.row_start, shard.row_end],
        "worker_id": worker_id,
        "attempt": shard.attempts,
    }
    record_event(session, job_id, "shard_started" if shard.attempts == 1 else "resumed", data)
    _show_shards(session, job_id)
    return job, shard


def renew_shard_lease(
    session: Session, job_id: str, number: int, worker_id: str, *, lease_s: int = DEFAULT_LEASE_S
) -> bool:
    """A shard task's heartbeat. False: stop (the job is no longer soft labelling, or the shard not ours)."""
    state = repository.current_state(session, job_id)
    if state is None or state[0] != "soft_labeling":
        return False
    until = utcnow() + timedelta(seconds=lease_s)
    return repository.set_shard_if_held(session, job_id, number, worker_id, {"lease_expires_at": until})


def record_shard_progress(
    session: Session, job_id: str, number: int, worker_id: str, progress: float
) -> bool:
    """A shard's progress (0..1), and the job's over all its shards; False once the job or the shard is no
    longer this task's (cancelled, failed, taken over), which tells the worker to stop."""
    now = utcnow()
    if repository.lock_job(session, job_id, now) != "soft_labeling":
        return False
    progress = min(1.0, max(0.0, progress)) if math.isfinite(progress) else 0.0
    values = {"progress": progress, "updated_at": now}
    if not repository.set_shard_if_held(session, job_id, number, worker_id, values):
        return False
    _show_shards(session, job_id)
    return True


def finish_shard(
    session: Session, job_id: str, number: int, worker_id: str, *, lease_s: int = DEFAULT_LEASE_S
) -> Job | None:
    """This worker's shard is done (its outputs are in the store). When it was the last one, the worker
    takes the job's lease, in the same transaction, to finish the stage: the job is returned, to exactly one
    worker. None: shards remain, or the shard or the job is no longer this task's."""
    now = utcnow()
    if repository.lock_job(session, job_id, now) != "soft_labeling":
        return None
    done = {"status": "done", "progress": 1.0, "lease_owner": None, "lease_expires_at": None}
    if not repository.set_shard_if_held(session, job_id, number, worker_id, {**done, "finished_at": now}):
        return None
    record_event(session, job_id, "shard_done", {"shard": number, "worker_id": worker_id})
    _show_shards(session, job_id)
    if repository.count_unfinished_shards(session, job_id):
        return None
    until = now + timedelta(seconds=lease_s)
    if not repository.take_free_lease(session, job_id, "soft_labeling", worker_id, until):
        return None
    return refresh(session, job_id)


def end_shard_attempt(
    session: Session, job_id: str, number: int, worker_id: str, code: str | None, message: str
) -> float | None:
    """A shard task ended without a verdict on the job (`end_attempt`, for one shard): the delay before its
    task is sent again (the shard waiting once more), or None: nothing to re-send, because the shard is no
    longer this worker's, or `code` spent its last attempt, which fails the job naming the shard."""
    now = utcnow()
    if repository.lock_job(session, job_id, now) != "soft_labeling":
        return None
    shard = repository.get_shard(session, job_id, number)
    if shard is None or shard.status != "running" or shard.lease_owner != worker_id:
        return None
    job = refresh(session, job_id)
    if code is not None and shard.attempts >= job.max_attempts:
        where = f"{describe_shard(shard)}, attempt {shard.attempts} of {job.max_attempts}"
        fail_job(session, job_id, code, f"{message} ({where})")
        return None
    if code is not None:
        failed = {"stage": "soft_labeling", "shard": number, "attempt": shard.attempts, "code": code}
        record_event(session, job_id, "attempt_failed", {**failed, "message": message})
    waiting = {"status": "waiting", "lease_owner": None, "lease_expires_at": None, "updated_at": now}
    if not repository.set_shard_if_held(session, job_id, number, worker_id, waiting):
        return None
    _show_shards(session, job_id)
    return 0.0 if code is None else float(RETRY_BACKOFF_S[min(shard.attempts, len(RETRY_BACKOFF_S)) - 1])


def fail_shard(session: Session, job_id: str, number: int, code: str, message: str) -> bool:
    """The shard cannot succeed (the model or the data is at fault): the job fails, the message naming it."""
    shard = repository.get_shard(session, job_id, number)
    where = describe_shard(shard) if shard is not None else f"soft-label shard {number}"
    return fail_job(session, job_id, code, f"{where}: {message}")


def _rows_labelled(shard: JobShard) -> float:
    share = 1.0 if shard.status == "done" else shard.progress if shard.status == "running" else 0.0
    return (shard.row_end - shard.row_start) * share


def describe_shard(shard: JobShard) -> str:
    return f"soft-label shard {shard.number} ({shard.split} rows {shard.row_start}-{shard.row_end})"


def _show_shards(session: Session, job_id: str) -> None:
    """The job's progress over its shards (rows labelled), and in its metrics how many shards are done,
    running and waiting, and which worker holds each running one."""
    shards = repository.list_shards(session, job_id)
    rows = sum(s.row_end - s.row_start for s in shards) or 1
    labelled = sum(_rows_labelled(s) for s in shards)
    counts = {status: sum(s.status == status for s in shards) for status in ("done", "running", "waiting")}
    held_by = {str(s.number): s.lease_owner for s in shards if s.status == "running"}
    metrics = {"stage": "soft_label", "shards": {"total": len(shards), **counts, "held_by": held_by}}
    values = {"progress": min(1.0, labelled / rows), "metrics": metrics, "updated_at": utcnow()}
    repository.set_if_status(session, job_id, "soft_labeling", values)


# ---- the reaper --------------------------------------------------------------------------------------------


@dataclass
class Reaped:
    """What one reaper pass changed: the jobs it took from lost workers and the stale ones it claimed for a
    re-send, with the stage task each needs next."""

    worker_lost: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    resend: dict[str, str] = field(default_factory=dict)  # job id -> "soft_label" | "distill"
    shards: list[tuple[str, int]] = field(default_factory=list)  # (job id, shard number) to re-send


def stage_task_of(status: str, handed_over: bool) -> str:
    """The task that continues a job in `status`; `handed_over`: soft labels done and released to distill."""
    if status == "queued" or (status == "soft_labeling" and not handed_over):
        return "soft_label"
    return "distill"


def jobs_with_expired_lease(session: Session, now: datetime | None = None, limit: int = 100) -> list[Job]:
    """Running jobs whose worker stopped heartbeating: what a reaper re-drives or fails."""
    return repository.expired_leases(session, RUNNING, now or utcnow(), limit)


def reap(session: Session, now: datetime, stale_after_s: float, batch: int) -> Reaped:
    """Expired leases become one `worker_lost` event and a cleared lease (the next delivery takes the stage
    over, or fails the job once its attempts are spent); queued or released jobs untouched for
    `stale_after_s` had their message lost. Every change is a compare-and-set: concurrent reapers act once."""
    reaped = Reaped()
    handed: dict[str, bool] = {}
    for job in jobs_with_expired_lease(session, now, batch):
        if repository.clear_expired_lease(session, job.id, job.status, job.lease_owner, now):
            lost = {"stage": job.status, "worker_id": job.lease_owner, "attempt": job.attempts}
            record_event(session, job.id, "worker_lost", lost)
            reaped.worker_lost.append(job.id)
    before = now - timedelta(seconds=stale_after_s)
    for job in repository.stale_unleased(session, ("queued", *RUNNING), before, batch):
        if repository.touch_if_unchanged(session, job.id, job.status, job.updated_at, now):
            reaped.requeued.append(job.id)
            handed[job.id] = handed_on(job)
    for job_id in reaped.worker_lost + reaped.requeued:
        state = repository.current_state(session, job_id)
        if state is not None:
            reaped.resend[job_id] = stage_task_of(state[0], handed.get(job_id, False))
    _reap_shards(session, now, before, batch, reaped)
    return reaped


def _reap_shards(session: Session, now: datetime, before: datetime, batch: int, reaped: Reaped) -> None:
    """A shard whose worker was lost goes back to waiting with one `worker_lost` event naming it; a waiting
    shard untouched since `before` had its message lost. Both are re-sent (`reaped.shards`)."""
    for shard in repository.expired_shard_leases(session, now, batch):
        if repository.lock_job(session, shard.job_id, now) != "soft_labeling":
            continue
        owner, attempt = shard.lease_owner, shard.attempts
        if repository.release_expired_shard(session, shard.job_id, shard.number, owner, now):
            lost = {"stage": "soft_labeling", "shard": shard.number, "worker_id": owner, "attempt": attempt}
            record_event(session, shard.job_id, "worker_lost", lost)
            _show_shards(session, shard.job_id)
            reaped.shards.append((shard.job_id, shard.number))
    for shard in repository.stale_waiting_shards(session, before, batch):
        job_id, number, updated_at = shard.job_id, shard.number, shard.updated_at
        if repository.touch_shard_if_unchanged(session, job_id, number, updated_at, now):
            reaped.shards.append((job_id, number))


# ---- helpers -----------------------------------------------------------------------------------------------


def refresh(session: Session, job_id: str) -> Job:
    """The job as the database has it now (a Core UPDATE may have changed the row under the session)."""
    job = repository.get(session, job_id, fresh=True)
    if job is None:
        raise JobNotFound()
    return job


def json_safe(value: Any) -> Any:
    """NaN and infinities are not JSON (PostgreSQL's jsonb refuses them): stored as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
