"""Datasets: one in-memory shape for every input format, its validation, and the validation holdout.

`Dataset.x` is float32 (N, *feature_shape) with raw values (preprocessing happens later, in the model);
`y` is int64 (N,) where -1 marks an unlabelled row, which the student learns from the teacher alone.
"""

from __future__ import annotations

import dataclasses
import gzip
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worker.distill import data_formats as formats
from worker.distill.archives import safe_extract
from worker.distill.config import DistillConfig
from worker.distill.errors import DatasetError, MismatchError

ACCEPTED = (
    "NPZ (x, y, x_val, y_val), CSV or Parquet (feature columns + label column), a zip/tar of "
    "class_name/*.png|jpg|webp folders, a WebDataset shard (key.jpg + key.cls), or IDX files (MNIST format: "
    "a folder, an images file, or a zip/tar)"
)


@dataclass(init=False)
class Dataset:
    x: np.ndarray
    y: np.ndarray  # -1 marks an unlabelled row
    x_val: np.ndarray | None
    y_val: np.ndarray | None  # present whenever x_val is
    # From the class names or the largest label when not given; the teacher's output size is authoritative.
    num_classes: int | None
    class_names: list[str] | None

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray | None = None,
        x_val: np.ndarray | None = None,
        y_val: np.ndarray | None = None,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
    ) -> None:
        # Labels are optional on the way in and always there after: a row without one is unlabelled (-1).
        self.x, self.x_val, self.class_names = x, x_val, class_names
        self.y = np.full(len(x), -1, np.int64) if y is None else y
        self.y_val = np.full(len(x_val), -1, np.int64) if x_val is not None and y_val is None else y_val
        self.num_classes = self._classes_seen() if num_classes is None else num_classes

    def __len__(self) -> int:
        return len(self.x)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def num_labelled(self) -> int:
        return int((self.y >= 0).sum())

    @property
    def num_unlabelled(self) -> int:
        return len(self.x) - self.num_labelled

    @property
    def has_validation(self) -> bool:
        return self.x_val is not None

    def _classes_seen(self) -> int | None:
        if self.class_names:
            return len(self.class_names)
        arrays = [a for a in (self.y, self.y_val) if isinstance(a, np.ndarray) and a.dtype.kind in "iu"]
        labels = [a[a >= 0] for a in arrays]  # malformed labels are validate_dataset's to report
        top = max((int(a.max()) for a in labels if a.size), default=-1)
        return top + 1 if top >= 0 else None


def detect_dataset_format(path: Path) -> str:
    """One of npz, csv, parquet, idx, archive, folder, from the bytes first and the suffix last."""
    path = Path(path)
    if path.is_dir():
        return "folder"
    if not path.is_file():
        raise DatasetError(f"dataset {path.name} does not exist", code="dataset_not_found", field="dataset")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"PAR1":
        return "parquet"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        return "npz" if names and all(n.endswith(".npy") for n in names) else "archive"
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as f:
                inner = f.read(4)
        except (OSError, EOFError):
            inner = b""
        if formats.is_idx_header(inner):
            return "idx"
    if formats.is_idx_header(head):
        return "idx"
    try:
        if tarfile.is_tarfile(path):
            return "archive"
    except (OSError, EOFError, tarfile.TarError):
        pass
    if path.suffix.lower() in (".csv", ".txt"):
        return "csv"
    raise DatasetError(
        f"cannot tell what kind of dataset {path.name} is; accepted: {ACCEPTED}",
        code="unknown_dataset_format",
        field="dataset",
    )


def load_dataset(path: Path, config: DistillConfig | None = None, *, val_path: Path | None = None) -> Dataset:
    """Read a dataset in any accepted format (structurally checked), plus an optional validation file."""
    config = config or DistillConfig()
    dataset = _load(Path(path), config, nested=False)
    if val_path is not None:
        _attach_validation(dataset, _load(Path(val_path), config, nested=False))
    validate_dataset(dataset)
    return dataset


def _load(path: Path, config: DistillConfig, *, nested: bool) -> Dataset:
    kind = detect_dataset_format(path)
    if kind == "npz":
        return Dataset(**formats.read_npz(path))
    if kind in ("csv", "parquet"):
        return Dataset(**formats.read_table(path, kind, config.label_column))
    if kind == "idx":
        x, y = formats.read_idx_images(path)
        return Dataset(x=x, y=y)
    if kind == "folder":
        return _load_folder(path, config, nested=nested)
    with tempfile.TemporaryDirectory(prefix="distill-data-") as tmp:
        safe_extract(path, Path(tmp))
        return _load_folder(Path(tmp), config, nested=True)


def _load_folder(root: Path, config: DistillConfig, *, nested: bool) -> Dataset:
    if formats.find_idx_images(root):
        return Dataset(**formats.read_idx_dir(root))
    if formats.find_webdataset(root):
        return Dataset(**formats.read_webdataset(root))
    files = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]
    lone = files[0] if len(files) == 1 and files[0].suffix.lower() not in formats.IMAGE_SUFFIXES else None
    if lone is not None:  # e.g. a zipped CSV; one level only, never an archive inside an archive
        if nested and detect_dataset_format(lone) == "archive":
            raise DatasetError(
                "archives inside archives are not accepted", code="bad_archive", field="dataset"
            )
        return _load(lone, config, nested=nested)
    return Dataset(**formats.read_image_folder(root))


def _attach_validation(dataset: Dataset, val: Dataset) -> None:
    if dataset.x_val is not None:
        raise DatasetError(
            "the dataset already has a validation split; drop the separate validation file",
            code="ambiguous_dataset",
            field="validation",
        )
    dataset.x_val = val.x
    dataset.y_val = formats.translate_labels(val.y, val.class_names, dataset.class_names)
    dataset.num_classes = dataset._classes_seen()


