"""Services to test against. Databases and an S3 server of the test's own; the API in this process with a
tenant's key; and the embedded service (SQLite, a local object folder, the SQLite broker) in three shapes:

- `embedded`: the API in-process plus a worker context, so a test calls the Celery tasks itself;
- `local_app`: the API in-process alone, the worker's side played by the lifecycle functions (`advance`);
- `served`: `distill serve` in a subprocess, API and Celery worker, as a user starts it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, pool, text
from sqlalchemy.engine import make_url

from app.config import Settings
from app.db import Database, migrate, session_scope
from app.jobs import lifecycle
from app.main import create_app
from app.storage import build_storage
from app.storage.keys import artifact_key
from app.tenants import service as tenants
from tests.support.api import bearer, inputs, post_job
from tests.support.processes import child_env, distill, free_port, serving

if TYPE_CHECKING:  # the API-only install has no worker
    from worker.tasks.context import WorkerContext

# A database the tests may connect to for CREATE DATABASE and DROP DATABASE.
PG_ADMIN_URL = os.environ.get("DISTILL_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _admin(sql: str) -> None:
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=pool.NullPool)
    try:
        with admin.connect() as conn:
            conn.execute(text(sql))
    finally:
        admin.dispose()


def create_database(name: str) -> str:
    """An empty PostgreSQL database `name` (dropped first if it was left behind); its URL."""
    drop_database(name)
    _admin(f'CREATE DATABASE "{name}"')
    return make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def drop_database(name: str) -> None:
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def postgres_database(prefix: str) -> Iterator[str]:
    """A migrated PostgreSQL database of this test's own, dropped afterwards; its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    try:
        url = create_database(name)
        migrate.upgrade(url)
        yield url
    finally:
        drop_database(name)


@contextlib.contextmanager
def moto_s3(
    bucket: str | None = None,
    *,
    region: str = "us-east-1",
    access_key_id: str = "test",
    secret_access_key: str = "test",
) -> Iterator[str]:
    """An S3 server (moto, in this process) on a free port, with `bucket` created; its endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        if bucket is not None:
            boto3.client(
                "s3",
                endpoint_url=endpoint,
                region_name=region,
                aws_access_key_id=access_key_id,
                aws_secret_access_key=secret_access_key,
            ).create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()


@contextlib.contextmanager
def api_client(
    settings: Settings, db: Database | None = None, tenant: str = "acme", **app_args: Any
) -> Iterator[TestClient]:
    """The real app in this process on `db` (without one, its own, disposed afterwards), and a client that
    holds a new API key of `tenant`."""
    own = db is None
    db = Database.from_settings(settings) if db is None else db
    try:
        with session_scope(db) as session:
            key = tenants.create_key(session, tenant)
        with TestClient(create_app(settings, db=db, **app_args), headers=bearer(key)) as http:
            yield http
    finally:
        if own:
            db.dispose()


def embedded_settings(folder: Path, **overrides: Any) -> Settings:
    """The embedded default's layout in `folder` (SQLite, objects, the SQLite broker), migrated."""
    settings = Settings(
        data_dir=folder,
        database_url=f"sqlite:///{folder / 'distill.db'}",
        storage_path=folder / "objects",
        broker_url=f"sqla+sqlite:///{folder / 'broker.sqlite'}",
        **overrides,
    )
    migrate.upgrade(settings.database_url)
    return settings


@dataclass
class Embedded:
    """The API (`http`, with a key of tenant "acme") and a worker context (`ctx`) on one embedded service."""

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
            body = json.loads(base64.b64decode(message["body"]))
            out.append((message["headers"]["task"], body[0]))
        return out


@contextlib.contextmanager
def embedded(folder: Path) -> Iterator[Embedded]:
    """The embedded service in `folder`, with the worker's context installed for the tasks this process runs
    (leases of 30 s, two attempts a stage)."""
    from worker.celery_app import make_celery
    from worker.tasks.context import WorkerContext, sandbox_from, set_context

    settings = embedded_settings(folder, worker_lease_s=30, max_attempts=2)
    db = Database.from_settings(settings)
    # The worker's Celery app, configured like production, publishes to the broker file the API uses.
    ctx = WorkerContext(
        settings=settings,
        db=db,
        storage=build_storage(settings),
        worker_id="test-worker",
        scratch_root=folder / "scratch",
        celery=make_celery(settings),
        sandbox=sandbox_from(settings),
    )
    set_context(ctx)
    with api_client(settings, db) as http:
        yield Embedded(settings, http, ctx, folder / "broker.sqlite")
    set_context(None)
    db.dispose()


