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

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.distill.augment import Augment, apply_views, view_params_name, view_split
from worker.distill.config import DistillConfig
from worker.distill.distill_stage import distill
from worker.distill.errors import DistillError
from worker.distill.inputs import Loaded, load_inputs
from worker.distill.outputs import evaluate, export, report_path
from worker.distill.progress import Progress, emit
from worker.distill.shard_plan import shard_indices
from worker.distill.softlabels import soft_label_stage
from worker.distill.streams import RowStream
from worker.distill.workfolder import Work, prepare_inputs, read_json

__all__ = [
    "distill",
    "evaluate",
    "export",
    "prepare_inputs",
    "preflight",
    "run_all",
    "soft_label",
    "soft_label_rows",
    "split_rows",
]

SOFT_LABEL_BATCH = 1024
TEXT_SOFT_LABEL_BATCH = 64  # a transformer's activations grow with batch x length^2


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def preflight(work: Path, config: DistillConfig) -> dict[str, Any]:
    """Load teacher and data, validate them, run two samples through teacher and student; fail fast."""
    loaded, student = load_inputs(Work(Path(work)), config)
    return loaded.summary(student)


def soft_label(work: Path, config: DistillConfig, on_progress: Progress | None = None) -> dict[str, Any]:
    """Run the teacher once over train and validation rows; resumes at shard granularity (and reuses the
    shards that the tasks of a stage split over workers vouched for)."""
    w = Work(Path(work))
    loaded, _ = load_inputs(w, config)
    splits = _splits(loaded)
    views = _views(w, loaded, config)
    total, done = sum(len(x) for _, x, _ in splits) + len(loaded.y) * len(views), 0
    manifest: dict[str, Any] = {}
    with _on_device(loaded) as (teacher, device):
        for split, x, y in [*splits, *((name, None, loaded.y) for name in views)]:
            if x is None:  # an augmented view of the training rows, made only while its labels are made
                x = _augmented(loaded.x, views[split])
            manifest = soft_label_stage(
                teacher,
                x,
                w.soft_labels,
                split=split,
                y=y,
                on_progress=functools.partial(_split_progress, on_progress, done, len(x), total),
                **_stage_settings(loaded, config, device),
            )
            done += len(x)
    return manifest


def _views(w: Work, loaded: Loaded, config: DistillConfig) -> dict[str, torch.Tensor]:
    """With `augment`: each view's split name and parameters (augment.py), the parameters written beside the
    soft labels (the same bytes on every run: a view is a function of the settings and the rows)."""
    augment = Augment.from_config(config.augment)
    if augment is None:
        return {}
    _, _, height, width = loaded.x.shape
    views = {}
    w.soft_labels.mkdir(parents=True, exist_ok=True)
    for view in range(config.views):
        params = augment.sample(len(loaded.y), height, width, view)
        path = w.soft_labels / view_params_name(view)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a path
            np.save(f, params.numpy(), allow_pickle=False)
        tmp.replace(path)
        views[view_split(view)] = params
    return views


def _augmented(
    x: torch.Tensor | RowStream, params: torch.Tensor, chunk: int = 4096
) -> torch.Tensor | RowStream:
    if isinstance(x, RowStream):  # each batch is cropped and flipped as it is read
        return x.with_views(params)
    with torch.no_grad():
        parts = [apply_views(x[i : i + chunk], params[i : i + chunk]) for i in range(0, len(x), chunk)]
    return torch.cat(parts)


def split_rows(work: Path, config: DistillConfig) -> dict[str, int]:
    """How many rows the soft-label stage labels per split (`train`, and `val` when there is one)."""
    loaded, _ = load_inputs(Work(Path(work)), config)
    return {split: len(x) for split, x, _ in _splits(loaded)}


def soft_label_rows(
    work: Path,
    config: DistillConfig,
    split: str,
    start: int,
    end: int,
    on_progress: Progress | None = None,
) -> dict[str, Any]:
    """One task of a soft-label stage split over workers: the shards covering rows [start, end) of `split`
    (whole shards, as `shard_plan.task_ranges` cut them), vouched for by their part file, which is returned.
    The same shard files, byte for byte, as `soft_label` writes for those rows."""
    w = Work(Path(work))
    loaded, _ = load_inputs(w, config)
    found = [(x, y) for name, x, y in _splits(loaded) if name == split]
    if not found:
        raise DistillError(f"this dataset has no {split!r} split to label", code="bad_shard_range")
    try:
        shards = shard_indices(start, end, config.shard_size)
    except ValueError as exc:
        raise DistillError(str(exc), code="bad_shard_range") from None
    with _on_device(loaded) as (teacher, device):
        return soft_label_stage(
            teacher,
            found[0][0],
            w.soft_labels,
            split=split,
            shards=shards,
            on_progress=functools.partial(_split_progress, on_progress, 0, 1, 1),
            **_stage_settings(loaded, config, device),
        )


def _splits(loaded: Loaded) -> list[tuple[str, Any, Any]]:
    splits = [("train", loaded.x, loaded.y)]
    if loaded.x_val is not None and loaded.y_val is not None:
        splits.append(("val", loaded.x_val, loaded.y_val))
    return splits


def _stage_settings(loaded: Loaded, config: DistillConfig, device: torch.device) -> dict[str, Any]:
    """What every call of the soft-label stage of one job shares: a split's shards are the same files
    whichever call (the whole stage, or one task of it) writes them."""
    return {
        "fmt": config.soft_label_format,
        "k": config.topk,
        "shard_size": config.shard_size,
        "batch_size": _batch_rows(loaded),
        "device": device,
        "teacher_sha256": loaded.teacher_sha256,
        "dataset_sha256": loaded.dataset_sha256,
    }


def _batch_rows(loaded: Loaded) -> int:
    if loaded.text is not None:
        return TEXT_SOFT_LABEL_BATCH
    return loaded.x.batch_rows(SOFT_LABEL_BATCH) if isinstance(loaded.x, RowStream) else SOFT_LABEL_BATCH


@contextlib.contextmanager
def _on_device(loaded: Loaded) -> Iterator[tuple[Any, torch.device]]:
    device = _device()
    teacher = loaded.teacher.to(device)
    try:
        yield teacher, device
    finally:
        teacher.to("cpu")  # the next stage in this process may get the same teacher (load_inputs keeps it)


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
