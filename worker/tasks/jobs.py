"""The two Celery tasks. Each takes a job id, wins the job row, then supervises the core in a child process.

`distill.soft_label`: preflight + soft labels; on success it releases the job and enqueues `distill.distill`
after its commit. `distill.distill`: training, evaluation, export, artifact upload, success.

A task acts only after `claim_stage` (a compare-and-set on the row) succeeds, so a second delivery of the
same message is a no-op; a task whose previous holder was lost takes the stage over (its lease expired)
and the stage resumes from what the work folder or the object store already holds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery.signals import worker_shutting_down
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from app.db import on_commit, session_scope
from app.jobs import repository, service
from app.jobs.models import Job
from app.jobs.state import RUNNING
from app.queue import STAGE_TASKS, TASK_DISTILL, TASK_SOFT_LABEL
from app.storage import keys
from app.storage.exceptions import ObjectNotFound, StorageUnavailable
from worker.celery_app import celery_app
from worker.distill.errors import DistillError
from worker.distill.summary import headline
from worker.sandbox import SandboxUnavailable
from worker.supervisor import StageCrashed, StageError, StageStopped, Step, run_steps
from worker.tasks import inputs, partial, steps
from worker.tasks.context import WorkerContext, get_context
from worker.tasks.watch import StageWatch, shutting_down
from worker.tasks.workspace import WorkMirror, clear

MAX_REPORT_BYTES = 4 << 20

log = logging.getLogger(__name__)
RETRY_BACKOFF_S = (5, 30, 120)


@dataclass(frozen=True)
class Claim:
    job_id: str
    tenant_id: str
    status: str
    config: dict[str, Any]
    attempts: int
    max_attempts: int
    max_runtime_s: int | None
    files: list[inputs.InputFile]


# The database or the store being briefly away is not the job's fault: the task is re-sent with back-off
# (a retry takes its own lease back, or finds the job already moved on).
RETRY_OPTIONS: dict[str, Any] = {
    "autoretry_for": (OperationalError, StorageUnavailable),
    "retry_backoff": 2,
    "retry_backoff_max": 300,
    "retry_jitter": True,
    "max_retries": 20,
}


@celery_app.task(name=TASK_SOFT_LABEL, **RETRY_OPTIONS)
def soft_label(job_id: str) -> None:
    run_soft_label(get_context(), job_id)


@celery_app.task(name=TASK_DISTILL, **RETRY_OPTIONS)
def distill(job_id: str) -> None:
    run_distill(get_context(), job_id)


@worker_shutting_down.connect
def _on_shutdown(**_: Any) -> None:
    shutting_down.set()


def run_soft_label(ctx: WorkerContext, job_id: str) -> None:
    claim = claim_job(ctx, job_id, ("queued", "soft_labeling"), resumable=("soft_labeling",))
    if claim is not None:
        run_claimed(ctx, claim, "soft_label", steps.SOFT_LABEL_STEPS, _hand_to_distill)


def run_distill(ctx: WorkerContext, job_id: str) -> None:
    claim = claim_job(
        ctx, job_id, ("soft_labeling", "distilling"), resumable=("distilling", "evaluating", "exporting")
    )
    if claim is not None:
        run_claimed(ctx, claim, "distill", steps.DISTILL_STEPS, _publish_and_succeed)


def claim_job(
    ctx: WorkerContext, job_id: str, first: tuple[str, str], resumable: tuple[str, ...]
) -> Claim | None:
    """Win the row for this stage, or take over a stage whose worker was lost; None: nothing to do here."""
    lease_s = ctx.settings.worker_lease_s
    with session_scope(ctx.db) as session:
        job = service.claim_stage(session, job_id, *first, ctx.worker_id, lease_s=lease_s)
        if job is None:
            current = service.get_job_for_worker(session, job_id)
            if current is None or current.status not in resumable:
                return None  # finished, cancelled, or already past this stage: a duplicate delivery
            job = service.claim_stage(
                session, job_id, current.status, current.status, ctx.worker_id, lease_s=lease_s
            )
            if job is None:
                return None  # another live worker holds the lease
            if job.attempts > job.max_attempts:
                service.fail_job(
                    session,
                    job_id,
                    "worker_lost",
                    f"the worker running this job was lost {job.attempts - 1} times; giving up",
                )
                return None
        files = inputs.describe(ctx.storage, service.job_inputs(session, job))
        return Claim(
            job.id,
            job.tenant_id,
            job.status,
            dict(job.config),
            job.attempts,
            job.max_attempts,
            job.max_runtime_s,
            files,
        )


def run_claimed(
    ctx: WorkerContext,
    claim: Claim,
    stage: str,
    stage_steps: list[tuple[str, Step]],
    on_success: Callable[[WorkerContext, Claim], None],
) -> None:
    work = ctx.work_dir(claim.job_id)
    mirror = WorkMirror(ctx.storage, claim.tenant_id, claim.job_id, work)
    watch = StageWatch(ctx, claim.job_id, claim.status, mirror)
    try:
        inputs.download(claim.files, work)
        mirror.pull()
        run_steps(
            stage_steps,
            work,
            claim.config,
            sandbox=ctx.sandbox,
            on_message=watch.on_message,
            should_stop=watch.should_stop,
        )
        watch.settle(ctx.settings.worker_db_wait_s)
        with watch.heartbeat():
            watch.drain()
            mirror.push()
            on_success(ctx, claim)
    except DistillError as exc:
        _fail(ctx, claim, exc.code, exc.message, work)
    except StageError as exc:
        log.error("job %s: stage %s failed: %s\n%s", claim.job_id, stage, exc.message, exc.detail)
        _fail(ctx, claim, exc.code, exc.message, work)
    except ObjectNotFound:
        _fail(ctx, claim, "input_missing", "an input file of this job no longer exists in storage", work)
    except StageStopped as exc:
        log.info(
            "job %s: stage %s stopped (%s; child exit status %s)",
            claim.job_id,
            stage,
            exc.reason,
            exc.exitcode,
        )
        if exc.reason == "shutdown":
            # The child checkpointed on its way out: that checkpoint must reach the store before the job
            # is handed back, or the next worker resumes from an older epoch (or from scratch).
            watch.drain()
            with watch.heartbeat():
                mirror.push()
            _attempt_over(
                ctx, claim, stage, None, "the worker shut down; the stage resumes on another worker"
            )
        elif exc.reason == "cancelled":
            if partial.wants_partial(ctx, claim.job_id):
                partial.keep_partial_student(ctx, claim.tenant_id, claim.job_id, claim.config, work)
            clear(work)
        elif exc.reason == "timeout":
            partial.keep_partial_student(ctx, claim.tenant_id, claim.job_id, claim.config, work)
            message = f"the job ran past its max_runtime_s of {claim.max_runtime_s} s"
            _fail(ctx, claim, "timeout", message, work)
    except StageCrashed as exc:
        log.warning("job %s: stage %s crashed: %s", claim.job_id, stage, exc.message)
        _attempt_over(ctx, claim, stage, exc.code, exc.message)
    except SandboxUnavailable as exc:
        # Fail closed: the user's model never runs unconfined. The job is not at fault; a worker whose
        # sandbox works can take it on the next attempt.
        log.error("job %s: stage %s not run: %s", claim.job_id, stage, exc)
        _attempt_over(
            ctx, claim, stage, "sandbox_unavailable", f"this worker cannot sandbox user models: {exc}"
        )
    except Exception as exc:  # storage or database trouble on our side: this attempt is lost, not the job
        log.exception("job %s: stage %s: worker error", claim.job_id, stage)
        _attempt_over(ctx, claim, stage, "worker_error", f"{type(exc).__name__}: {exc}")


def _hand_to_distill(ctx: WorkerContext, claim: Claim) -> None:
    manifest = ctx.work_dir(claim.job_id) / "soft_labels" / "manifest.json"
    uploaded = [_upload(ctx, claim, "soft_labels_manifest.json", manifest)] if manifest.is_file() else []
    with session_scope(ctx.db) as session:
        # Released, not finished: the job waits (soft_labeling, progress 1) for a worker of the distill queue.
        # Recorded only with the release, in its transaction: a job cancelled meanwhile gets no artifact.
        if _release(session, claim, ctx.worker_id, {"progress": 1.0}):
            _record(session, claim, uploaded)
            on_commit(session, lambda: _enqueue(ctx, "distill", claim.job_id))
        else:
            _clear_if_over(session, ctx, claim)


def _publish_and_succeed(ctx: WorkerContext, claim: Claim) -> None:
    out = ctx.work_dir(claim.job_id) / "out"
    # Uploads first, then one short transaction: no row lock is held while bytes move.
    uploaded = [
        _upload(ctx, claim, p.name, p)
        for p in sorted(out.iterdir())
        if p.is_file() and not p.name.startswith(".")
    ]
    with session_scope(ctx.db) as session:
        # Recorded only with the success, in its transaction: a job cancelled meanwhile shows no student.
        if service.finish_job(session, claim.job_id, _final_metrics(out / "report.json")):
            _record(session, claim, uploaded)
            on_commit(session, lambda: clear(ctx.work_dir(claim.job_id)))
        else:
            _clear_if_over(session, ctx, claim)


def _clear_if_over(session: Session, ctx: WorkerContext, claim: Claim) -> None:
    """The job moved on without us (cancelled or failed while the outputs uploaded): drop the scratch copy.
    The uploaded objects stay unreferenced under the job's prefix (its keys are shared with any other run)."""
    job = service.get_job_for_worker(session, claim.job_id)
    if job is None or job.status not in RUNNING:
        on_commit(session, lambda: clear(ctx.work_dir(claim.job_id)))


