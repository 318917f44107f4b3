"""The reaper: finds jobs whose worker died and jobs whose task message was lost, and drives them again.

- A running job whose lease expired (its worker was SIGKILLed, OOM-killed, lost its machine) gets one
  `worker_lost` event, its lease cleared, and its stage's task sent again; that delivery takes the stage
  over (`claim_stage` counts the attempt and writes `resumed`) and resumes from the mirrored checkpoints,
  or fails the job with `worker_lost` once `max_attempts` is spent.
- A queued job, or a running one released between stages, that nobody touched for `stale_after_s` had its
  message lost (a crash between commit and enqueue, a broker restart without persistence): its task is
  sent again. A duplicate message is harmless: only one delivery wins `claim_stage`.
- The same for the shard tasks of a split soft-label stage: a shard whose lease expired goes back to
  waiting with a `worker_lost` event naming it, and its task is sent again (the next delivery resumes it
  from the shard files its lost worker mirrored); a waiting shard untouched for `stale_after_s` is re-sent.

Every worker runs a reaper thread; the compare-and-set on the row makes concurrent reapers act once.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime
from typing import Any

from celery import Celery
from celery.signals import worker_ready

from app.db import on_commit, session_scope
from app.db.base import utcnow
from app.jobs import lifecycle
from worker.tasks.context import WorkerContext, get_context

log = logging.getLogger(__name__)
STALE_AFTER_S = 300.0  # the default of `reaper_stale_after_s`
BATCH = 100
stage_of = lifecycle.stage_task_of


def reap_once(
    ctx: WorkerContext, *, now: datetime | None = None, stale_after_s: float = STALE_AFTER_S
) -> dict[str, list[str]]:
    """One pass; returns the job ids it re-drove, by reason. The stage tasks are sent after the commit."""
    from worker.tasks.jobs import _enqueue, enqueue_shard  # the tasks module imports this one's package

    with session_scope(ctx.db) as session:
        reaped = lifecycle.reap(session, now or utcnow(), stale_after_s, BATCH)
        resend, shards = dict(reaped.resend), list(reaped.shards)

        def send() -> None:
            for job_id, stage in resend.items():
                _enqueue(ctx, stage, job_id)
            for job_id, number in shards:
                enqueue_shard(ctx, job_id, number)

        on_commit(session, send)
    done = {"worker_lost": reaped.worker_lost, "requeued": reaped.requeued}
    if shards:
        done["shards"] = [f"{job_id}#{number}" for job_id, number in shards]
    if any(done.values()):
        log.warning("reaper: %s", {k: v for k, v in done.items() if v})
    return done


def run_forever(ctx: WorkerContext, stop: threading.Event, interval_s: float | None = None) -> None:
    interval = interval_s or ctx.settings.reaper_interval_s
    while not stop.wait(interval):
        try:
            reap_once(ctx, stale_after_s=ctx.settings.reaper_stale_after_s)
        except Exception:  # a database or broker outage: the next pass tries again
            log.exception("reaper pass failed")


_stop = threading.Event()


def _start(**_: Any) -> None:
    threading.Thread(target=run_forever, args=(get_context(), _stop), name="reaper", daemon=True).start()


def register(celery: Celery) -> None:
    """Every worker that `celery` starts runs a reaper thread once it is ready."""
    worker_ready.connect(_start, weak=False, dispatch_uid="distill-reaper")
