"""The two Celery tasks. Each takes a job id, claims its stage, supervises the core in a sandboxed child, and
ends the attempt in exactly one way, through `app.jobs.lifecycle`.

`distill.soft_label`: preflight + soft labels; on success it hands the job on and enqueues `distill.distill`
after its commit. `distill.distill`: training, evaluation, export, artifact upload, success. A dataset past
`soft_label_task_rows` rows is split instead: `distill.soft_label` plans shard tasks and hands the job back,
the shard tasks (`worker.tasks.shards`) label it side by side, and the worker finishing the last one ends
the stage here (`assemble_soft_labels`), as a single task would have.

A task acts only after `lifecycle.claim` (a compare-and-set on the row) succeeds, so a second delivery of the
same message is a no-op; a task whose previous holder was lost takes the stage over (its lease expired) and
the stage resumes from what the work folder or the object store already holds. Tasks are registered on a
Celery app by `register` (the worker's edge calls it), not on import.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import worker_shutting_down
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from app.db import on_commit, session_scope
from app.jobs import lifecycle
from app.jobs.state import RUNNING
from app.queue import SOFT_LABEL_QUEUE, STAGE_TASKS, TASK_DISTILL, TASK_SOFT_LABEL, TASK_SOFT_LABEL_SHARD
from app.storage import keys
from app.storage.exceptions import ObjectChanged, ObjectNotFound, StorageUnavailable
from worker.distill.errors import DistillError
from worker.distill.lm_summary import lm_headline
from worker.distill.shard_plan import SPLITS, task_ranges
from worker.distill.summary import headline
from worker.sandbox import SandboxUnavailable
from worker.supervisor import StageCrashed, StageError, StageStopped, Step, run_steps
from worker.tasks import inputs, partial, steps
from worker.tasks.context import WorkerContext, get_context
from worker.tasks.watch import StageWatch, shutting_down
from worker.tasks.workspace import WorkMirror, clear, shard_index

MAX_REPORT_BYTES = 4 << 20
GENERATED = "generated.jsonl"  # worker.distill.lm_generate.GENERATED (the core is not imported here)
CONTENT_TYPES = {".json": "application/json", ".jsonl": "application/x-ndjson"}

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Ending:
    """How an attempt that did not succeed ends: `fail` the job, `retry` the stage later (a lost attempt),
    hand it back at once after a warm `shutdown`, or stop for a `cancelled` job or one past its `timeout`.
    `ignore`: this worker lost the job (its lease went to another); nothing of it is written."""

    kind: str  # fail | retry | shutdown | cancelled | timeout | ignore
    code: str | None = None
    message: str = ""


# The database or the store being briefly away is not the job's fault: the task is re-sent with back-off
# (a retry takes its own lease back, or finds the job already moved on).
RETRY_OPTIONS: dict[str, Any] = {
    "autoretry_for": (OperationalError, StorageUnavailable),
    "retry_backoff": 2,
    "retry_backoff_max": 300,
    "retry_jitter": True,
    "max_retries": 20,
}


def soft_label(job_id: str) -> None:
    run_soft_label(get_context(), job_id)


def distill(job_id: str) -> None:
    run_distill(get_context(), job_id)


def _on_shutdown(**_: Any) -> None:
    shutting_down.set()


def register(celery: Celery) -> None:
    """The two tasks on `celery`, and the warm-shutdown flag on the worker's shutdown signal."""
    celery.task(name=TASK_SOFT_LABEL, **RETRY_OPTIONS)(soft_label)
    celery.task(name=TASK_DISTILL, **RETRY_OPTIONS)(distill)
    worker_shutting_down.connect(_on_shutdown, weak=False, dispatch_uid="distill-shutdown")


def run_soft_label(ctx: WorkerContext, job_id: str) -> None:
    claim = claim_job(ctx, job_id, ("queued", "soft_labeling"), resumable=("soft_labeling",))
    if claim is None:
        return
    shards = _shard_count(ctx, claim)
    if shards:  # split earlier, and every shard is done (the claim is refused while one is not)
        assemble_soft_labels(ctx, claim, shards)
        return
    donor = _soft_label_donor(ctx, claim)
    stage_steps = steps.stage_steps("soft_label", claim.config)
    # Another job's soft labels cost no teacher run: never split. The steps decide the rest (a causal-LM
    # dataset of prompts is not split: its completions are written first, in one task).
    task_rows = ctx.settings.soft_label_task_rows
    splits = task_rows and donor is None
    step_config = {**claim.config, steps.SHARD_TASK_ROWS: task_rows} if splits else None
    run_claimed(
        ctx,
        claim,
        "soft_label",
        stage_steps,
        _hand_on_or_split,
        reuse_soft_labels_of=donor,
        step_config=step_config,
    )


