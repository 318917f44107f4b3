"""The reaper: finds jobs whose worker died and jobs whose task message was lost, and drives them again.

- A running job whose lease expired (its worker was SIGKILLed, OOM-killed, lost its machine) gets one
  `worker_lost` event, its lease cleared, and its stage's task sent again; that delivery takes the stage
  over (`claim_stage` counts the attempt and writes `resumed`) and resumes from the mirrored checkpoints,
  or fails the job with `worker_lost` once `max_attempts` is spent.
- A queued job, or a running one released between stages, that nobody touched for `stale_after_s` had its
  message lost (a crash between commit and enqueue, a broker restart without persistence): its task is
  sent again. A duplicate message is harmless: only one delivery wins `claim_stage`.

Every worker runs a reaper thread; the compare-and-set on the row makes concurrent reapers act once.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta
from typing import Any

from celery.signals import worker_ready

from app.db import on_commit, session_scope
from app.db.base import utcnow
from app.jobs import repository, service
from app.jobs.models import Job
from app.jobs.state import RUNNING
from worker.tasks.context import WorkerContext, get_context

log = logging.getLogger(__name__)
STALE_AFTER_S = 300.0  # the default of `reaper_stale_after_s`
BATCH = 100


def stage_of(status: str, handed_over: bool) -> str:
    """The task that continues a job in `status`; `handed_over`: soft labels done and released to distill."""
    if status == "queued" or (status == "soft_labeling" and not handed_over):
        return "soft_label"
    return "distill"


def reap_once(
    ctx: WorkerContext, *, now: datetime | None = None, stale_after_s: float = STALE_AFTER_S
) -> dict[str, list[str]]:
    """One pass; returns the job ids it re-drove, by reason."""
    from worker.tasks.jobs import _enqueue  # the tasks module imports this one's package

    now = now or utcnow()
    done: dict[str, list[str]] = {"worker_lost": [], "requeued": []}
    handed: dict[str, bool] = {}
    with session_scope(ctx.db) as session:
        for job in service.jobs_with_expired_lease(session, now, BATCH):
            taken = repository.update_if_status(
                session,
                job.id,
                job.status,
                {"lease_owner": None, "lease_expires_at": None, "updated_at": now},
                Job.lease_owner == job.lease_owner,
                Job.lease_expires_at < now,
            )
            if taken:
                service.add_event(
                    session,
                    job.id,
                    "worker_lost",
                    {"stage": job.status, "worker_id": job.lease_owner, "attempt": job.attempts},
                )
                done["worker_lost"].append(job.id)
        before = now - timedelta(seconds=stale_after_s)
        for job in repository.stale_unleased(session, ("queued", *RUNNING), before, BATCH):
            if repository.update_if_status(
                session, job.id, job.status, {"updated_at": now}, Job.updated_at == job.updated_at
            ):
                done["requeued"].append(job.id)
                handed[job.id] = job.status == "soft_labeling" and (job.progress or 0) >= 1.0
        states = {j: repository.current_state(session, j) for ids in done.values() for j in ids}

        def send() -> None:
            for job_id, state in states.items():
                if state is not None:
                    _enqueue(ctx, stage_of(state[0], handed.get(job_id, False)), job_id)

        on_commit(session, send)
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


@worker_ready.connect
def _start(**_: Any) -> None:
    threading.Thread(target=run_forever, args=(get_context(), _stop), name="reaper", daemon=True).start()
