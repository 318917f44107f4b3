"""A real embedded service for client, CLI, dashboard and metrics tests: `distill serve` in a subprocess
(API + Celery worker on SQLite, a local object folder and the serverless broker), and a tiny problem to
distil: three Gaussian classes in 8 dimensions with a TorchScript MLP teacher."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
CLASSES, FEATURES = 3, 8
# Small enough for 2 shared cores: fixed method/T/alpha (no grid search), a few epochs, no baseline run.
FAST_CONFIG = {"epochs": 4, "method": "hinton", "temperature": 2.0, "alpha": 0.5, "batch_size": 32,
               "lr": 0.01, "baseline": False, "export_formats": ["torchscript"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    url: str
    api_key: str
    folder: Path
    log: Path
    env: dict[str, str] = field(repr=False)

    def cli(self, *args: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess[str]:
        """`distill <args>` as a user runs it, pointed at this service through the environment."""
        env = {**self.env, "DISTILL_URL": self.url, "DISTILL_API_KEY": self.api_key, **env}
        return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=self.folder, text=True,
                              capture_output=True, timeout=timeout, env=env)


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return env


@contextlib.contextmanager
def embedded_service(folder: Path, **settings: str) -> Iterator[Service]:
    """`distill serve` on a free port with everything under `folder/.distill`; stopped with SIGTERM."""
    port = free_port()
    env = child_env(DISTILL_WEBHOOK_BACKOFF_S="0.3", **settings)
    log = folder / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "serve", "--port", str(port)],
                                cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, f"distill serve exited:\n{log.read_text()[-3000:]}"
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                assert time.monotonic() < deadline, f"not up after 90 s:\n{log.read_text()[-3000:]}"
                time.sleep(0.3)
            key = (folder / ".distill" / "api_key").read_text().strip()
            yield Service(url=url, api_key=key, folder=folder, log=log, env=env)
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the session we started: serve and its children
            proc.wait()


@dataclass
class Problem:
    teacher: Path
    dataset: Path
    x_test: np.ndarray
    y_test: np.ndarray


def make_problem(folder: Path) -> Problem:
    """A teacher that separates the classes well, trained here in a second; the student must follow it."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 2.0, (CLASSES, FEATURES)).astype(np.float32)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, CLASSES, n)
        return (centers[y] + rng.normal(0, 1.0, (n, FEATURES))).astype(np.float32), y.astype(np.int64)

    x, y = sample(400)
    x_test, y_test = sample(300)
    torch.manual_seed(0)
    nn = torch.nn
    teacher = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, CLASSES))
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(teacher(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
    torch.jit.save(torch.jit.script(teacher.eval()), folder / "teacher.pt")
    np.savez(folder / "train.npz", x=x, y=y)
    return Problem(folder / "teacher.pt", folder / "train.npz", x_test, y_test)


def student_accuracy(student_pt: Path, problem: Problem) -> float:
    import torch

    model = torch.jit.load(str(student_pt))
    with torch.no_grad():
        pred = model(torch.from_numpy(problem.x_test)).argmax(1).numpy()
    return float((pred == problem.y_test).mean())
