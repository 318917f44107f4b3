"""`distill.soft_label_shard(job_id, number)`: one task of a soft-label stage split over workers.

`distill.soft_label` splits a large dataset's stage (`jobs._hand_on_or_split`: one shard row per row range,
the job's lease handed back, a task per shard sent after the commit). Each task here claims its shard
(`lifecycle.claim_shard`: a compare-and-set, so a second delivery is a no-op), labels its rows in the
sandboxed child (`soft_label_rows`: the same shard files a single task writes, and a part file vouching for
them), mirrors them under the shard's own index, and finishes the shard. The worker whose shard was the last
gets the job's lease in that same transaction and ends the stage (`jobs.assemble_soft_labels`): exactly one
worker hands the job on to distillation.

Everything that can end an attempt ends a shard's as it ends a stage's (`jobs.ending_of`): the job fails
naming the shard, the shard is retried (back to waiting, its task re-sent), handed back at a warm shutdown,
or stopped for a cancel or `max_runtime_s`, which the watch reads from the job row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from celery import Celery

from app.db import on_commit, session_scope
from app.jobs import lifecycle
from app.jobs.state import RUNNING
from app.queue import TASK_SOFT_LABEL_SHARD
from worker.distill.shard_plan import part_name, shard_indices, shard_name
from worker.supervisor import run_steps
from worker.tasks import inputs, steps
from worker.tasks.context import WorkerContext, get_context
from worker.tasks.jobs import (
    RETRY_OPTIONS,
    Claim,
    Ending,
    assemble_soft_labels,
    claim_of,
    ending_of,
    enqueue_shard,
    log_ending,
)
from worker.tasks.watch import StageWatch
from worker.tasks.workspace import WorkMirror, clear, shard_index

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardClaim:
    job: Claim
    number: int
    split: str
    start: int
    end: int
    shards: int  # how many shard tasks the stage has

    @property
    def rows(self) -> dict[str, Any]:
        return {"split": self.split, "start": self.start, "end": self.end}

    def files(self) -> list[str]:
        """The work-folder files this task writes, the only ones it mirrors."""
        indices = shard_indices(self.start, self.end, steps.shard_size(self.job.config))
        names = [shard_name(self.split, i) for i in indices] + [part_name(self.split, indices.start)]
        return [f"soft_labels/{name}" for name in names]


def soft_label_shard(job_id: str, number: int) -> None:
    run_soft_label_shard(get_context(), job_id, number)


def register(celery: Celery) -> None:
    celery.task(name=TASK_SOFT_LABEL_SHARD, **RETRY_OPTIONS)(soft_label_shard)


def run_soft_label_shard(ctx: WorkerContext, job_id: str, number: int) -> None:
    shard = claim_shard(ctx, job_id, number)
    if shard is None:
        return
    work = ctx.work_dir(job_id)
    claim = shard.job
    mirror = WorkMirror(
        ctx.storage, claim.tenant_id, job_id, work, index=shard_index(number), files=shard.files()
    )
    watch = StageWatch(ctx, job_id, "soft_labeling", mirror, shard=number)
    try:
        with watch.heartbeat():
            inputs.download(claim.files, work)
            mirror.pull()  # what an earlier attempt of this shard finished, on any machine
        run_steps(
            steps.SHARD_STEPS[claim.config.get("task", "classification")],
            work,
            {**claim.config, steps.SHARD_ROWS: shard.rows},
            sandbox=ctx.sandbox,
            on_message=watch.on_message,
            should_stop=watch.should_stop,
        )
        watch.settle(ctx.settings.worker_db_wait_s)
        with watch.heartbeat():
            watch.drain()
            mirror.push()
            last = finish_shard(ctx, shard)
    except Exception as exc:  # noqa: BLE001 - every failure becomes exactly one ending below
        ending = ending_of(exc, claim)
        log_ending(claim, f"soft_label shard {number}", ending, exc)
        end_shard_attempt(ctx, shard, ending, watch, mirror)
        return
    if last is not None:
        assemble_soft_labels(ctx, last, shard.shards)


def claim_shard(ctx: WorkerContext, job_id: str, number: int) -> ShardClaim | None:
    with session_scope(ctx.db) as session:
        won = lifecycle.claim_shard(
            session, job_id, number, ctx.worker_id, lease_s=ctx.settings.worker_lease_s
        )
        if won is None:
            return None
        job, shard = won
        count = len(lifecycle.soft_label_shards(session, job_id))
        return ShardClaim(
            claim_of(ctx, session, job), number, shard.split, shard.row_start, shard.row_end, count
        )


def finish_shard(ctx: WorkerContext, shard: ShardClaim) -> Claim | None:
    """Record the shard done; the job's claim when it was the last, for this worker to end the stage."""
    with session_scope(ctx.db) as session:
        job = lifecycle.finish_shard(
            session, shard.job.job_id, shard.number, ctx.worker_id, lease_s=ctx.settings.worker_lease_s
        )
        return None if job is None else claim_of(ctx, session, job)


def end_shard_attempt(
    ctx: WorkerContext, shard: ShardClaim, ending: Ending, watch: StageWatch, mirror: WorkMirror
) -> None:
    job_id, number = shard.job.job_id, shard.number
    work = ctx.work_dir(job_id)
    if ending.kind in ("fail", "timeout"):
        assert ending.code is not None
        with session_scope(ctx.db) as session:
            if ending.kind == "fail":
                lifecycle.fail_shard(session, job_id, number, ending.code, ending.message)
            else:
                lifecycle.fail_job(session, job_id, ending.code, ending.message)
        clear(work)
    elif ending.kind == "cancelled":
        clear(work)
    elif ending.kind == "ignore":  # another shard failed the job, or the shard went to another worker
        with session_scope(ctx.db) as session:
            job = lifecycle.get_job_for_worker(session, job_id)
            if job is None or job.status not in RUNNING:
                on_commit(session, lambda: clear(work))
    elif ending.kind in ("shutdown", "retry"):
        if ending.kind == "shutdown":  # what the child finished must reach the store before the hand-back
            watch.drain()
            with watch.heartbeat():
                mirror.push()
        with session_scope(ctx.db) as session:
            code = ending.code if ending.kind == "retry" else None
            delay = lifecycle.end_shard_attempt(session, job_id, number, ctx.worker_id, code, ending.message)
            if delay is not None:
                on_commit(session, lambda: enqueue_shard(ctx, job_id, number, countdown=delay))
