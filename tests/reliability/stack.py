"""Real processes for fault tests: a Redis server of our own (never the machine's 6379), a PostgreSQL
database of our own, `distill worker` subprocesses in their own process groups (so a SIGKILL takes the
worker and its stage child, as losing the machine would), and the API in-process over the same services."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from app.config import Settings
from tests.reliability.proxy import TcpProxy
from tests.support import api
from tests.support.data import gaussian_problem
from tests.support.processes import RedisServer, child_env, distill, kill_group, start
from tests.support.services import api_client, moto_s3, postgres_database

# A job with nothing to search (method, T and alpha fixed) and no baseline run: its epochs are all it does, so
# a test can time a kill or an outage against them. Tests add their epochs, batch size, shard size.
FIXED_JOB = api.fixed_config(export_formats=("safetensors",))
STUDENT = "mlp:hidden=16"


@dataclass
class Stack:
    tmp: Path
    database_url: str
    redis: RedisServer
    http: TestClient
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    # Where workers reach PostgreSQL, when not where the API does (e.g. through a proxy the test cuts).
    worker_database_url: str | None = None
    # Settings for the workers beyond the defaults below (as `Settings` field names), e.g. the S3 backend.
    worker_settings: dict[str, Any] = field(default_factory=dict)

    def worker_env(self, name: str) -> dict[str, str]:
        settings = {
            "database_url": self.worker_database_url or self.database_url,
            "broker_url": self.redis.url,
            "storage_path": self.tmp / "objects",
            # Each worker its own scratch: a resumed stage can only use what reached the object store.
            "data_dir": self.tmp / name,
            "worker_lease_s": 5,
            "reaper_interval_s": 1,
            "reaper_stale_after_s": 4,
            "mirror_interval_s": 0.2,
            "max_attempts": 3,
            **self.worker_settings,
        }
        return child_env(**{f"DISTILL_{key.upper()}": str(value) for key, value in settings.items()})

    def start_worker(self, name: str) -> subprocess.Popen[bytes]:
        (self.tmp / name).mkdir(exist_ok=True)
        args = distill("worker", "--loglevel", "info")
        proc = start(
            args, cwd=self.tmp, env=self.worker_env(name), log=self.tmp / f"{name}.log", new_session=True
        )
        self.workers.append(proc)
        return proc

    def scratch(self, name: str, job_id: str) -> Path:
        return self.tmp / name / "scratch" / job_id

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def upload_inputs(self, inputs: tuple[Path, Path]) -> tuple[str, str]:
        return api.upload_inputs(self.http, *inputs)

    def submit(self, teacher_id: str, dataset_id: str, config: dict[str, Any]) -> str:
        return api.create_job(self.http, teacher_id, dataset_id, student=STUDENT, config=config)

    def job(self, job_id: str) -> dict[str, Any]:
        return api.get_job(self.http, job_id)

    def events(self, job_id: str) -> list[dict[str, Any]]:
        return api.events(self.http, job_id)

    def wait_finished(self, job_id: str, timeout: float) -> dict[str, Any]:
        return api.wait_for_job(self.http, job_id, timeout)

    def wait_for_epoch(self, job_id: str, epoch: int, timeout: float = 60) -> None:
        api.wait_for_epoch(self.http, job_id, epoch, timeout)


@contextlib.contextmanager
def stack(tmp: Path, **shared: Any) -> Iterator[Stack]:
    """`shared`: settings for the API and every worker alike (e.g. the S3 backend of `proxied_s3`)."""
    with (
        RedisServer(tmp / "redis") as redis,
        postgres_database("distill_rel") as url,
        api_client(api_settings(tmp, url, redis.url, **shared)) as http,
    ):
        s = Stack(tmp, url, redis, http, worker_settings=dict(shared))
        try:
            yield s
        finally:
            for proc in s.workers:
                kill_group(proc)


def api_settings(tmp: Path, database_url: str, broker_url: str, **shared: Any) -> Settings:
    """The in-process API's settings on the test's own PostgreSQL and Redis; objects in tmp/objects."""
    return Settings(
        data_dir=tmp / "api",
        database_url=database_url,
        broker_url=broker_url,
        storage_path=tmp / "objects",
        **shared,
    )


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
    s3 = {name.removeprefix("s3_"): value for name, value in S3_SETTINGS.items() if name.startswith("s3_")}
    with moto_s3(**s3) as endpoint, TcpProxy("127.0.0.1", int(endpoint.rsplit(":", 1)[1])) as proxy:
        yield {**S3_SETTINGS, "s3_endpoint_url": f"http://127.0.0.1:{proxy.port}"}, proxy


def blob_job_inputs(folder: Path, rows: int, seed: int) -> tuple[Path, Path]:
    """A TorchScript teacher (8 -> 3 classes, untrained) and an NPZ of `rows` Gaussian-blob rows: small
    enough that a job takes seconds, big enough that a worker can be killed between epochs."""
    problem = gaussian_problem(folder, rows=rows, test_rows=0, hidden=16, steps=0, seed=seed)
    return problem.teacher, problem.dataset