def validate_dataset(dataset: Dataset, num_classes: int | None = None) -> None:
    """Raise the first problem found as DatasetError (or MismatchError against the teacher), naming the field.

    Codes: empty_dataset, bad_dtype, bad_shape, length_mismatch, non_finite, label_out_of_range,
    class_count_mismatch, val_shape_mismatch.
    """
    _check_split(dataset.x, dataset.y, "x", "y", num_classes)
    if dataset.x_val is None:
        if dataset.y_val is not None:
            raise DatasetError("y_val given without x_val", code="bad_shape", field="y_val")
    else:
        _check_split(dataset.x_val, dataset.y_val, "x_val", "y_val", num_classes)
        if dataset.x_val.shape[1:] != dataset.x.shape[1:]:
            raise DatasetError(
                f"validation rows have shape {dataset.x_val.shape[1:]}, training rows {dataset.x.shape[1:]}",
                code="val_shape_mismatch",
                field="x_val",
            )
    if num_classes is not None and dataset.class_names and len(dataset.class_names) != num_classes:
        raise MismatchError(
            f"the dataset names {len(dataset.class_names)} classes but the teacher outputs {num_classes}",
            code="class_count_mismatch",
            field="y",
        )


def _check_split(x: object, y: object, fx: str, fy: str, num_classes: int | None) -> None:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        got = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
        raise DatasetError(f"{fx} must be a float32 array, got {got}", code="bad_dtype", field=fx)
    if x.ndim < 2:
        raise DatasetError(f"{fx} must be (N, features...), got shape {x.shape}", code="bad_shape", field=fx)
    if len(x) == 0 or x[0].size == 0:
        raise DatasetError(f"{fx} is empty (shape {x.shape})", code="empty_dataset", field=fx)
    if not isinstance(y, np.ndarray) or y.dtype != np.int64:
        got = y.dtype if isinstance(y, np.ndarray) else type(y).__name__
        raise DatasetError(f"{fy} must be an int64 array, got {got}", code="bad_dtype", field=fy)
    if y.ndim != 1:
        raise DatasetError(f"{fy} must be (N,), got shape {y.shape}", code="bad_shape", field=fy)
    if len(y) != len(x):
        raise DatasetError(f"{fx} has {len(x)} rows but {fy} has {len(y)}", code="length_mismatch", field=fy)
    finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise DatasetError(
            f"{fx} has NaN or infinite values in {len(bad)} row(s), first at row {bad[0]}",
            code="non_finite",
            field=fx,
        )
    validate_labels(y, fy, num_classes)


def validate_labels(y: np.ndarray, fy: str, num_classes: int | None) -> None:
    """Labels are 0..C-1 (C the teacher's classes when known), or -1 for an unlabelled row."""
    low = np.flatnonzero(y < -1)
    if low.size:
        raise DatasetError(
            f"{fy} has label {y[low[0]]} at row {low[0]}; labels are 0..C-1, or -1 for unlabelled",
            code="label_out_of_range",
            field=fy,
        )
    if num_classes is not None:
        high = np.flatnonzero(y >= num_classes)
        if high.size:
            raise DatasetError(
                f"{fy} has label {y[high[0]]} at row {high[0]} but the teacher has {num_classes} classes "
                f"(0..{num_classes - 1})",
                code="label_out_of_range",
                field=fy,
            )


def split_validation(dataset: Dataset, fraction: float, seed: int) -> Dataset:
    """Hold out `fraction` of the labelled rows, stratified by class, when no validation split was given.

    Unlabelled rows stay in train; a wholly unlabelled set gets a plain random holdout (the report then
    measures teacher-student agreement). Same seed, same split.
    """
    if dataset.x_val is not None or fraction <= 0:
        return dataset
    val_rows = holdout_rows(dataset.y, fraction, seed)
    keep = np.ones(len(dataset), bool)
    keep[val_rows] = False
    return dataclasses.replace(
        dataset, x=dataset.x[keep], y=dataset.y[keep], x_val=dataset.x[val_rows], y_val=dataset.y[val_rows]
    )


def holdout_rows(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The rows (sorted) that `split_validation` holds out of a dataset labelled `y`: the same rows whether
    the dataset is in memory or streams."""
    if not 0 < fraction < 1:
        raise DatasetError(f"validation fraction must be in (0, 1), got {fraction}", field="val_fraction")
    rng = np.random.default_rng(seed)
    labelled = np.flatnonzero(y >= 0)
    by_class = len(labelled) >= 2
    pool = labelled if by_class else np.arange(len(y))
    if len(pool) < 2:
        raise DatasetError("too few rows to hold out a validation split", code="empty_dataset", field="x")
    val = _stratified(y[pool], fraction, rng) if by_class else _random(len(pool), fraction, rng)
    return np.sort(pool[val])


def _holdout_size(n: int, fraction: float) -> int:
    return min(max(round(n * fraction), 1), n - 1)


def _random(n: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(n)[: _holdout_size(n, fraction)]


def _stratified(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Positions into `labels`: each class gets its share of the holdout, remainders by largest fraction."""
    classes, counts = np.unique(labels, return_counts=True)
    total = _holdout_size(len(labels), fraction)
    exact = counts * total / len(labels)
    take = np.floor(exact).astype(int)
    order = np.lexsort((rng.permutation(len(classes)), -(exact - take)))  # ties broken by the seed
    take[order[: total - take.sum()]] += 1
    take = np.minimum(take, np.maximum(counts - 1, 0))  # keep at least one row of each class for training
    picks = [
        rng.choice(np.flatnonzero(labels == c), k, replace=False) for c, k in zip(classes, take, strict=True)
    ]
    return np.concatenate(picks)
