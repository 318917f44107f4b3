"""The async read pool behind `GET /v1/jobs/{id}`, against committed rows (its connections cannot see a test
transaction), and its failure mode: an unreachable database is a 503."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from app.config import Settings
from app.db.session import Database, session_scope
from app.main import create_app
from app.queue import CeleryEnqueuer
from app.storage import LocalStorage
from app.tenants import service as tenants
from tests.app.helpers import assert_problem, inputs, job_body
from tests.app.test_auth_and_errors import closed_port


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


def test_an_unreachable_database_on_the_read_pool_is_503(tmp_path: Path) -> None:
    port = closed_port()
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
