"""The terminal progress bar `Client.wait` shows: stage, epoch, validation accuracy and tqdm's ETA.

Progress is drawn per stage (the bar restarts when the stage changes) because the server reports a stage's
own 0..1 fraction, and an ETA across stages of very different speed would mislead. When stderr is not a
terminal (a log file, CI), it prints one line per stage or epoch instead of redrawing a bar.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

from app.client.models import Job

ACCURACY_KEYS = ("student_accuracy", "val_accuracy", "val_acc", "accuracy")  # finished, then per epoch


def val_accuracy(metrics: dict[str, Any]) -> float | None:
    for key in ACCURACY_KEYS:
        if isinstance(metrics.get(key), (int, float)):
            return float(metrics[key])
    return None


class ProgressPrinter:
    def __init__(self, job_id: str, *, interactive: bool | None = None) -> None:
        self.job_id = job_id
        self.stage: str | None = None
        self.bar: tqdm | None = None
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.last_line: str | None = None

    def update(self, job: Job) -> None:
        if not self.interactive:
            self._print_line(job)
            return
        stage = job.stage or job.status
        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=100, desc=f"{job.id} {stage}", unit="%", file=sys.stderr, leave=True,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]")
        assert self.bar is not None
        self.bar.n = round(100 * min(max(job.progress, 0.0), 1.0), 1)
        postfix = {}
        if job.epoch is not None and not job.done:
            postfix["epoch"] = f"{_phase(job)}{job.epoch}"
        acc = val_accuracy(job.metrics)
        if acc is not None:
            postfix["val_acc"] = f"{acc:.3f}"
        if job.done:
            postfix["status"] = job.status
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def _print_line(self, job: Job) -> None:
        parts = [job.id, job.status if job.done else (job.stage or job.status)]
        if job.epoch is not None and not job.done:
            parts.append(f"{_phase(job)}epoch {job.epoch}")
        acc = val_accuracy(job.metrics)
        if acc is not None:
            parts.append(f"val_acc {acc:.3f}")
        line = " ".join(parts)
        if line != self.last_line:
            print(line, file=sys.stderr, flush=True)
            self.last_line = line

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _phase(job: Job) -> str:
    """The distill stage trains up to three models in turn; name the fine-tune and baseline runs, so their
    epochs and accuracy are not read as the student's."""
    phase = job.metrics.get("phase")
    return f"{phase} " if isinstance(phase, str) and phase not in ("distill", "") else ""
