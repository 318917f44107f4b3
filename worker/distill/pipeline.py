"""The stages of one job over a local work folder (layout in docs/architecture.md), and `run_all`.

    work/inputs/{teacher,dataset,validation,student_init}/<file>
    work/soft_labels/     manifest.json + shards (softlabels.py)
    work/checkpoints/     the main run's epoch-*.pt + latest.json; finetune/ and baseline/ runs;
                          state.json (chosen T/alpha, why, histories), student.pt, baseline.pt (state dicts)
    work/out/             student.pt student.onnx student.safetensors model_card.json report.json

Every stage is safe to run twice: it reads what is already there and does only what is missing. Only
`soft_labels/` and `checkpoints/` travel between machines (the service mirrors them), so everything a later
stage needs from `distill` lives in `checkpoints/`; `out/` is rebuilt when it is missing. A change of teacher,
data or settings (a different fingerprint in state.json) discards the checkpoints instead of resuming them.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from worker.distill.config import DistillConfig
from worker.distill.distill_stage import distill
from worker.distill.inputs import load_inputs
from worker.distill.outputs import evaluate, export, report_path
from worker.distill.progress import Progress, emit
from worker.distill.softlabels import soft_label_stage
from worker.distill.workfolder import Work, prepare_inputs, read_json

__all__ = ["distill", "evaluate", "export", "prepare_inputs", "preflight", "run_all", "soft_label"]

SOFT_LABEL_BATCH = 1024
TEXT_SOFT_LABEL_BATCH = 64  # a transformer's activations grow with batch x length^2


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def preflight(work: Path, config: DistillConfig) -> dict[str, Any]:
    """Load teacher and data, validate them, run two samples through teacher and student; fail fast."""
    loaded, student = load_inputs(Work(Path(work)), config)
    return loaded.summary(student)


def soft_label(work: Path, config: DistillConfig, on_progress: Progress | None = None) -> dict[str, Any]:
    """Run the teacher once over train and validation rows; resumes at shard granularity."""
    w = Work(Path(work))
    loaded, _ = load_inputs(w, config)
    device = _device()
    splits = [("train", loaded.x, loaded.y)]
    if loaded.x_val is not None and loaded.y_val is not None:
        splits.append(("val", loaded.x_val, loaded.y_val))
    total, done = sum(len(x) for _, x, _ in splits), 0
    manifest: dict[str, Any] = {}
    teacher = loaded.teacher.to(device)
    try:
        for split, x, y in splits:
            manifest = soft_label_stage(
                teacher,
                x,
                w.soft_labels,
                split=split,
                fmt=config.soft_label_format,
                k=config.topk,
                shard_size=config.shard_size,
                batch_size=SOFT_LABEL_BATCH if loaded.text is None else TEXT_SOFT_LABEL_BATCH,
                device=device,
                y=y,
                teacher_sha256=loaded.teacher_sha256,
                dataset_sha256=loaded.dataset_sha256,
                on_progress=functools.partial(_split_progress, on_progress, done, len(x), total),
            )
            done += len(x)
    finally:
        teacher.to("cpu")  # the next stage in this process may get the same teacher (load_inputs keeps it)
    return manifest


def _split_progress(
    on_progress: Progress | None, offset: int, rows: int, total: int, event: dict[str, Any]
) -> None:
    """A soft-label event of one split, as progress over all rows (the splits run one after another)."""
    emit(on_progress, "soft_label", (offset + event["progress"] * rows) / total, **event["metrics"])


def run_all(work: Path, config: DistillConfig, on_progress: Progress | None = None) -> dict[str, Any]:
    """Every stage in order; each skips what an earlier call already finished. Returns the report."""
    emit(on_progress, "preflight", 0.0)
    preflight(work, config)
    emit(on_progress, "preflight", 1.0)
    soft_label(work, config, on_progress)
    distill(work, config, on_progress)
    emit(on_progress, "evaluate", 0.0)
    evaluate(work, config)
    emit(on_progress, "evaluate", 1.0)
    emit(on_progress, "export", 0.0)
    paths = export(work, config)
    emit(on_progress, "export", 1.0, files=len(paths))
    return read_json(report_path(Work(Path(work)))) or {}
