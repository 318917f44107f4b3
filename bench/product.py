"""The product as a user drives it: a work folder with the teacher and an NPZ dataset, then the pipeline.

Every benchmark goes through here, so a table always measures `worker.distill.pipeline` (and through it the
product's loader, soft-label stage, autotune and training loop), never a re-implementation of it.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.fmnist import MEAN, SCALE, STD
from worker.distill import pipeline
from worker.distill.config import DistillConfig
from worker.distill.data import Dataset, split_validation

PREPROCESS = {"scale": SCALE, "mean": [MEAN], "std": [STD]}


def product_split(n_rows: int, y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, val) of the product's own seeded stratified holdout.

    `split_validation` works on a `Dataset`, so it is handed the row numbers as a one-column feature and the
    split it returns names the rows it picked (float32 holds integers exactly up to 2**24).
    """
    ids = Dataset(
        x=np.arange(n_rows, dtype=np.float32)[:, None],
        y=y.astype(np.int64),
        x_val=None,
        y_val=None,
        num_classes=int(y.max()) + 1,
        class_names=None,
    )
    split = split_validation(ids, fraction, seed)
    return split.x[:, 0].astype(np.int64), split.x_val[:, 0].astype(np.int64)


def make_work(
    work: Path,
    teacher: Path,
    x: np.ndarray,
    y: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    soft_labels_from: Path | None = None,
) -> Path:
    """A fresh work folder holding the teacher and `data.npz` (raw pixels, labels with -1 = unlabelled).

    `soft_labels_from` copies another work folder's soft labels: the stage resumes from them only when
    their manifest matches this teacher and dataset byte for byte, so this is the product's own reuse.
    """
    shutil.rmtree(work, ignore_errors=True)
    (work / "inputs" / "teacher").mkdir(parents=True)
    (work / "inputs" / "dataset").mkdir(parents=True)
    shutil.copy(teacher, work / "inputs" / "teacher" / teacher.name)
    np.savez(work / "inputs" / "dataset" / "data.npz", x=x, y=y, x_val=x_val, y_val=y_val)
    if soft_labels_from is not None and (soft_labels_from / "soft_labels").exists():
        shutil.copytree(soft_labels_from / "soft_labels", work / "soft_labels")
    return work


def config(student: str, **overrides: Any) -> DistillConfig:
    settings = {
        "student": student,
        "preprocess": PREPROCESS,
        "baseline": False,
        "export_formats": ["torchscript"],
        **overrides,
    }
    return DistillConfig.from_dict(settings)


def run(work: Path, cfg: DistillConfig) -> dict[str, Any]:
    """soft_label + distill + evaluate + export; returns the report, the exported student and stage times."""
    times: dict[str, float] = {}
    out: dict[str, Any] = {}
    for stage in ("soft_label", "distill", "evaluate", "export"):
        start = time.perf_counter()
        fn = getattr(pipeline, stage)
        out[stage] = fn(work, cfg, None) if stage in ("soft_label", "distill") else fn(work, cfg)
        times[stage] = time.perf_counter() - start
    student = torch.jit.load(work / "out" / "student.pt")
    return {"student": student, "distill": out["distill"], "report": out["evaluate"], "seconds": times}
