"""What a finished job shows of its report. Free of torch: the Celery task process reads it too, and that
process never loads the PyTorch core (only the stage's child does)."""

from __future__ import annotations

from typing import Any


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The figures a finished job shows (and its model card): the student beside teacher and baseline."""
    hp = report.get("hyperparameters") or {}
    return {
        "student_accuracy": report["student"]["accuracy"],
        "teacher_accuracy": report["teacher"]["accuracy"],
        "baseline_accuracy": (report["baseline"] or {}).get("accuracy"),
        "agreement": report["student"]["agreement"],
        "kd_gain_points": report["kd_gain_points"],
        "speedup": report["speedup"],
        "compression": report["compression"],
        "evaluated_on": report["evaluated_on"],
        "method": hp.get("method"),
        "temperature": hp.get("temperature"),
        "alpha": hp.get("alpha"),
    }
