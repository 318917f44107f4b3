"""Fashion-MNIST for the benchmarks, read straight from the Debian package's IDX files.

The benchmarks read the raw files themselves (a few lines of numpy) so that the teacher and the raw-PyTorch
baselines do not depend on the product's loader; `quality.py` and `speed.py` still feed the product through
its own `load_dataset`.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

FMNIST_DIR = Path(os.environ.get("FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))
CACHE_DIR = Path(os.environ.get("DISTILL_BENCH_CACHE", Path.home() / ".cache" / "distill-bench"))
# Pixel statistics of the Fashion-MNIST training set after scaling to [0, 1].
SCALE, MEAN, STD = 1.0 / 255.0, 0.2860, 0.3530


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as a numpy array of its stored dtype (uint8 for (Fashion-)MNIST)."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """`split` "train" or "t10k" -> raw pixels uint8 (N, 1, 28, 28), labels int64 (N,).

    Raw uint8 is what a user uploads (4x smaller NPZ files than float32); the product casts to float32."""
    x = read_idx(FMNIST_DIR / f"{split}-images-idx3-ubyte.gz")[:, None]
    y = read_idx(FMNIST_DIR / f"{split}-labels-idx1-ubyte.gz").astype(np.int64)
    return x, y


def preprocess(x: np.ndarray) -> np.ndarray:
    """The same `(x * scale - mean) / std` the product's `Preprocess` applies."""
    return ((x.astype(np.float32) * SCALE - MEAN) / STD).astype(np.float32)


def stratified_subset(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Positions of a seeded `fraction` of each class in `y`, sorted."""
    rng = np.random.default_rng(seed)
    picks = [
        rng.choice(np.flatnonzero(y == c), max(1, round(fraction * int((y == c).sum()))), replace=False)
        for c in np.unique(y)
    ]
    return np.sort(np.concatenate(picks))
