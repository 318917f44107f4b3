"""Per-tenant caps on jobs: one tenant cannot fill the queue or hold every worker.

Checked when a job is submitted (after an idempotent replay, which costs nothing). The tenant's row is
locked for the count, so two concurrent submissions cannot both take the last slot (PostgreSQL; SQLite
serialises writers anyway). Over a cap the answer is 429 with Retry-After.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import AppError
from app.jobs import repository as jobs_repository
from app.jobs.state import RUNNING
from app.tenants import repository as tenants_repository

QUEUED_RETRY_AFTER_S = 30
ACTIVE_RETRY_AFTER_S = 60


class TooManyJobs(AppError):
    status, code, title = 429, "too_many_jobs", "Too many jobs"


@dataclass(frozen=True)
class JobCaps:
    max_active: int  # queued or running: the tenant's concurrent jobs
    max_queued: int  # waiting for a worker

    @classmethod
    def from_settings(cls, settings: Settings) -> JobCaps:
        return cls(settings.max_active_jobs_per_tenant, settings.max_queued_jobs_per_tenant)


def check_job_caps(session: Session, tenant_id: str, caps: JobCaps) -> None:
    """Raise TooManyJobs if one more queued job would pass a cap; the caller then inserts it."""
    tenants_repository.lock(session, tenant_id)
    counts = jobs_repository.count_active_by_status(session, tenant_id, ("queued", *RUNNING))
    queued = counts.pop("queued", 0)
    running = sum(counts.values())
    if queued >= caps.max_queued:
        raise TooManyJobs(
            f"{queued} jobs are already queued (the cap is {caps.max_queued}); "
            "retry once some have started, or cancel some",
            headers={"Retry-After": str(QUEUED_RETRY_AFTER_S)},
        )
    if queued + running >= caps.max_active:
        raise TooManyJobs(
            f"{queued + running} jobs are queued or running (the cap is {caps.max_active}); "
            "retry when one finishes",
            headers={"Retry-After": str(ACTIVE_RETRY_AFTER_S)},
        )
