"""A tiny distillation job for the pipeline and CLI tests: Gaussian clusters with raw values far from zero,
a TorchScript teacher that is Bayes-optimal for them on the preprocessed scale, and an NPZ dataset.

The teacher only works after preprocessing (`x * 0.02 - 2`), so an exported student that is accurate on raw
input proves the preprocessing travelled inside it.
"""

from pathlib import Path

import numpy as np
import torch
from torch import nn

CLASSES, FEATURES = 3, 8
PREPROCESS = {"scale": 0.02, "mean": [2.0], "std": [1.0]}


def clusters(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw rows (n, FEATURES) float32, labels (n,), and the cluster centres on the preprocessed scale."""
    centres = np.random.default_rng(0).normal(size=(CLASSES, FEATURES)) * 1.2
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, size=n)
    z = centres[y] + rng.normal(size=(n, FEATURES))
    raw = (z + 2.0) / 0.02
    return raw.astype(np.float32), y.astype(np.int64), centres


def write_job(folder: Path, *, rows: int = 600, unlabelled: int = 100) -> tuple[Path, Path]:
    """Teacher (TorchScript) and dataset (NPZ, the first `unlabelled` rows labelled -1) under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    raw, y, centres = clusters(rows, seed=1)
    y[:unlabelled] = -1
    mu = torch.tensor(centres, dtype=torch.float32)
    teacher = nn.Linear(FEATURES, CLASSES)
    with torch.no_grad():  # equal-variance Gaussians: logit_c = z . mu_c - |mu_c|^2 / 2 is Bayes-optimal
        teacher.weight.copy_(mu)
        teacher.bias.copy_(-(mu**2).sum(1) / 2)
    teacher_path, data_path = folder / "teacher.pt", folder / "data.npz"
    torch.jit.save(torch.jit.script(teacher.eval()), str(teacher_path))
    np.savez(data_path, x=raw, y=y)
    return teacher_path, data_path
