"""Real processes for fault tests: a Redis server of our own (never the machine's 6379), a PostgreSQL
database of our own, `distill worker` subprocesses in their own process groups (so a SIGKILL takes the
worker and its stage child, as losing the machine would), and the API in-process over the same services."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from app.config import Settings
from app.db import Database, migrate, session_scope
from app.main import create_app
from app.tenants import service as tenants

if TYPE_CHECKING:
    from tests.reliability.proxy import TcpProxy

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN_URL = os.environ.get("DISTILL_E2E_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class RedisServer:
    """`redis-server` on a free port, no persistence: a restart loses every message, the harshest case."""

    def __init__(self, folder: Path) -> None:
        self.port, self.folder, self.proc = free_port(), folder, None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._answers, 10, "redis-server to answer")

    def _answers(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    name = f"distill_rel_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        migrate.upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@dataclass
class Stack:
    tmp: Path
    database_url: str
    redis: RedisServer
    http: TestClient
    workers: list[subprocess.Popen] = field(default_factory=list)
    # Where workers reach PostgreSQL, when not where the API does (e.g. through a proxy the test cuts).
    worker_database_url: str | None = None
    # Settings for the workers beyond the defaults below (as `Settings` field names), e.g. the S3 backend.
    worker_settings: dict[str, Any] = field(default_factory=dict)

    def worker_env(self, name: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_")}
        env.update(
            PYTHONPATH=str(ROOT),
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            DISTILL_DATABASE_URL=self.database_url,
            DISTILL_BROKER_URL=self.redis.url,
            DISTILL_STORAGE_PATH=str(self.tmp / "objects"),
            # Each worker its own scratch: a resumed stage can only use what reached the object store.
            DISTILL_DATA_DIR=str(self.tmp / name),
            DISTILL_WORKER_LEASE_S="5",
            DISTILL_REAPER_INTERVAL_S="1",
            DISTILL_REAPER_STALE_AFTER_S="4",
            DISTILL_MIRROR_INTERVAL_S="0.2",
            DISTILL_MAX_ATTEMPTS="3",
        )
        if self.worker_database_url:
            env["DISTILL_DATABASE_URL"] = self.worker_database_url
        env.update({f"DISTILL_{name.upper()}": str(value) for name, value in self.worker_settings.items()})
        return env

    def start_worker(self, name: str) -> subprocess.Popen:
        (self.tmp / name).mkdir(exist_ok=True)
        log = (self.tmp / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker", "--loglevel", "info"],
            cwd=self.tmp,
            env=self.worker_env(name),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.workers.append(proc)
        return proc

    def scratch(self, name: str, job_id: str) -> Path:
        return self.tmp / name / "scratch" / job_id

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def job(self, job_id: str) -> dict[str, Any]:
        return self.http.get(f"/v1/jobs/{job_id}").json()

    def events(self, job_id: str) -> list[dict[str, Any]]:
        return self.http.get(f"/v1/jobs/{job_id}/events").json()["data"]

    def wait_finished(self, job_id: str, timeout: float) -> dict[str, Any]:
        def finished() -> dict[str, Any] | None:
            job = self.job(job_id)
            return job if job["status"] in ("succeeded", "failed", "cancelled") else None

        return wait_until(finished, timeout, f"job {job_id} to finish", every=0.25)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(20)


@contextlib.contextmanager
def stack(tmp: Path, **shared: Any) -> Iterator[Stack]:
    """`shared`: settings for the API and every worker alike (e.g. the S3 backend of `proxied_s3`)."""
    redis = RedisServer(tmp / "redis")
    redis.start()
    try:
        with postgres_database() as url:
            settings = Settings(
                data_dir=tmp / "api",
                database_url=url,
                broker_url=redis.url,
                storage_path=tmp / "objects",
                **shared,
            )
            db = Database.from_settings(settings)
            with session_scope(db) as session:
                key = tenants.create_key(session, "acme")
            app = create_app(settings, db=db)
            with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as http:
                s = Stack(tmp, url, redis, http, worker_settings=dict(shared))
                try:
                    yield s
                finally:
                    for proc in s.workers:
                        kill_group(proc)
            db.dispose()
    finally:
        redis.stop()


S3_SETTINGS = {
    "storage_backend": "s3",
    "s3_bucket": "distill",
    "s3_region": "us-east-1",
    "s3_access_key_id": "test",
    "s3_secret_access_key": "test",
}


@contextlib.contextmanager
def proxied_s3() -> Iterator[tuple[dict[str, Any], TcpProxy]]:
    """An S3 server (moto, in-process) behind a proxy the test can cut; yields the settings that reach it
    through the proxy (`S3_SETTINGS` plus the endpoint), with the bucket created."""
    import boto3
    from moto.server import ThreadedMotoServer

    from tests.reliability.proxy import TcpProxy  # it imports this module

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    moto.start()
    try:
        with TcpProxy("127.0.0.1", moto._port) as proxy:
            endpoint = f"http://127.0.0.1:{proxy.port}"
            boto3.client(
                "s3",
                endpoint_url=endpoint,
                region_name=S3_SETTINGS["s3_region"],
                aws_access_key_id=S3_SETTINGS["s3_access_key_id"],
                aws_secret_access_key=S3_SETTINGS["s3_secret_access_key"],
            ).create_bucket(Bucket=S3_SETTINGS["s3_bucket"])
            yield {**S3_SETTINGS, "s3_endpoint_url": endpoint}, proxy
    finally:
        moto.stop()


def upload(http: TestClient, purpose: str, path: Path) -> str:
    with path.open("rb") as fh:
        r = http.post("/v1/files", data={"purpose": purpose}, files={"file": (path.name, fh)})
    assert r.status_code == 201, r.text
    return r.json()["id"]


# A job with nothing to search (method, T and alpha fixed) and no baseline run: its epochs are all it does, so
# a test can time a kill or an outage against them. Tests add their epochs, batch size, shard size.
FIXED_JOB = {
    "method": "hinton",
    "temperature": 2.0,
    "alpha": 0.5,
    "baseline": False,
    "export_formats": ["safetensors"],
}


def submit(http: TestClient, teacher_id: str, dataset_id: str, config: dict[str, Any]) -> str:
    body = {
        "teacher_file_ids": [teacher_id],
        "dataset_file_id": dataset_id,
        "student": "mlp:hidden=16",
        "config": config,
    }
    r = http.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def blob_job_inputs(folder: Path, rows: int, seed: int) -> tuple[Path, Path]:
    """A TorchScript teacher (8 -> 3 classes) and an NPZ of `rows` Gaussian-blob rows: small enough that a job
    takes seconds, big enough that a worker can be killed between epochs."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 2.0, (3, 8)).astype(np.float32)
    y = rng.integers(0, 3, rows)
    x = (centers[y] + rng.normal(0, 1.0, (rows, 8))).astype(np.float32)
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
    torch.jit.save(torch.jit.script(teacher), folder / "teacher.pt")
    np.savez(folder / "train.npz", x=x, y=y.astype(np.int64))
    return folder / "teacher.pt", folder / "train.npz"
