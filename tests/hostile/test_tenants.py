"""Tenants are invisible to each other: every route of the OpenAPI document, given another tenant's ids,
answers exactly what it answers for ids that do not exist; lists and job submissions never reveal them."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.config import Settings
from app.db.session import Database, session_scope
from app.jobs import lifecycle
from app.storage import LocalStorage, keys
from tests.app.conftest import Tenant
from tests.app.conftest import alice as alice  # noqa: F401  (fixtures reused)
from tests.app.conftest import app as app  # noqa: F401
from tests.app.conftest import bob as bob  # noqa: F401
from tests.app.conftest import broker as broker  # noqa: F401
from tests.app.conftest import client as client  # noqa: F401
from tests.app.conftest import connection as connection  # noqa: F401
from tests.app.conftest import db as db  # noqa: F401
from tests.app.conftest import engine as engine  # noqa: F401
from tests.app.conftest import enqueuer as enqueuer  # noqa: F401
from tests.app.conftest import pg_url as pg_url  # noqa: F401
from tests.app.conftest import settings as settings  # noqa: F401
from tests.app.conftest import storage as storage  # noqa: F401
from tests.support.api import inputs, job_body

PUBLIC = {"/healthz", "/readyz"}
MISSING = {"file_id": "file_0000000000000000", "job_id": "job_0000000000000000", "name": "student.onnx"}


@pytest.fixture
def alices_things(
    client: TestClient,  # noqa: F811
    alice: Tenant,  # noqa: F811
    db: Database,  # noqa: F811
    storage: LocalStorage,  # noqa: F811
) -> dict[str, str]:
    teacher, dataset = inputs(client, alice.headers)
    job = client.post("/v1/jobs", headers=alice.headers, json=job_body(teacher, dataset)).json()
    with session_scope(db) as session:
        tenant_id = lifecycle.get_job_for_worker(session, job["id"]).tenant_id  # type: ignore[union-attr]
        key = keys.artifact_key(tenant_id, job["id"], "student.onnx")
        size, sha = storage.put_stream(key, iter([b"onnx bytes"]))
        lifecycle.add_artifact(session, job["id"], "student.onnx", key, size, sha, "application/octet-stream")
    return {"file_id": teacher, "job_id": job["id"], "name": "student.onnx", "dataset_id": dataset}


def routes_with_ids(app: FastAPI) -> list[tuple[str, str]]:  # noqa: F811
    found = []
    for path, item in app.openapi()["paths"].items():
        if path not in PUBLIC and "{" in path:
            found += [(method.upper(), path) for method in item]
    return found


def fill(path: str, ids: dict[str, str]) -> str:
    return re.sub(r"\{([^}]+)\}", lambda m: ids[m.group(1)], path)


def comparable(response: Any, ids: dict[str, str]) -> tuple[int, str, str]:
    """Status, content type and body, with the id that was asked for blanked (the only allowed difference)."""
    body = response.text
    for value in ids.values():
        body = body.replace(value, "<id>")
    return response.status_code, response.headers.get("content-type", ""), body


def test_every_route_treats_another_tenants_ids_as_missing(
    app: FastAPI,  # noqa: F811
    client: TestClient,  # noqa: F811
    alice: Tenant,  # noqa: F811
    bob: Tenant,  # noqa: F811
    alices_things: dict[str, str],
) -> None:
    routes = routes_with_ids(app)
    assert len(routes) >= 7, routes  # files get/delete, job, events, cancel, artifacts, one artifact
    for method, path in routes:
        theirs = client.request(method, fill(path, alices_things), headers=bob.headers)
        missing = client.request(method, fill(path, MISSING), headers=bob.headers)
        assert theirs.status_code == 404, (method, path, theirs.text)
        assert comparable(theirs, alices_things) == comparable(missing, MISSING), (method, path)
    # and nothing of Alice's changed: her job is still queued, her file still there, her artifact intact
    job = client.get(f"/v1/jobs/{alices_things['job_id']}", headers=alice.headers).json()
    assert job["status"] == "queued"
    assert client.get(f"/v1/files/{alices_things['file_id']}", headers=alice.headers).status_code == 200
    art = client.get(f"/v1/jobs/{alices_things['job_id']}/artifacts/student.onnx", headers=alice.headers)
    assert art.status_code == 200 and art.content == b"onnx bytes"


def test_every_route_needs_a_valid_key_even_for_ids_that_exist(
    app: FastAPI,  # noqa: F811
    client: TestClient,  # noqa: F811
    alices_things: dict[str, str],
) -> None:
    for path, item in app.openapi()["paths"].items():
        for method in item if path not in PUBLIC else ():
            for headers in ({}, {"Authorization": "Bearer dsk_forged"}):
                response = client.request(method.upper(), fill(path, alices_things), headers=headers)
                assert response.status_code == 401, (method, path, response.text)
                assert response.json()["code"] == "unauthorized"


def test_lists_never_show_another_tenants_rows(
    client: TestClient,  # noqa: F811
    alice: Tenant,  # noqa: F811
    bob: Tenant,  # noqa: F811
    alices_things: dict[str, str],
) -> None:
    for path in ("/v1/files", "/v1/jobs", "/v1/jobs?status=queued", "/v1/files?purpose=teacher"):
        assert client.get(path, headers=alice.headers).json()["data"], path
        assert client.get(path, headers=bob.headers).json() == {"data": [], "next_cursor": None}, path


def test_a_job_cannot_use_another_tenants_files(
    client: TestClient,  # noqa: F811
    bob: Tenant,  # noqa: F811
    alices_things: dict[str, str],
) -> None:
    theirs = client.post(
        "/v1/jobs", headers=bob.headers, json=job_body(alices_things["file_id"], alices_things["dataset_id"])
    )
    missing = client.post(
        "/v1/jobs", headers=bob.headers, json=job_body("file_0000000000000000", "file_0000000000000001")
    )
    assert theirs.status_code == missing.status_code == 422
    assert [e["message"].split("'")[0] for e in theirs.json()["errors"]] == [
        e["message"].split("'")[0] for e in missing.json()["errors"]
    ]
    assert client.get("/v1/jobs", headers=bob.headers).json()["data"] == []


@pytest.mark.parametrize(
    "env",
    [
        {"s3_secret_access_key": "changeme"},
        {"webhook_secret": "secret"},
        {"database_url": "postgresql+psycopg://distill:password@db/distill"},
        {"broker_url": "redis://:changeme@redis:6379/0"},
    ],
)
@pytest.mark.parametrize("environment", ["production", "test"])
def test_settings_refuse_placeholder_secrets_outside_development(environment: str, env: dict) -> None:
    with pytest.raises(ValueError, match="placeholder secret"):
        Settings(environment=environment, **env)
    Settings(environment="development", **env)
