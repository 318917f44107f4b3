"""Idempotency under a real race: concurrent first requests with one key, each on its own connection and
committing for real, create exactly one job and all get it back."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import func, select

from app.db.session import Database, session_scope
from app.files.models import File
from app.jobs import service
from app.jobs.models import Job
from app.jobs.schemas import JobCreate
from app.tenants import service as tenants


def test_concurrent_requests_with_one_idempotency_key_create_one_job(committed_db: Database) -> None:
    with session_scope(committed_db) as session:
        tenant_id = tenants.get_or_create_tenant(session, "race").id
        files = [
            File(tenant_id=tenant_id, purpose=p, filename=p, size=1, sha256="0" * 64, key=f"k/{p}")
            for p in ("teacher", "dataset")
        ]
        session.add_all(files)
        session.flush()
        request = JobCreate(teacher_file_ids=[files[0].id], dataset_file_id=files[1].id)
    enqueued: list[str] = []
    start = threading.Barrier(6)

    def submit(_: int) -> tuple[str, bool]:
        start.wait()
        with session_scope(committed_db) as session:
            job, created = service.create_job(
                session, tenant_id, request, idempotency_key="same", enqueue=enqueued.append
            )
            return job.id, created

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(submit, range(6)))
    assert len({job_id for job_id, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert enqueued == [results[0][0]]  # enqueued once, by the request that created it
    with session_scope(committed_db) as session:
        assert session.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id)) == 1
