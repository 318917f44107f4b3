"""Every route needs a valid key (enumerated from the OpenAPI document), errors are problem+json,
an unreachable database is a 503 and never a 500, and the health probes report each dependency."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.config import Settings
from app.db.session import Database, session_scope
from app.jobs import lifecycle
from app.main import create_app
from app.storage import LocalStorage, keys
from app.tenants import service as tenants
from tests.app.conftest import Tenant
from tests.support.api import assert_problem, inputs, job_body
from tests.support.processes import free_port

PUBLIC = {"/healthz", "/readyz"}


def authenticated_routes(app: FastAPI) -> list[tuple[str, str]]:
    routes = []
    for path, item in app.openapi()["paths"].items():
        if path in PUBLIC or not path.startswith("/v1/"):
            continue
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        routes += [(method.upper(), concrete) for method in item]
    return routes


def test_every_api_route_answers_401_without_a_valid_key(
    app: FastAPI, client: TestClient, db: Database
) -> None:
    routes = authenticated_routes(app)
    assert len(routes) >= 10
    with session_scope(db) as session:
        revoked = tenants.create_key(session, "carol")
        tenants.revoke_key(session, revoked)
    for headers in (
        {},
        {"Authorization": "Bearer dsk_not-a-key"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": f"Bearer {revoked}"},
    ):
        for method, path in routes:
            response = client.request(method, path, headers=headers)
            assert_problem(response, 401, "unauthorized")
            assert response.headers["www-authenticate"] == "Bearer", (method, path)


def test_unknown_routes_and_methods_are_problems_too(client: TestClient, alice: Tenant) -> None:
    assert_problem(client.get("/v2/nothing", headers=alice.headers), 404, "not_found")
    assert_problem(client.put("/v1/jobs", headers=alice.headers), 405, "method_not_allowed")


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}


@pytest.fixture
def broken_client(tmp_path: Path) -> TestClient:
    """An app whose database and broker listen nowhere."""
    port = free_port()
    settings = Settings(
        environment="test",
        database_url=f"postgresql+psycopg://postgres@127.0.0.1:{port}/nothing",
        broker_url=f"redis://127.0.0.1:{port}/0",
        storage_path=tmp_path / "objects",
        readiness_timeout_s=1,
    )
    return TestClient(create_app(settings, storage=LocalStorage(tmp_path / "objects")))


def test_an_unreachable_database_is_503_not_500(broken_client: TestClient) -> None:
    body = assert_problem(
        broken_client.get("/v1/jobs", headers={"Authorization": "Bearer dsk_x"}), 503, "database_unavailable"
    )
    assert "password" not in body["detail"] and "127.0.0.1" not in body["detail"]
    ready = broken_client.get("/readyz")
    assert ready.status_code == 503
    checks = ready.json()["checks"]
    assert checks["storage"] == "ok" and checks["database"] != "ok" and checks["broker"] != "ok"
    assert broken_client.get("/healthz").status_code == 200


def test_settings_refuse_placeholder_secrets_outside_development() -> None:
    with pytest.raises(ValueError, match="placeholder secret"):
        Settings(environment="production", s3_secret_access_key="changeme")
    with pytest.raises(ValueError, match="DISTILL_DATABASE_URL"):
        Settings(environment="production", database_url="postgresql+psycopg://distill:changeme@db/distill")
    Settings(environment="development", s3_secret_access_key="changeme")  # fine on a laptop


def test_another_tenants_ids_look_missing_on_every_route_with_an_id(
    app: FastAPI, client: TestClient, alice: Tenant, bob: Tenant, db: Database, storage: LocalStorage
) -> None:
    teacher, dataset = inputs(client, alice.headers)
    job_id = client.post("/v1/jobs", headers=alice.headers, json=job_body(teacher, dataset)).json()["id"]
    with session_scope(db) as session:
        job = lifecycle.get_job_for_worker(session, job_id)
        assert job is not None
        key = keys.artifact_key(job.tenant_id, job_id, "report.json")
        size, sha = storage.put_stream(key, iter([b"{}"]))
        lifecycle.add_artifact(session, job_id, "report.json", key, size, sha, "application/json")
    real = {"file_id": teacher, "job_id": job_id, "name": "report.json"}
    fake = {"file_id": "file_" + "0" * 24, "job_id": "job_" + "0" * 24, "name": "report.json"}
    checked = 0
    for path, item in app.openapi()["paths"].items():
        if "{" not in path:
            continue
        for method in item:
            urls = [
                re.sub(r"\{([^}]+)\}", lambda m, ids=ids: ids.get(m.group(1), "x"), path)
                for ids in (real, fake)
            ]
            theirs, nobody = (client.request(method.upper(), url, headers=bob.headers) for url in urls)
            assert theirs.status_code == nobody.status_code == 404, (method, path)
            assert theirs.json() == nobody.json(), (method, path)
            checked += 1
    assert checked >= 7
    # the ids were real: the owner still sees (and still has) all of it
    assert client.get(f"/v1/files/{teacher}", headers=alice.headers).status_code == 200
    assert client.get(f"/v1/jobs/{job_id}/artifacts/report.json", headers=alice.headers).content == b"{}"
    assert client.get(f"/v1/jobs/{job_id}", headers=alice.headers).json()["status"] == "queued"


def test_a_nul_character_is_a_4xx_never_a_500(client: TestClient, alice: Tenant) -> None:
    # Found by schemathesis: PostgreSQL cannot store NUL, so such input must be refused, not crash.
    teacher, dataset = inputs(client, alice.headers)
    bad_id = job_body("file_\x00x", dataset)
    assert_problem(client.post("/v1/jobs", json=bad_id, headers=alice.headers), 422, "validation_error")
    bad_metadata = job_body(teacher, dataset, metadata={"note": "a\x00b"})
    assert_problem(client.post("/v1/jobs", json=bad_metadata, headers=alice.headers), 400, "invalid_input")
