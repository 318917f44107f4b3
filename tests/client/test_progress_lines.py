"""The lines `distill submit --wait` and `distill demo` print while following a job (stderr no terminal)."""

from __future__ import annotations

from typing import Any

import pytest

from app.client.models import Job
from app.client.progress import ProgressPrinter


def job(status: str, epoch: int | None = None, **metrics: Any) -> Job:
    stage = status if status not in ("succeeded", "failed", "cancelled") else "exporting"
    row = {"id": "job_1", "status": status, "stage": stage, "epoch": epoch, "metrics": metrics}
    return Job.from_dict(row)


def test_epochs_of_the_baseline_and_finetune_runs_are_named_and_the_result_shows_at_the_end(
    capsys: pytest.CaptureFixture[str],
) -> None:
    printer = ProgressPrinter("job_1", interactive=False)
    for update in (
        job("distilling", 6, phase="distill", val_acc=0.85),
        job("distilling", 2, phase="finetune", val_acc=0.851),
        job("distilling", 4, phase="baseline", val_acc=0.839),
        job("succeeded", 4, student_accuracy=0.852, baseline_accuracy=0.846),
    ):
        printer.update(update)
    assert capsys.readouterr().err.splitlines() == [
        "job_1 distilling epoch 6 val_acc 0.850",
        "job_1 distilling finetune epoch 2 val_acc 0.851",
        "job_1 distilling baseline epoch 4 val_acc 0.839",
        "job_1 succeeded val_acc 0.852",  # the student's, from the report; not the baseline's last epoch
    ]