def assemble_soft_labels(ctx: WorkerContext, claim: Claim, shards: int) -> None:
    """The end of a split stage, under the job's lease: every shard task's outputs pulled from the store,
    the whole stage run over them (it finds each shard vouched for by a part: no teacher runs), which writes
    the manifest; then the job is handed on as after a single task."""
    indexes = [shard_index(number) for number in range(shards)]
    assemble = steps.ASSEMBLE[claim.config.get("task", "classification")]
    run_claimed(ctx, claim, "soft_label", assemble, _hand_on_or_split, adopt=indexes)


def run_distill(ctx: WorkerContext, job_id: str) -> None:
    resumable = ("distilling", "evaluating", "exporting")
    claim = claim_job(ctx, job_id, ("soft_labeling", "distilling"), resumable=resumable)
    if claim is not None:
        run_claimed(ctx, claim, "distill", steps.stage_steps("distill", claim.config), _publish_and_succeed)


def claim_job(
    ctx: WorkerContext, job_id: str, first: tuple[str, str], resumable: tuple[str, ...]
) -> Claim | None:
    """Win the row for this stage, or take over a stage whose worker was lost; None: nothing to do here."""
    with session_scope(ctx.db) as session:
        job = lifecycle.claim(
            session,
            job_id,
            ctx.worker_id,
            first=first,
            resumable=resumable,
            lease_s=ctx.settings.worker_lease_s,
        )
        return None if job is None else claim_of(ctx, session, job)


def claim_of(ctx: WorkerContext, session: Session, job: Any) -> Claim:
    """What a task needs of a job it holds, read in the transaction that won it."""
    files = inputs.describe(ctx.storage, lifecycle.job_inputs(session, job))
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
    stage_steps: Sequence[tuple[str, Step]],
    on_success: Callable[[WorkerContext, Claim, dict[str, Any]], None],
    *,
    reuse_soft_labels_of: str | None = None,
    step_config: dict[str, Any] | None = None,
    adopt: Sequence[str] = (),
) -> None:
    """Fetch the inputs, run the steps in the sandboxed child, publish (`on_success` gets the steps'
    results): or end the attempt as `ending_of` says, which is the whole table of what can go wrong.
    `reuse_soft_labels_of`: a job whose stored soft labels are this one's (`lifecycle.soft_label_donor`);
    they are fetched first, and the stage finds its shards done instead of running the teacher again.
    `step_config`: what the steps get instead of the job's config. `adopt`: mirror indexes of the job's
    shard tasks, taken into its own before the pull."""
    work = ctx.work_dir(claim.job_id)
    mirror = WorkMirror(ctx.storage, claim.tenant_id, claim.job_id, work)
    watch = StageWatch(ctx, claim.job_id, claim.status, mirror)
    try:
        # Fetching a large dataset, or every shard of a split stage, may take longer than a lease.
        with watch.heartbeat():
            inputs.download(claim.files, work)
            if reuse_soft_labels_of is not None:
                _reuse_soft_labels(ctx, claim, reuse_soft_labels_of, work)
            if adopt:
                mirror.adopt(adopt)
            mirror.pull()
        results = run_steps(
            stage_steps,
            work,
            claim.config if step_config is None else step_config,
            sandbox=ctx.sandbox,
            on_message=watch.on_message,
            should_stop=watch.should_stop,
        )
        watch.settle(ctx.settings.worker_db_wait_s)
        with watch.heartbeat():
            watch.drain()
            mirror.push()
            on_success(ctx, claim, results)
    except Exception as exc:  # noqa: BLE001 - every failure becomes exactly one ending below
        ending = ending_of(exc, claim)
        log_ending(claim, stage, ending, exc)
        end_attempt(ctx, claim, stage, ending, watch, mirror)


def ending_of(exc: Exception, claim: Claim) -> Ending:
    """What a failure means for the job: its fault (fail), this attempt's (retry), or a stop we asked for."""
    if isinstance(exc, DistillError):
        return Ending("fail", exc.code, exc.message)
    if isinstance(exc, StageError):
        return Ending("fail", exc.code, exc.message)
    if isinstance(exc, ObjectNotFound):
        return Ending("fail", "input_missing", "an input file of this job no longer exists in storage")
    if isinstance(exc, ObjectChanged):
        return Ending("fail", "input_changed", f"{exc.detail}: register it again to use the new version")
    if isinstance(exc, StageStopped):
        if exc.reason == "timeout":
            return Ending(
                "timeout", "timeout", f"the job ran past its max_runtime_s of {claim.max_runtime_s} s"
            )
        if exc.reason == "shutdown":
            return Ending("shutdown", message="the worker shut down; the stage resumes on another worker")
        if exc.reason == "cancelled":
            return Ending("cancelled")
        return Ending("ignore", message=exc.reason)
    if isinstance(exc, StageCrashed):
        return Ending("retry", exc.code, exc.message)
    if isinstance(exc, SandboxUnavailable):
        # Fail closed: the user's model never runs unconfined. The job is not at fault; a worker whose
        # sandbox works can take it on the next attempt.
        return Ending("retry", "sandbox_unavailable", f"this worker cannot sandbox user models: {exc}")
    # Storage or database trouble on our side: this attempt is lost, not the job.
    return Ending("retry", "worker_error", f"{type(exc).__name__}: {exc}")


