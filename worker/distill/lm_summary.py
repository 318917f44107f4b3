"""What a finished causal-LM job shows of its report (lm_pipeline.lm_evaluate's out/report.json). Free of
torch, like summary.py: the Celery task process reads it and never loads the PyTorch core."""

from __future__ import annotations

from typing import Any


def lm_headline(report: dict[str, Any]) -> dict[str, Any]:
    """The figures a finished LM job shows (and its model card): held-out perplexity of teacher, student and
    the CE-only baseline, the student's agreement with and KL from the teacher, the soft labels' bytes per
    token, and the method that made them."""
    hp = report.get("hyperparameters") or {}
    return {
        "teacher_perplexity": report["teacher"]["perplexity"],
        "student_perplexity": report["student"]["perplexity"],
        "baseline_perplexity": (report["baseline"] or {}).get("perplexity"),
        "agreement": report["student"]["agreement"],
        "kl": report["student"]["kl"],
        "bytes_per_token": report["soft_labels"]["bytes_per_token"],
        "method": hp.get("method"),
        "temperature": hp.get("temperature"),
        "alpha": hp.get("alpha"),
    }
