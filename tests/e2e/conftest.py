"""End-to-end fixtures: real services and processes, nothing in-process that production runs elsewhere.

Redis db 14 (flushed), a PostgreSQL database of our own, an S3 server (moto) on a free port, Celery workers
started as subprocesses, and a tiny classification problem whose teacher is a TorchScript file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("DISTILL_E2E_REDIS", "redis://127.0.0.1:6379/14")
PG_ADMIN_URL = os.environ.get("DISTILL_E2E_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PG_DATABASE = "distill_e2e_worker"
NUM_CLASSES, FEATURES = 4, 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: ours minus any DISTILL_* setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return env


def stop(proc: subprocess.Popen, grace: float = 20.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


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
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{PG_DATABASE}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{PG_DATABASE}"'))
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"PostgreSQL not usable at {PG_ADMIN_URL}: {exc}")
    url = make_url(PG_ADMIN_URL).set(database=PG_DATABASE).render_as_string(hide_password=False)
    subprocess.run(
        [sys.executable, "-m", "alembic", "-x", f"url={url}", "upgrade", "head"],
        cwd=ROOT,
        env=base_env(),
        check=True,
        capture_output=True,
    )
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{PG_DATABASE}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="e2e",
        aws_secret_access_key="e2e-secret",
    ).create_bucket(Bucket="distill-e2e")
    yield endpoint
    server.stop()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen]]:
    """Starts `distill worker` subprocesses; all are stopped (SIGTERM, then SIGKILL) after the test."""
    procs: list[subprocess.Popen] = []

    def start(env: dict[str, str], queues: str = "soft_label,distill") -> subprocess.Popen:
        log = (tmp_path / f"worker-{len(procs)}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker", "--queues", queues, "--loglevel", "info"],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        stop(proc)


@dataclass
class Problem:
    teacher: Path
    dataset: Path
    x_test: np.ndarray
    y_test: np.ndarray
    teacher_accuracy: float


@pytest.fixture(scope="session")
def problem(tmp_path_factory: pytest.TempPathFactory) -> Problem:
    """Four Gaussian classes in 12 dimensions; a small MLP teacher that separates them well."""
    folder = tmp_path_factory.mktemp("problem")
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 1.6, (NUM_CLASSES, FEATURES)).astype(np.float32)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, NUM_CLASSES, n)
        return (centers[y] + rng.normal(0, 1.0, (n, FEATURES))).astype(np.float32), y.astype(np.int64)

    x, y = sample(600)
    x_test, y_test = sample(400)
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 64), torch.nn.ReLU(), torch.nn.Linear(64, NUM_CLASSES)
    )
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(teacher(xt), yt).backward()
        opt.step()
    teacher.eval()
    with torch.no_grad():
        accuracy = float((teacher(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    torch.jit.save(torch.jit.script(teacher), folder / "teacher.pt")
    np.savez(folder / "train.npz", x=x, y=y)
    return Problem(folder / "teacher.pt", folder / "train.npz", x_test, y_test, accuracy)


# A job small enough for 2 shared cores: fixed method/T/alpha (no grid), three epochs, no baseline run.
JOB_CONFIG = {
    "epochs": 3,
    "method": "hinton",
    "temperature": 2.0,
    "alpha": 0.5,
    "batch_size": 32,
    "lr": 0.01,
    "baseline": False,
    "export_formats": ["torchscript", "onnx"],
}


def run_job(http: httpx.Client, problem: Problem, download_to: Path, timeout_s: float = 150) -> dict:
    """The user's path: upload teacher and data, submit, poll to the end, download the students."""
    files = {}
    for purpose, path in (("teacher", problem.teacher), ("dataset", problem.dataset)):
        with path.open("rb") as fh:
            r = http.post("/v1/files", data={"purpose": purpose}, files={"file": (path.name, fh)})
        assert r.status_code == 201, r.text
        files[purpose] = r.json()["id"]
    body = {
        "teacher_file_ids": [files["teacher"]],
        "dataset_file_id": files["dataset"],
        "student": "mlp:hidden=32",
        "config": JOB_CONFIG,
    }
    r = http.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    deadline, seen = time.monotonic() + timeout_s, []
    while True:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if not seen or seen[-1] != job["status"]:
            seen.append(job["status"])
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        assert time.monotonic() < deadline, f"job still {job['status']} after {timeout_s} s"
        time.sleep(0.5)
    assert job["status"] == "succeeded", job
    names = {a["name"]: a for a in http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]}
    for name in ("student.pt", "student.onnx"):
        r = http.get(f"/v1/jobs/{job_id}/artifacts/{name}")
        assert r.status_code == 200 and int(r.headers["content-length"]) == names[name]["size"]
        (download_to / name).write_bytes(r.content)
    events = http.get(f"/v1/jobs/{job_id}/events").json()["data"]
    return {"job": job, "artifacts": names, "events": events, "statuses": seen}


def student_accuracies(folder: Path, problem: Problem) -> dict[str, float]:
    """Accuracy of the downloaded TorchScript and ONNX students on held-out rows (raw features in)."""
    import onnxruntime

    scripted = torch.jit.load(str(folder / "student.pt"))
    with torch.no_grad():
        torch_pred = scripted(torch.from_numpy(problem.x_test)).argmax(1).numpy()
    session = onnxruntime.InferenceSession(str(folder / "student.onnx"), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {session.get_inputs()[0].name: problem.x_test})[0]
    return {
        "torchscript": float((torch_pred == problem.y_test).mean()),
        "onnx": float((onnx_logits.argmax(1) == problem.y_test).mean()),
    }


@pytest.fixture
def stack() -> SimpleNamespace:
    """Helpers the tests share (conftest modules are not importable by name under pytest)."""
    return SimpleNamespace(base_env=base_env, free_port=free_port)


@pytest.fixture
def job_runner() -> Callable[..., dict]:
    return run_job


@pytest.fixture
def evaluate_students() -> Callable[..., dict[str, float]]:
    return student_accuracies


@contextlib.contextmanager
def serving(
    cmd: list[str], cwd: Path, env: dict[str, str], port: int, log: Path
) -> Iterator[subprocess.Popen]:
    """A server subprocess, yielded once /healthz answers; stopped with SIGTERM on exit."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, f"server exited early:\n{log.read_text()[-3000:]}"
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                        break
                assert time.monotonic() < deadline, f"server not up after 60 s:\n{log.read_text()[-3000:]}"
                time.sleep(0.3)
            yield proc
        finally:
            stop(proc, grace=40)


@pytest.fixture
def serve_process() -> Callable[..., contextlib.AbstractContextManager[subprocess.Popen]]:
    return serving