def log_ending(claim: Claim, stage: str, ending: Ending, exc: Exception) -> None:
    if isinstance(exc, StageStopped):
        log.info(
            "job %s: stage %s stopped (%s), child exit status %s",
            claim.job_id,
            stage,
            exc.reason,
            exc.exitcode,
        )
    elif isinstance(exc, StageError):
        log.error("job %s: stage %s failed: %s\n%s", claim.job_id, stage, exc.message, exc.detail)
    elif ending.kind == "retry" and ending.code == "worker_error":
        log.error("job %s: stage %s: worker error", claim.job_id, stage, exc_info=exc)
    elif ending.kind == "retry":
        log.warning("job %s: stage %s not finished: %s", claim.job_id, stage, ending.message)


def end_attempt(
    ctx: WorkerContext, claim: Claim, stage: str, ending: Ending, watch: StageWatch, mirror: WorkMirror
) -> None:
    work = ctx.work_dir(claim.job_id)
    if ending.kind == "fail":
        _fail(ctx, claim, ending, work)
    elif ending.kind == "timeout":
        partial.keep_partial_student(ctx, claim.tenant_id, claim.job_id, claim.config, work)
        _fail(ctx, claim, ending, work)
    elif ending.kind == "cancelled":
        if partial.wants_partial(ctx, claim.job_id):
            partial.keep_partial_student(ctx, claim.tenant_id, claim.job_id, claim.config, work)
        clear(work)
    elif ending.kind == "shutdown":
        # The child checkpointed on its way out: that checkpoint must reach the store before the job is
        # handed back, or the next worker resumes from an older epoch (or from scratch).
        watch.drain()
        with watch.heartbeat():
            mirror.push()
        _retry(ctx, claim, stage, None, ending.message)
    elif ending.kind == "retry":
        _retry(ctx, claim, stage, ending.code, ending.message)


def _soft_label_donor(ctx: WorkerContext, claim: Claim) -> str | None:
    with session_scope(ctx.db) as session:
        job = lifecycle.get_job_for_worker(session, claim.job_id)
        return None if job is None else lifecycle.soft_label_donor(session, job)


def _reuse_soft_labels(ctx: WorkerContext, claim: Claim, donor: str, work: Path) -> None:
    fetched = WorkMirror(ctx.storage, claim.tenant_id, donor, work).pull(("soft_labels",))
    if fetched:
        with session_scope(ctx.db) as session:
            data = {"from_job": donor, "files": fetched}
            lifecycle.record_event(session, claim.job_id, "soft_labels_reused", data)


def _shard_count(ctx: WorkerContext, claim: Claim) -> int:
    with session_scope(ctx.db) as session:
        return len(lifecycle.soft_label_shards(session, claim.job_id))


def _hand_on_or_split(ctx: WorkerContext, claim: Claim, results: dict[str, Any]) -> None:
    """The soft-label steps labelled the dataset: hand the job on. Or they found it past
    `soft_label_task_rows` rows and labelled nothing: split the stage into shard tasks."""
    answer = results.get("soft_label")
    rows = answer.get(steps.SPLIT_ROWS) if isinstance(answer, dict) else None
    if not isinstance(rows, dict):
        _hand_to_distill(ctx, claim)
        return
    # The child's answer is data: only whole numbers of rows of the known splits are planned from.
    counts = {split: rows[split] for split in SPLITS if type(rows.get(split)) is int}
    ranges = task_ranges(counts, steps.shard_size(claim.config), ctx.settings.soft_label_task_rows)
    if not ranges:
        raise StageError("stage_error", f"the soft-label stage answered no rows to label: {rows!r:.200}")

    def send() -> None:
        for number in range(len(ranges)):
            enqueue_shard(ctx, claim.job_id, number)

    with session_scope(ctx.db) as session:
        if lifecycle.plan_shards(session, claim.job_id, ctx.worker_id, ranges):
            on_commit(session, send)
        else:
            _clear_if_over(session, ctx, claim)


