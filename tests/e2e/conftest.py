"""End-to-end fixtures: real services and processes, nothing in-process that production runs elsewhere.

Redis db 14 (flushed), a PostgreSQL database of our own, an S3 server (moto) on a free port, Celery workers
started as subprocesses, and a tiny classification problem whose teacher is a TorchScript file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import api
from tests.support.data import Problem, gaussian_problem
from tests.support.processes import ROOT, child_env, distill, start, stop
from tests.support.services import PG_ADMIN_URL, create_database, drop_database, moto_s3

REDIS_URL = os.environ.get("DISTILL_E2E_REDIS", "redis://127.0.0.1:6379/14")
PG_DATABASE = "distill_e2e_worker"


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.skip(f"Redis not reachable at {REDIS_URL}: {exc}")
    client.flushdb()
    return REDIS_URL


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """Migrated by `alembic upgrade head` in a child process, as the compose file's migrate service does."""
    try:
        url = create_database(PG_DATABASE)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"PostgreSQL not usable at {PG_ADMIN_URL}: {exc}")
    subprocess.run(
        [sys.executable, "-m", "alembic", "-x", f"url={url}", "upgrade", "head"],
        cwd=ROOT,
        env=child_env(),
        check=True,
        capture_output=True,
    )
    yield url
    drop_database(PG_DATABASE)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    with moto_s3("distill-e2e", access_key_id="e2e", secret_access_key="e2e-secret") as endpoint:
        yield endpoint


@pytest.fixture
def stack_env(tmp_path: Path, postgres_url: str, redis_url: str, s3_endpoint: str) -> dict[str, str]:
    """The production stack's settings as a worker's environment: PostgreSQL, Redis, the S3 server."""
    return {
        "DISTILL_ENVIRONMENT": "test",
        "DISTILL_DATABASE_URL": postgres_url,
        "DISTILL_BROKER_URL": redis_url,
        "DISTILL_STORAGE_BACKEND": "s3",
        "DISTILL_S3_ENDPOINT_URL": s3_endpoint,
        "DISTILL_S3_BUCKET": "distill-e2e",
        "DISTILL_S3_ACCESS_KEY_ID": "e2e",
        "DISTILL_S3_SECRET_ACCESS_KEY": "e2e-secret",
        "DISTILL_DATA_DIR": str(tmp_path / "worker-data"),
    }


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Starts `distill worker` subprocesses (logs: worker-0.log, ...); all are stopped (SIGTERM, then SIGKILL)
    after the test."""
    procs: list[subprocess.Popen[bytes]] = []

    def start_one(env: dict[str, str], queues: str = "soft_label,distill") -> subprocess.Popen[bytes]:
        args = distill("worker", "--queues", queues, "--loglevel", "info")
        procs.append(start(args, cwd=tmp_path, env=env, log=tmp_path / f"worker-{len(procs)}.log"))
        return procs[-1]

    yield start_one
    for proc in procs:
        stop(proc)


@pytest.fixture(scope="session")
def problem(tmp_path_factory: pytest.TempPathFactory) -> Problem:
    """Four Gaussian classes in 12 dimensions; a small MLP teacher that separates them well."""
    return gaussian_problem(
        tmp_path_factory.mktemp("problem"),
        classes=4,
        features=12,
        spread=1.6,
        rows=600,
        test_rows=400,
        hidden=64,
        steps=150,
    )


# A job small enough for 2 shared cores: fixed method/T/alpha (no grid), three epochs, no baseline run.
JOB_CONFIG = api.fixed_config(3, export_formats=("torchscript", "onnx"), batch_size=32, lr=0.01)


def run_job(http: httpx.Client, problem: Problem, download_to: Path, timeout_s: float = 150) -> dict:
    """The user's path: upload teacher and data, submit, poll to the end, download the students."""
    job_id = api.submit(http, problem.teacher, problem.dataset, student="mlp:hidden=32", config=JOB_CONFIG)
    seen: list[str] = []
    job = api.wait_for_job(http, job_id, timeout_s, every=0.5, seen=seen)
    assert job["status"] == "succeeded", job
    names = {a["name"]: a for a in http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]}
    for name in ("student.pt", "student.onnx"):
        r = http.get(f"/v1/jobs/{job_id}/artifacts/{name}")
        assert r.status_code == 200 and int(r.headers["content-length"]) == names[name]["size"]
        (download_to / name).write_bytes(r.content)
    return {"job": job, "artifacts": names, "events": api.events(http, job_id), "statuses": seen}


def student_accuracies(folder: Path, problem: Problem) -> dict[str, float]:
    """Accuracy of the downloaded TorchScript and ONNX students on held-out rows (raw features in)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(folder / "student.onnx"), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {session.get_inputs()[0].name: problem.x_test})[0]
    return {
        "torchscript": problem.accuracy_of(folder / "student.pt"),
        "onnx": float((onnx_logits.argmax(1) == problem.y_test).mean()),
    }


@pytest.fixture
def job_runner() -> Callable[..., dict]:
    return run_job


@pytest.fixture
def evaluate_students() -> Callable[..., dict[str, float]]:
    return student_accuracies
