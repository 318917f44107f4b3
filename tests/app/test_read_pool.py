"""The async read pool behind `GET /v1/jobs/{id}`, against committed rows (its connections cannot see a test
transaction), and its failure mode: an unreachable database is a 503."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from fastapi.testclient import TestClient

from app.config import Settings
from app.db.session import Database, session_scope
from app.jobs.models import Job
from app.jobs.schemas import JobOut, job_out
from app.main import create_app
from app.queue import CeleryEnqueuer
from app.storage import LocalStorage
from app.tenants import service as tenants
from tests.support.api import assert_problem, inputs, job_body
from tests.support.processes import free_port


def test_get_job_reads_through_the_async_pool(
    committed_db: Database, pg_url: str, tmp_path: Path, enqueuer: CeleryEnqueuer
) -> None:
    settings = Settings(environment="test", database_url=pg_url, storage_path=tmp_path / "o")
    app = create_app(settings, db=committed_db, storage=LocalStorage(tmp_path / "o"), enqueue=enqueuer)
    with session_scope(committed_db) as session:
        a = {"Authorization": f"Bearer {tenants.create_key(session, 'pool-a')}"}
        b = {"Authorization": f"Bearer {tenants.create_key(session, 'pool-b')}"}
    with TestClient(app) as client:
        teacher, dataset = inputs(client, a)
        created = client.post("/v1/jobs", headers=a, json=job_body(teacher, dataset)).json()
        for _ in range(7):  # past psycopg's threshold, the statement is prepared on the server
            fetched = client.get(f"/v1/jobs/{created['id']}", headers=a)
            assert fetched.status_code == 200 and fetched.json() == created
        assert created["created_at"].endswith("Z")
        assert_problem(client.get(f"/v1/jobs/{created['id']}", headers=b), 404, "job_not_found")
        assert committed_db._read_pool is not None and committed_db._read_pool._idle


def test_the_json_postgresql_renders_is_what_job_out_renders(
    committed_db: Database, pg_url: str, tmp_path: Path, enqueuer: CeleryEnqueuer
) -> None:
    """The polled read gets its body from PostgreSQL (json_build_object); the other reads from `job_out`.
    Every field, both timestamp shapes (whole second and microseconds), an error, nested metrics."""
    settings = Settings(environment="test", database_url=pg_url, storage_path=tmp_path / "o")
    app = create_app(settings, db=committed_db, storage=LocalStorage(tmp_path / "o"), enqueue=enqueuer)
    with session_scope(committed_db) as session:
        a = {"Authorization": f"Bearer {tenants.create_key(session, 'json-a')}"}
    with TestClient(app) as client:
        teacher, dataset = inputs(client, a)
        body = job_body(teacher, dataset, metadata={"team": "ml-\u00e9", "n": [1, 2.5, {"deep": None}]})
        job_id = client.post("/v1/jobs", headers=a, json=body).json()["id"]
        with session_scope(committed_db) as session:
            job = session.get(Job, job_id)
            assert job is not None
            job.status, job.stage, job.progress, job.epoch = "failed", "distilling", 1 / 3, 7
            job.metrics = {"val_acc": 0.8765432109876543, "loss": {"kd": 1e-07, "ce": 2.0}, "ok": True}
            job.error_code, job.error_message = "worker_lost", 'the worker died "twice"\nline 2'
            job.attempts, job.max_runtime_s = 2, 3600
            job.soft_labeling_at = datetime(2026, 11, 28, 1, 2, 3, tzinfo=UTC)  # whole second: no fraction
            job.distilling_at = datetime(2026, 11, 28, 1, 2, 3, 450, tzinfo=UTC)
            job.failed_at = datetime(2026, 11, 28, 1, 2, 4, 999999, tzinfo=UTC)
        with session_scope(committed_db) as session:
            job = session.get(Job, job_id)
            expected = job_out(job).model_dump(mode="json")
        polled = client.get(f"/v1/jobs/{job_id}", headers=a)
        listed = client.get("/v1/jobs", headers=a).json()["data"]
    assert polled.status_code == 200 and polled.headers["content-type"] == "application/json"
    assert polled.json() == expected == next(j for j in listed if j["id"] == job_id)
    assert list(polled.json()) == list(JobOut.model_fields)
    assert expected["timestamps"]["soft_labeling"] == "2026-11-28T01:02:03Z"
    assert expected["timestamps"]["distilling"] == "2026-11-28T01:02:03.000450Z"


def test_an_unreachable_database_on_the_read_pool_is_503(tmp_path: Path) -> None:
    port = free_port()
    settings = Settings(
        environment="test",
        database_url=f"postgresql+psycopg://u@127.0.0.1:{port}/x",
        storage_path=tmp_path / "o",
        key_cache_ttl_s=60,
    )
    app = create_app(settings, storage=LocalStorage(tmp_path / "o"))
    app.state.key_cache.put(tenants.hash_key("dsk_cached"), "ten_cached")  # auth passes from the cache
    with TestClient(app) as client:
        response = client.get("/v1/jobs/job_x", headers={"Authorization": "Bearer dsk_cached"})
    assert_problem(response, 503, "database_unavailable")