def _hand_to_distill(ctx: WorkerContext, claim: Claim) -> None:
    manifest = ctx.work_dir(claim.job_id) / "soft_labels" / "manifest.json"
    uploaded = [_upload(ctx, claim, "soft_labels_manifest.json", manifest)] if manifest.is_file() else []
    # A prompt-only dataset's completions, as the teacher wrote them: the dataset the student learns from.
    generated = ctx.work_dir(claim.job_id) / "soft_labels" / GENERATED
    if claim.config.get("generate") is not None and generated.is_file():
        uploaded.append(_upload(ctx, claim, GENERATED, generated))
    with session_scope(ctx.db) as session:
        # Handed on, not finished: the job waits (soft_labeling, progress 1) for a distill-queue worker.
        # Recorded only with the hand-over, in its transaction: a job cancelled meanwhile gets no artifact.
        if lifecycle.hand_back(session, claim.job_id, ctx.worker_id, {"progress": 1.0}):
            _record(session, claim, uploaded)
            on_commit(session, lambda: _enqueue(ctx, "distill", claim.job_id))
        else:
            _clear_if_over(session, ctx, claim)


def _publish_and_succeed(ctx: WorkerContext, claim: Claim, results: dict[str, Any]) -> None:
    out = ctx.work_dir(claim.job_id) / "out"
    # Uploads first, then one short transaction: no row lock is held while bytes move.
    uploaded = [
        _upload(ctx, claim, p.name, p)
        for p in sorted(out.iterdir())
        if p.is_file() and not p.name.startswith(".")
    ]
    with session_scope(ctx.db) as session:
        # Recorded only with the success, in its transaction: a job cancelled meanwhile shows no student.
        if lifecycle.finish_job(session, claim.job_id, _final_metrics(out / "report.json")):
            _record(session, claim, uploaded)
            on_commit(session, lambda: clear(ctx.work_dir(claim.job_id)))
        else:
            _clear_if_over(session, ctx, claim)


def _clear_if_over(session: Session, ctx: WorkerContext, claim: Claim) -> None:
    """The job moved on without us (cancelled or failed while the outputs uploaded): drop the scratch copy.
    The uploaded objects stay unreferenced under the job's prefix (its keys are shared with any other run)."""
    job = lifecycle.get_job_for_worker(session, claim.job_id)
    if job is None or job.status not in RUNNING:
        on_commit(session, lambda: clear(ctx.work_dir(claim.job_id)))


def _final_metrics(report_path: Path) -> dict[str, Any] | None:
    """The report's headline (student, teacher and baseline accuracy, KD gain, T and alpha) for the job row.
    The report comes from the sandboxed child: read with a size cap, and a bad one only costs the headline."""
    try:
        if report_path.stat().st_size > MAX_REPORT_BYTES:
            return None
        report = json.loads(report_path.read_bytes())
        return lm_headline(report) if report.get("task") == "causal_lm" else headline(report)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        log.warning("job report %s unreadable; the job keeps its last metrics", report_path)
        return None


def _upload(ctx: WorkerContext, claim: Claim, name: str, path: Path) -> tuple[str, str, int, str]:
    key = keys.artifact_key(claim.tenant_id, claim.job_id, name)
    size, sha = ctx.storage.upload_from(path, key)
    return name, key, size, sha


def _record(session: Session, claim: Claim, uploaded: list[tuple[str, str, int, str]]) -> None:
    for name, key, size, sha in uploaded:
        content_type = CONTENT_TYPES.get(Path(name).suffix, "application/octet-stream")
        lifecycle.add_artifact(session, claim.job_id, name, key, size, sha, content_type)


def _fail(ctx: WorkerContext, claim: Claim, ending: Ending, work: Path) -> None:
    assert ending.code is not None
    with session_scope(ctx.db) as session:
        lifecycle.fail_job(session, claim.job_id, ending.code, ending.message)
    clear(work)


def _retry(ctx: WorkerContext, claim: Claim, stage: str, code: str | None, message: str) -> None:
    """This attempt ended without a verdict on the job: retry the stage later, or give up after the last."""
    with session_scope(ctx.db) as session:
        delay = lifecycle.end_attempt(session, claim.job_id, ctx.worker_id, code, message)
        if delay is not None:
            on_commit(session, lambda: _enqueue(ctx, stage, claim.job_id, countdown=delay))


def _enqueue(ctx: WorkerContext, stage: str, job_id: str, countdown: float = 0) -> None:
    task, queue = STAGE_TASKS[stage]
    ctx.celery.send_task(task, args=[job_id], queue=queue, countdown=countdown or None)


def enqueue_shard(ctx: WorkerContext, job_id: str, number: int, countdown: float = 0) -> None:
    ctx.celery.send_task(
        TASK_SOFT_LABEL_SHARD, args=[job_id, number], queue=SOFT_LABEL_QUEUE, countdown=countdown or None
    )
