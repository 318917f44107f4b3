"""What a stopped stage leaves the user: the last student checkpoint, as the artifact `partial_student.pt`.

Kept when a job runs past its `max_runtime_s` (it then fails with `timeout`) and when a user cancels with
`keep_partial=true`. The weights are read from the work folder by a fresh child: the parent never loads
torch, and the stopped child may have been SIGKILLed after its grace.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from app.db import session_scope
from app.jobs import lifecycle
from app.storage import keys
from worker.supervisor import run_steps
from worker.tasks import steps
from worker.tasks.context import WorkerContext

log = logging.getLogger(__name__)


def keep_partial_student(
    ctx: WorkerContext, tenant_id: str, job_id: str, config: dict[str, Any], work: Path
) -> bool:
    """Upload the newest student weights of `work` and record them; False when no epoch ever finished
    or keeping them failed (logged: the job's verdict must not wait on its leftovers)."""
    try:
        return _keep(ctx, tenant_id, job_id, config, work)
    except Exception:
        log.exception("job %s: could not keep the partial student", job_id)
        return False


def _keep(ctx: WorkerContext, tenant_id: str, job_id: str, config: dict[str, Any], work: Path) -> bool:
    results = run_steps(
        [("partial_student", steps.partial_student_step)],
        work,
        config,
        sandbox=ctx.sandbox,
        on_message=lambda _: None,
        should_stop=lambda: None,
    )
    name = results.get("partial_student")
    if not name:
        return False
    key = keys.artifact_key(tenant_id, job_id, name)
    size, sha = ctx.storage.upload_from(work / "partial" / name, key)
    with session_scope(ctx.db) as session:
        lifecycle.add_artifact(session, job_id, name, key, size, sha, "application/octet-stream")
    log.info("job %s: kept %s (%d bytes)", job_id, name, size)
    return True


def wants_partial(ctx: WorkerContext, job_id: str) -> bool:
    with session_scope(ctx.db) as session:
        job = lifecycle.get_job_for_worker(session, job_id)
        return job is not None and job.status == "cancelled" and bool(job.keep_partial)