def _final_metrics(report_path: Path) -> dict[str, Any] | None:
    """The report's headline (student, teacher and baseline accuracy, KD gain, T and alpha) for the job row.
    The report comes from the sandboxed child: read with a size cap, and a bad one only costs the headline."""
    try:
        if report_path.stat().st_size > MAX_REPORT_BYTES:
            return None
        return headline(json.loads(report_path.read_bytes()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        log.warning("job report %s unreadable; the job keeps its last metrics", report_path)
        return None


def _upload(ctx: WorkerContext, claim: Claim, name: str, path: Path) -> tuple[str, str, int, str]:
    key = keys.artifact_key(claim.tenant_id, claim.job_id, name)
    size, sha = ctx.storage.upload_from(path, key)
    return name, key, size, sha


def _record(session: Session, claim: Claim, uploaded: list[tuple[str, str, int, str]]) -> None:
    for name, key, size, sha in uploaded:
        content_type = "application/json" if name.endswith(".json") else "application/octet-stream"
        service.add_artifact(session, claim.job_id, name, key, size, sha, content_type)


def _fail(ctx: WorkerContext, claim: Claim, code: str, message: str, work: Path) -> None:
    with session_scope(ctx.db) as session:
        service.fail_job(session, claim.job_id, code, message)
    clear(work)


def _attempt_over(ctx: WorkerContext, claim: Claim, stage: str, code: str | None, message: str) -> None:
    """This attempt ended without a verdict on the job: retry the stage later, or give up after the last."""
    with session_scope(ctx.db) as session:
        job = service.get_job_for_worker(session, claim.job_id)
        if job is None or job.status not in RUNNING or job.lease_owner != ctx.worker_id:
            return
        if code is not None and job.attempts >= job.max_attempts:
            service.fail_job(
                session, claim.job_id, code, f"{message} (attempt {job.attempts} of {job.max_attempts})"
            )
            return
        if code is not None:
            service.add_event(
                session,
                claim.job_id,
                "attempt_failed",
                {"stage": job.status, "attempt": job.attempts, "code": code, "message": message},
            )
        if _release(session, claim, ctx.worker_id):
            delay = 0 if code is None else RETRY_BACKOFF_S[min(job.attempts, len(RETRY_BACKOFF_S)) - 1]
            on_commit(session, lambda: _enqueue(ctx, stage, claim.job_id, countdown=delay))


def _release(session: Session, claim: Claim, worker_id: str, values: dict[str, Any] | None = None) -> bool:
    """Give up the lease on a still-running job so the next task can claim it at once."""
    job = service.get_job_for_worker(session, claim.job_id)
    if job is None or job.status not in RUNNING:
        return False
    changes = {"lease_owner": None, "lease_expires_at": None, **(values or {})}
    return repository.update_if_status(
        session, claim.job_id, job.status, changes, Job.lease_owner == worker_id
    )


def _enqueue(ctx: WorkerContext, stage: str, job_id: str, countdown: float = 0) -> None:
    task, queue = STAGE_TASKS[stage]
    ctx.celery.send_task(task, args=[job_id], queue=queue, countdown=countdown or None)
