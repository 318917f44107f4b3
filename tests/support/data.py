"""Problems small enough to distil in seconds: Gaussian classes with a small MLP teacher saved as TorchScript
and the rows as NPZ, and the writers for teachers and datasets that tests build themselves."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Problem:
    teacher: Path  # TorchScript
    dataset: Path  # NPZ with x (float32) and y (int64)
    x_test: np.ndarray  # held-out rows from the same classes, raw features
    y_test: np.ndarray
    teacher_accuracy: float | None  # on the held-out rows; None without them

    def accuracy_of(self, model: Path) -> float:
        """The share of held-out rows a saved TorchScript classifier labels right."""
        import torch

        scripted = torch.jit.load(str(model))
        with torch.no_grad():
            predicted = scripted(torch.from_numpy(self.x_test)).argmax(1).numpy()
        return float((predicted == self.y_test).mean())


def gaussian_problem(
    folder: Path,
    *,
    classes: int = 3,
    features: int = 8,
    spread: float = 2.0,
    rows: int = 400,
    test_rows: int = 300,
    hidden: int = 32,
    steps: int = 100,
    lr: float = 1e-2,
    seed: int = 0,
) -> Problem:
    """`classes` Gaussian blobs in `features` dimensions (centres drawn with std `spread`, unit noise), and
    an MLP teacher (one hidden layer) trained on them for `steps` Adam steps: teacher.pt and train.npz in
    `folder`, and `test_rows` held out. With `steps=0` the teacher is its random initialisation.

    The defaults: three classes in 8 dimensions, 400 rows and 300 held out, a 32-unit teacher that separates
    them well (chance is 33%)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, spread, (classes, features)).astype(np.float32)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, classes, n)
        return (centers[y] + rng.normal(0, 1.0, (n, features))).astype(np.float32), y.astype(np.int64)

    x, y = sample(rows)
    x_test, y_test = sample(test_rows) if test_rows else (x[:0], y[:0])
    torch.manual_seed(0)
    nn = torch.nn
    teacher = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))
    opt = torch.optim.Adam(teacher.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(teacher(xt), yt).backward()
        opt.step()
    teacher.eval()
    accuracy = None
    if test_rows:
        with torch.no_grad():
            accuracy = float((teacher(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    teacher_path, dataset_path = write_inputs(folder, teacher, x, y)
    return Problem(teacher_path, dataset_path, x_test, y_test, accuracy)


def write_inputs(folder: Path, teacher: object, x: np.ndarray, y: np.ndarray) -> tuple[Path, Path]:
    """`teacher` (an nn.Module) scripted to folder/teacher.pt and the rows to folder/train.npz."""
    import torch

    torch.jit.save(torch.jit.script(teacher), folder / "teacher.pt")
    np.savez(folder / "train.npz", x=x, y=y)
    return folder / "teacher.pt", folder / "train.npz"


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """An NPZ file of `arrays`, in memory."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def torchscript_bytes(module: object) -> bytes:
    """`module` (an nn.Module) scripted and saved, in memory."""
    import torch

    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


def onnx_external_weight(location: str) -> Any:
    """An 8x3 float ONNX initializer `w` whose 96 bytes live in external data at `location` (an
    onnx.TensorProto): what a model that reads a file outside its folder carries."""
    from onnx import TensorProto

    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[8, 3])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "96")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    return weight
