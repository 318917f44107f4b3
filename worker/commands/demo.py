"""`distill demo`: one real job end to end through the HTTP API on the embedded default.

Trains a small teacher (Fashion-MNIST when the Debian package is installed, else scikit-learn's digits),
starts `distill serve` in the background on a free port, uploads teacher and data, submits a job, shows its
progress, downloads the student, checks it on held-out rows and prints teacher vs student vs baseline.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class DemoData:
    name: str
    # Raw features (float32 numpy). The teacher learns from more rows than the job gets (`x`, `y`): as in
    # practice, a big model trained on everything is distilled on a smaller transfer set.
    x_teacher: Any
    y_teacher: Any
    x: Any
    y: Any
    x_val: Any
    y_val: Any
    x_test: Any
    y_test: Any
    preprocess: dict[str, Any]
    student: str
    job_config: dict[str, Any]  # sized to the data: a few epochs over 20k rows, more over 1,200


def load_demo_data(rows: int, dataset: str = "auto") -> DemoData:
    import numpy as np

    if dataset not in ("auto", "fashion-mnist", "digits"):
        raise typer.BadParameter("one of auto, fashion-mnist, digits", param_hint="--dataset")
    have_fmnist = (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists()
    if dataset == "fashion-mnist" and not have_fmnist:
        raise typer.BadParameter(f"Fashion-MNIST not found in {FMNIST_DIR}", param_hint="--dataset")
    if dataset != "digits" and have_fmnist:
        from worker.distill.data import load_dataset

        ds = load_dataset(FMNIST_DIR)
        order = np.random.default_rng(0).permutation(len(ds.x))
        n_val = max(1000, rows // 6)
        val, train, teacher_rows = order[:n_val], order[n_val : n_val + rows], order[n_val:]
        return DemoData(
            name="Fashion-MNIST",
            x_teacher=ds.x[teacher_rows], y_teacher=ds.y[teacher_rows],
            x=ds.x[train], y=ds.y[train], x_val=ds.x[val], y_val=ds.y[val], x_test=ds.x_val, y_test=ds.y_val,
            preprocess={"scale": 1 / 255, "mean": [0.2860], "std": [0.3530]},
            student="mlp:hidden=32",
            job_config={"epochs": 6, "batch_size": 128},
        )  # fmt: skip
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order].astype(np.float32), y[order].astype(np.int64)
    return DemoData(
        name="scikit-learn digits",
        x_teacher=x[:1200], y_teacher=y[:1200],
        x=x[:1200], y=y[:1200], x_val=x[1200:1500], y_val=y[1200:1500], x_test=x[1500:], y_test=y[1500:],
        preprocess={"scale": 1 / 16, "mean": [0.3], "std": [0.37]},
        student="mlp:hidden=16",
        job_config={"epochs": 12, "batch_size": 32, "lr": 0.01},
    )  # fmt: skip


def train_teacher(data: DemoData, epochs: int) -> Any:
    """A wide two-hidden-layer MLP on the preprocessed teacher rows: about a minute on 2 CPU cores."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    pre = data.preprocess
    x = ((torch.from_numpy(data.x_teacher) * pre["scale"] - pre["mean"][0]) / pre["std"][0]).flatten(1)
    y = torch.from_numpy(data.y_teacher)
    width = 512 if x.shape[1] > 100 else 256
    # Flatten first, so the teacher takes (N, 1, 28, 28) and (N, 784) alike.
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(x.shape[1], width),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(width, width // 2),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(width // 2, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(128):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return torch.jit.script(model.eval())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def background_server(port: int, log_path: Path) -> Iterator[str]:
    """`distill serve` as a child process until the block ends; yields its URL once /healthz answers."""
    import httpx

    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "serve", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"distill serve exited; see {log_path}")
                try:
                    if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"distill serve did not answer within 120 s; see {log_path}")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def accuracy_and_latency(model: Any, x: Any, y: Any) -> tuple[float, float]:
    """Held-out accuracy, and CPU milliseconds per batch of 64 rows (median of 20, one thread)."""
    import numpy as np
    import torch

    with torch.inference_mode():
        pred = torch.cat([model(torch.from_numpy(x[i : i + 1000])) for i in range(0, len(x), 1000)]).argmax(1)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        batch, times = torch.from_numpy(x[:64]), []
        for _ in range(25):
            start = time.perf_counter()
            model(batch)
            times.append(time.perf_counter() - start)
        torch.set_num_threads(threads)
    return float((pred.numpy() == y).mean()), 1000 * float(np.median(times[5:]))


