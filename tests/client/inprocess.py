"""The real app in this process on a migrated SQLite file and a local object folder, with the worker's side
played by calling the same service functions the Celery tasks call (`advance`), for fast, exact tests of
the dashboard, /metrics and webhooks. The end-to-end files run the real worker instead."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.config import Settings
from app.db import migrate
from app.db.session import session_scope
from app.jobs import service
from app.main import create_app
from app.storage.keys import artifact_key
from app.tenants import service as tenants


@dataclass
class Local:
    app: FastAPI
    http: TestClient
    settings: Settings
    folder: Path
    enqueued: list[str]

    def key(self, tenant: str) -> str:
        with session_scope(self.app.state.db) as session:
            return tenants.create_key(session, tenant)

    def as_tenant(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    def submit(self, key: str, **body: Any) -> dict[str, Any]:
        h = self.as_tenant(key)
        ids = []
        for purpose, name in (("teacher", "t.pt"), ("dataset", "d.npz")):
            r = self.http.post("/v1/files", data={"purpose": purpose}, files={"file": (name, b"bytes")},
                               headers=h)
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        r = self.http.post("/v1/jobs", json={"teacher_file_ids": [ids[0]], "dataset_file_id": ids[1], **body},
                           headers=h)
        assert r.status_code == 201, r.text
        return r.json()

    def step(self, fn: Any, *args: Any) -> Any:
        with session_scope(self.app.state.db) as session:
            return fn(session, *args)

    def advance(self, job_id: str, *, to: str = "succeeded", epochs: int = 3,
                artifacts: dict[str, bytes] | None = None) -> None:
        """Walks the job through the pipeline as a worker would, committing each step like a task."""
        path = ["soft_labeling", "distilling", "evaluating", "exporting"]
        previous = "queued"
        for state in path:
            self.step(service.claim_stage, job_id, previous, state, "test-worker")
            if state == "distilling":
                for epoch in range(1, epochs + 1):
                    self.step(service.record_progress, job_id, epoch / epochs, epoch,
                              {"loss": 1.0 / epoch, "val_acc": 0.5 + 0.1 * epoch})
            if state == "exporting":
                for name, data in (artifacts or {}).items():
                    self.add_artifact(job_id, name, data)
            previous = state
            if to == "failed" and state == "distilling":
                self.step(service.fail_job, job_id, "shape_mismatch", "teacher wants 8 features, data has 4")
                return
        if to == "succeeded":
            self.step(service.finish_job, job_id)

    def add_artifact(self, job_id: str, name: str, data: bytes) -> None:
        job = self.step(service.get_job_for_worker, job_id)
        key = artifact_key(job.tenant_id, job_id, name)
        self.app.state.storage.put_stream(key, [data])
        self.step(service.add_artifact, job_id, name, key, len(data), hashlib.sha256(data).hexdigest(),
                  "application/octet-stream")


@contextmanager
def local_app(folder: Path, **overrides: Any) -> Iterator[Local]:
    settings = Settings(data_dir=folder, database_url=f"sqlite:///{folder}/distill.db",
                        storage_path=folder / "objects", broker_url=f"sqla+sqlite:///{folder}/broker.sqlite",
                        **overrides)
    migrate.upgrade(settings.database_url)
    enqueued: list[str] = []
    app = create_app(settings, enqueue=enqueued.append)
    with TestClient(app) as http:
        yield Local(app=app, http=http, settings=settings, folder=folder, enqueued=enqueued)
