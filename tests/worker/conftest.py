"""A whole embedded service in a temporary folder: SQLite migrated with Alembic, a local object folder, the
SQLite broker, the real API (TestClient) for uploads and submits, and a worker context for running tasks
in-process the way a Celery worker would call them."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.config import Settings
from app.db import Database, migrate, session_scope
from app.main import create_app
from app.storage import build_storage
from app.tenants import service as tenants
from worker.celery_app import make_celery
from worker.tasks.context import WorkerContext, sandbox_from, set_context


@dataclass
class Service:
    settings: Settings
    http: TestClient
    ctx: WorkerContext
    broker_file: Path

    def queued_messages(self) -> list[tuple[str, list[str]]]:
        """(task name, args) of every message the broker still holds for a consumer."""
        with sqlite3.connect(self.broker_file) as conn:
            rows = conn.execute("SELECT payload FROM kombu_message WHERE visible = 1 ORDER BY id").fetchall()
        out = []
        for (payload,) in rows:
            message = json.loads(payload)
            body = json.loads(__import__("base64").b64decode(message["body"]))
            out.append((message["headers"]["task"], body[0]))
        return out


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    broker_file = tmp_path / "broker.sqlite"
    settings = Settings(
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'distill.db'}",
        storage_path=tmp_path / "objects",
        broker_url=f"sqla+sqlite:///{broker_file}",
        worker_lease_s=30,
        max_attempts=2,
    )
    migrate.upgrade(settings.database_url)
    db = Database.from_settings(settings)
    with session_scope(db) as session:
        key = tenants.create_key(session, "acme")
    # The worker's Celery app, configured like production, publishes to the broker file the API uses.
    ctx = WorkerContext(
        settings=settings,
        db=db,
        storage=build_storage(settings),
        worker_id="test-worker",
        scratch_root=tmp_path / "scratch",
        celery=make_celery(settings),
        sandbox=sandbox_from(settings),
    )
    set_context(ctx)
    app = create_app(settings, db=db)
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as http:
        yield Service(settings, http, ctx, broker_file)
    set_context(None)
    db.dispose()


@pytest.fixture(scope="session")
def tiny_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 3-class problem in 8 dimensions and a TorchScript teacher for it."""
    folder = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(1)
    centers = rng.normal(0, 2.0, (3, 8)).astype(np.float32)
    y = rng.integers(0, 3, 300)
    x = (centers[y] + rng.normal(0, 1.0, (300, 8))).astype(np.float32)
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = torch.optim.Adam(teacher.parameters(), lr=2e-2)
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(teacher(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
    torch.jit.save(torch.jit.script(teacher.eval()), folder / "teacher.pt")
    np.savez(folder / "train.npz", x=x, y=y.astype(np.int64))
    return folder / "teacher.pt", folder / "train.npz"


def submit(http: TestClient, teacher: Path, dataset: Path, **config: object) -> str:
    ids = []
    for purpose, path in (("teacher", teacher), ("dataset", dataset)):
        with path.open("rb") as fh:
            r = http.post("/v1/files", data={"purpose": purpose}, files={"file": (path.name, fh)})
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    body = {
        "teacher_file_ids": [ids[0]],
        "dataset_file_id": ids[1],
        "student": "mlp:hidden=8",
        "config": {
            "epochs": 2,
            "method": "hinton",
            "temperature": 2.0,
            "alpha": 0.5,
            "baseline": False,
            "export_formats": ["torchscript"],
            **config,
        },
    }
    r = http.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


@pytest.fixture
def submit_job(service: Service, tiny_inputs: tuple[Path, Path]):  # type: ignore[no-untyped-def]
    return lambda **config: submit(service.http, *tiny_inputs, **config)
