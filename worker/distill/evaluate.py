"""The evaluation report: how good the student is, how close to the teacher, how much smaller and faster.

Accuracy counts labelled rows only (label -1 = unlabelled); agreement is top-1 fidelity to the teacher and
needs no labels. Latency is CPU, one thread, one batch of 256 raw rows, median of a few runs: the number a
user deploying on a small CPU box sees. `kd_gain` is in accuracy points over the same student trained on
hard labels alone with the same budget.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.distill.streams import RowStream, row_batches

LATENCY_BATCH = 256
WARMUP_RUNS = 2


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float | None:
    """Top-1 accuracy over rows with `y >= 0`; None when no row is labelled."""
    y = torch.as_tensor(y)
    labelled = y >= 0
    if not bool(labelled.any()):
        return None
    return float((logits.argmax(1)[labelled] == y[labelled]).float().mean())


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Fraction of rows where student and teacher pick the same class."""
    return float((student_logits.argmax(1) == teacher_logits.argmax(1)).float().mean())


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def bytes_on_disk(paths: Iterable[Path]) -> int:
    return sum(Path(p).stat().st_size for p in paths)


@torch.inference_mode()
def predict(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor | RowStream, batch_size: int = 1024
) -> torch.Tensor:
    """Logits (N, C) float32 of `fn` over `x` (rows in memory, or read from a stream), in batches."""
    return torch.cat([fn(batch).float() for batch in row_batches(x, len(x), batch_size)])


@torch.inference_mode()
def cpu_latency_ms(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, runs: int = 5) -> float:
    """Median milliseconds of `fn` on one CPU thread over a batch of `LATENCY_BATCH` rows drawn from `x`."""
    reps = -(-LATENCY_BATCH // len(x))
    batch = x.cpu().float().repeat(reps, *([1] * (x.dim() - 1)))[:LATENCY_BATCH].contiguous()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(WARMUP_RUNS):  # first calls pay for allocation and TorchScript's profiling passes
            fn(batch)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn(batch)
            times.append((time.perf_counter() - start) * 1000)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


TEXT_LATENCY_TEXTS = 32


@torch.inference_mode()
def text_latency_ms(
    fn: Callable[[torch.Tensor], torch.Tensor],
    encode: Callable[[str], torch.Tensor],
    texts: list[str],
    *,
    runs: int = 3,
) -> float:
    """Median milliseconds per text on one CPU thread, one text at a time, tokenization included
    (`encode` turns a text into ids (1, L)): what serving one request costs."""
    sample = texts[:TEXT_LATENCY_TEXTS]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fn(encode(sample[0]))  # warm-up: allocation, lazy initialisation
        times = []
        for _ in range(runs):
            for text in sample:
                start = time.perf_counter()
                fn(encode(text))
                times.append((time.perf_counter() - start) * 1000)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


def _ratio(a: float | int | None, b: float | int | None) -> float | None:
    return float(a) / float(b) if a is not None and b else None


def build_report(
    *,
    y_val: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    baseline_logits: torch.Tensor | None,
    teacher: dict[str, Any],
    student: dict[str, Any],
    hyperparameters: dict[str, Any],
) -> dict[str, Any]:
    """Assemble the report from validation logits (N, C) and the measured sizes/latencies.

    `teacher`/`student` carry `parameters`, `bytes`, `latency_ms` (any may be None); `hyperparameters`
    carries method, temperature, alpha and why they were chosen.
    """
    t_acc, s_acc = accuracy(teacher_logits, y_val), accuracy(student_logits, y_val)
    report: dict[str, Any] = {
        "validation_rows": int(len(y_val)),
        "labelled_validation_rows": int((torch.as_tensor(y_val) >= 0).sum()),
        "teacher": {**teacher, "accuracy": t_acc},
        "student": {**student, "accuracy": s_acc, "agreement": agreement(student_logits, teacher_logits)},
        "baseline": None,
        "kd_gain_points": None,
        "speedup": _ratio(teacher.get("latency_ms"), student.get("latency_ms")),
        "compression": _ratio(teacher.get("parameters"), student.get("parameters")),
        "hyperparameters": hyperparameters,
    }
    if baseline_logits is not None:
        b_acc = accuracy(baseline_logits, y_val)
        report["baseline"] = {"accuracy": b_acc, "agreement": agreement(baseline_logits, teacher_logits)}
        if s_acc is not None and b_acc is not None:
            report["kd_gain_points"] = round(100 * (s_acc - b_acc), 4)
    return report