def demo(
    rows: Annotated[int, typer.Option(help="training rows uploaded (Fashion-MNIST)")] = 20000,
    teacher_epochs: Annotated[int, typer.Option(min=1)] = 3,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="distillation epochs (default: by dataset)")
    ] = None,
    dataset: Annotated[
        str, typer.Option(help="auto (Fashion-MNIST when installed), fashion-mnist, digits")
    ] = "auto",
) -> None:
    """Train a teacher, serve, distil it over HTTP, and compare teacher, student and baseline."""
    import numpy as np
    import torch

    from app.client import Client
    from app.config import get_settings

    settings = get_settings()
    folder = settings.data_dir / "demo"
    folder.mkdir(parents=True, exist_ok=True)
    data = load_demo_data(rows, dataset)
    # Small matrices run faster on one thread than on two contended ones.
    torch.set_num_threads(1 if len(data.x_teacher) < 5000 else max(1, min(4, os.cpu_count() or 1)))
    say(f"1/5 training a teacher on {len(data.x_teacher)} {data.name} rows")
    started = time.perf_counter()
    teacher = train_teacher(data, teacher_epochs if len(data.x_teacher) > 5000 else 20)
    say(f"    done in {time.perf_counter() - started:.0f} s")
    torch.jit.save(teacher, folder / "teacher.pt")
    np.savez(folder / "dataset.npz", x=data.x, y=data.y, x_val=data.x_val, y_val=data.y_val)
    port = free_port()
    say(f"2/5 starting `distill serve` on port {port} (log: {folder / 'serve.log'})")
    with background_server(port, folder / "serve.log") as url:
        key = (settings.data_dir / "api_key").read_text().strip()
        with Client(url, key) as client:
            say("3/5 uploading teacher and dataset, submitting the job")
            teacher_file = client.upload(folder / "teacher.pt", "teacher")
            dataset_file = client.upload(folder / "dataset.npz", "dataset")
            config = {**data.job_config, "preprocess": data.preprocess}
            if epochs is not None:
                config["epochs"] = epochs
            job = client.create_job(
                teacher=teacher_file.id,
                dataset=dataset_file.id,
                student=data.student,
                config=config,
                metadata={"source": "distill demo"},
            )
            say(f"4/5 job {job.id}: following it")
            started = time.perf_counter()
            job = client.wait(job.id, progress=True, poll_s=0.5)
            job_seconds = time.perf_counter() - started
            say(f"5/5 job {job.status} in {job_seconds:.0f} s; downloading the student")
            student_path = client.download(job.id, "student.pt", folder / "student.pt")
            report = json.loads(client.download(job.id, "report.json", folder / "report.json").read_text())
    student = torch.jit.load(str(student_path))
    pre = data.preprocess

    def raw_teacher(x: torch.Tensor) -> torch.Tensor:  # the student has preprocessing inside; the teacher not
        return teacher((x * pre["scale"] - pre["mean"][0]) / pre["std"][0])

    t_acc, t_ms = accuracy_and_latency(raw_teacher, data.x_test, data.y_test)
    s_acc, s_ms = accuracy_and_latency(student, data.x_test, data.y_test)
    sizes = ((folder / "teacher.pt").stat().st_size, student_path.stat().st_size)
    print_table(
        data, report, teacher, student, (t_acc, t_ms), (s_acc, s_ms), sizes, student_path, job_seconds
    )


def say(text: str) -> None:
    typer.echo(text, err=True)


def print_table(
    data: DemoData,
    report: dict[str, Any],
    teacher: Any,
    student: Any,
    t: tuple[float, float],
    s: tuple[float, float],
    sizes: tuple[int, int],
    student_path: Path,
    job_seconds: float,
) -> None:
    def params(m: Any) -> int:
        return sum(p.numel() for p in m.parameters())

    def pct(v: float | None) -> str:
        return "    -" if v is None else f"{100 * v:5.1f}%"

    def gain(points: float | None) -> str:  # to the table's one decimal, signed; a -0.0 reads as +0.0
        return "- (no baseline)" if points is None else f"{round(points, 1) or 0.0:+.1f} points"

    base = report.get("baseline") or {}
    rows = [
        ("teacher", report["teacher"].get("accuracy"), t[0], params(teacher), sizes[0], t[1]),
        ("student (distilled)", report["student"].get("accuracy"), s[0], params(student), sizes[1], s[1]),
        ("baseline (hard labels)", base.get("accuracy"), None, params(student), None, None),
    ]
    typer.echo(
        f"\n{data.name}: {len(data.x)} training rows, {len(data.x_test)} held-out test rows; "
        f"job took {job_seconds:.0f} s"
    )
    typer.echo(f"{'model':<24}{'val acc':>9}{'test acc':>10}{'params':>11}{'file KB':>9}{'ms/64 rows':>12}")
    for name, val, test, n, size, ms in rows:
        kb = "" if size is None else f"{size / 1024:,.0f}"
        typer.echo(
            f"{name:<24}{pct(val):>9}{pct(test):>10}{n:>11,}{kb:>9}{'' if ms is None else f'{ms:.2f}':>12}"
        )
    hp = report.get("hyperparameters", {})
    typer.echo(
        f"student is {params(teacher) / params(student):.1f}x smaller and {t[1] / s[1]:.1f}x faster "
        f"on CPU; {hp.get('method')} T={hp.get('temperature')} alpha={hp.get('alpha')}; "
        f"KD gain over baseline: {gain(report.get('kd_gain_points'))}"
    )
    typer.echo(f"student (TorchScript, preprocessing inside): {student_path}")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
