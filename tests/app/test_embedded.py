"""The embedded default: SQLite, a local folder and the SQLAlchemy broker transport, no servers at all."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from kombu import Connection

from app.config import Settings
from app.db import migrate
from app.db.session import session_scope
from app.jobs import lifecycle
from app.main import create_app
from app.tenants import service as tenants
from tests.support.api import inputs, job_body


def test_the_api_runs_on_sqlite_and_enqueues_through_the_embedded_broker(tmp_path: Path) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'distill.db'}",
        storage_path=tmp_path / "objects",
        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}",
        key_cache_ttl_s=0,
    )
    migrate.upgrade(settings.database_url)
    app = create_app(settings)
    with TestClient(app) as client:
        assert client.get("/readyz").json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}
        with session_scope(app.state.db) as session:
            headers = {"Authorization": f"Bearer {tenants.create_key(session, 'laptop')}"}
        teacher, dataset = inputs(client, headers)
        created = client.post(
            "/v1/jobs", headers={**headers, "Idempotency-Key": "k"}, json=job_body(teacher, dataset)
        )
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        with session_scope(app.state.db) as session:
            assert lifecycle.claim_stage(session, job_id, "queued", "soft_labeling", "w") is not None
            assert lifecycle.claim_stage(session, job_id, "queued", "soft_labeling", "w2") is None
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        assert job["status"] == "soft_labeling" and set(job["timestamps"]) == {"queued", "soft_labeling"}
        assert job["timestamps"]["queued"].endswith(("+00:00", "Z"))
        replay = client.post(
            "/v1/jobs", headers={**headers, "Idempotency-Key": "k"}, json=job_body(teacher, dataset)
        )
        assert replay.status_code == 200 and replay.json()["id"] == job_id

    with Connection(settings.broker_url) as conn:
        message = conn.SimpleQueue("soft_label").get(timeout=5)
        assert message.headers["task"] == "distill.soft_label" and message.payload[0] == [job_id]
        message.ack()
