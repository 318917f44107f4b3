"""Per-tenant caps answer 429 with Retry-After; cancel of a finished job is 409; a job cancelled while it
waited never starts, even when the delivery arrives after the cancel (every worker was down)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.db.session import Database, session_scope
from app.jobs import lifecycle
from tests.app.conftest import REDIS_URL, Tenant
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
from tests.app.conftest import storage as storage  # noqa: F401
from tests.support.api import assert_problem, inputs, job_body


@pytest.fixture
def settings(pg_url: str, tmp_path: Path) -> Settings:  # noqa: F811
    return Settings(
        environment="test",
        database_url=pg_url,
        broker_url=REDIS_URL,
        storage_path=tmp_path / "objects",
        key_cache_ttl_s=0,
        max_active_jobs_per_tenant=3,
        max_queued_jobs_per_tenant=2,
    )


def submit(client: TestClient, tenant: Tenant, files: tuple[str, str], key: str | None = None):  # type: ignore[no-untyped-def]  # noqa: F811
    headers = {**tenant.headers, **({"Idempotency-Key": key} if key else {})}
    return client.post("/v1/jobs", headers=headers, json=job_body(*files))


def start(db: Database, job_id: str) -> None:  # noqa: F811
    with session_scope(db) as session:
        assert lifecycle.claim_stage(session, job_id, "queued", "soft_labeling", "w1") is not None


def test_queued_and_active_caps_answer_429_with_retry_after(
    client: TestClient,  # noqa: F811
    db: Database,  # noqa: F811
    alice: Tenant,  # noqa: F811
    bob: Tenant,  # noqa: F811
) -> None:
    files = inputs(client, alice.headers)
    first = submit(client, alice, files, key="one").json()["id"]
    assert submit(client, alice, files).status_code == 201
    over = submit(client, alice, files)
    body = assert_problem(over, 429, "too_many_jobs")
    assert int(over.headers["retry-after"]) > 0 and "queued" in body["detail"]
    assert submit(client, alice, files, key="one").status_code == 200  # a replay is not a new job
    assert submit(client, bob, inputs(client, bob.headers)).status_code == 201  # caps are per tenant

    start(db, first)  # one starts: a queue slot frees up
    waiting = submit(client, alice, files)
    assert waiting.status_code == 201
    assert_problem(submit(client, alice, files), 429, "too_many_jobs")  # 1 running + 2 queued

    assert client.post(f"/v1/jobs/{waiting.json()['id']}/cancel", headers=alice.headers).status_code == 200
    assert submit(client, alice, files).status_code == 201  # a cancelled job frees its slot


def test_the_active_cap_counts_running_jobs(
    client: TestClient,  # noqa: F811
    db: Database,  # noqa: F811
    alice: Tenant,  # noqa: F811
) -> None:
    files = inputs(client, alice.headers)
    for _ in range(2):
        start(db, submit(client, alice, files).json()["id"])
    assert submit(client, alice, files).status_code == 201  # 2 running + 1 queued
    over = submit(client, alice, files)  # the queue has room (1 of 2) but the tenant has 3 active
    body = assert_problem(over, 429, "too_many_jobs")
    assert "queued or running" in body["detail"]


def test_cancelling_a_finished_job_is_409(
    client: TestClient,  # noqa: F811
    db: Database,  # noqa: F811
    alice: Tenant,  # noqa: F811
) -> None:
    job_id = submit(client, alice, inputs(client, alice.headers)).json()["id"]
    with session_scope(db) as session:
        for src, dst in (
            ("queued", "soft_labeling"),
            ("soft_labeling", "distilling"),
            ("distilling", "evaluating"),
            ("evaluating", "exporting"),
        ):
            assert lifecycle.claim_stage(session, job_id, src, dst, "w1") is not None
        assert lifecycle.finish_job(session, job_id)
    body = assert_problem(
        client.post(f"/v1/jobs/{job_id}/cancel", headers=alice.headers), 409, "job_finished"
    )
    assert "succeeded" in body["detail"]
    assert client.get(f"/v1/jobs/{job_id}", headers=alice.headers).json()["status"] == "succeeded"