@dataclass
class Local:
    """The API in-process; `enqueued` holds the job ids it sent to the (absent) workers."""

    app: FastAPI
    http: TestClient
    settings: Settings
    folder: Path
    enqueued: list[str]

    def key(self, tenant: str) -> str:
        with session_scope(self.app.state.db) as session:
            return tenants.create_key(session, tenant)

    def as_tenant(self, key: str) -> dict[str, str]:
        return bearer(key)

    def submit(self, key: str, **body: Any) -> dict[str, Any]:
        """A job on placeholder files, with `body`'s fields only; the job."""
        teacher, dataset = inputs(self.http, self.as_tenant(key))
        return post_job(
            self.http,
            {"teacher_file_ids": [teacher], "dataset_file_id": dataset, **body},
            self.as_tenant(key),
        )

    def step(self, fn: Any, *args: Any) -> Any:
        with session_scope(self.app.state.db) as session:
            return fn(session, *args)

    def advance(
        self,
        job_id: str,
        *,
        to: str = "succeeded",
        epochs: int = 3,
        artifacts: dict[str, bytes] | None = None,
    ) -> None:
        """Walks the job through the pipeline as a worker would, committing each step like a task."""
        path = ["soft_labeling", "distilling", "evaluating", "exporting"]
        previous = "queued"
        for state in path:
            self.step(lifecycle.claim_stage, job_id, previous, state, "test-worker")
            if state == "distilling":
                for epoch in range(1, epochs + 1):
                    self.step(
                        lifecycle.record_progress,
                        job_id,
                        epoch / epochs,
                        epoch,
                        {"loss": 1.0 / epoch, "val_acc": 0.5 + 0.1 * epoch},
                    )
            if state == "exporting":
                for name, data in (artifacts or {}).items():
                    self.add_artifact(job_id, name, data)
            previous = state
            if to == "failed" and state == "distilling":
                message = "teacher wants 8 features, data has 4"
                self.step(lifecycle.fail_job, job_id, "shape_mismatch", message)
                return
        if to == "succeeded":
            self.step(lifecycle.finish_job, job_id)

    def add_artifact(self, job_id: str, name: str, data: bytes) -> None:
        job = self.step(lifecycle.get_job_for_worker, job_id)
        key = artifact_key(job.tenant_id, job_id, name)
        self.app.state.storage.put_stream(key, [data])
        self.step(
            lifecycle.add_artifact,
            job_id,
            name,
            key,
            len(data),
            hashlib.sha256(data).hexdigest(),
            "application/octet-stream",
        )


@contextlib.contextmanager
def local_app(folder: Path, **overrides: Any) -> Iterator[Local]:
    """The API alone on the embedded service in `folder`; `overrides` are Settings fields."""
    settings = embedded_settings(folder, **overrides)
    enqueued: list[str] = []
    app = create_app(settings, enqueue=enqueued.append)
    with TestClient(app) as http:
        yield Local(app=app, http=http, settings=settings, folder=folder, enqueued=enqueued)


@dataclass
class Served:
    """`distill serve` running: its URL, the API key it wrote, its folder and log."""

    url: str
    api_key: str
    folder: Path
    log: Path
    env: dict[str, str] = field(repr=False)

    def cli(self, *args: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess[str]:
        """`distill <args>` as a user runs it, pointed at this service through the environment."""
        env = {**self.env, "DISTILL_URL": self.url, "DISTILL_API_KEY": self.api_key, **env}
        return subprocess.run(
            distill(*args), cwd=self.folder, text=True, capture_output=True, timeout=timeout, env=env
        )


@contextlib.contextmanager
def served(folder: Path, **settings: str) -> Iterator[Served]:
    """`distill serve` on a free port with everything under `folder/.distill` (its own session, so a SIGKILL
    reaches its worker too); `settings` are DISTILL_* variables. Stopped with SIGTERM."""
    port = free_port()
    env = child_env(DISTILL_WEBHOOK_BACKOFF_S="0.3", **settings)
    log = folder / "serve.log"
    args = distill("serve", "--port", str(port))
    with serving(args, cwd=folder, env=env, port=port, log=log, timeout=90, new_session=True):
        key = (folder / ".distill" / "api_key").read_text().strip()
        yield Served(url=f"http://127.0.0.1:{port}", api_key=key, folder=folder, log=log, env=env)
