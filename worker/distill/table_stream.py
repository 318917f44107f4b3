"""A Parquet table larger than memory: read one row group at a time into a memory-mapped float32 `.npy` in
the work folder, then streamed from the map (streams.RowStream).

The conversion holds one row group at a time and checks what the in-memory reader checks (numeric feature
columns, finite values, integer or named labels), naming the row. Class names are collected in a first
pass over the label column alone, so ids are the same sorted names the in-memory reader gives. Training
then reads its batches from the map: the operating system keeps what fits of it in its page cache, and
the process holds a batch. The map is written once per input file and label column (`.stream/` in the work
folder) and reused by the later stages of the job on that machine.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from worker.distill.data_formats import labels_to_int
from worker.distill.errors import DatasetError
from worker.distill.streams import Rows, RowStream, StreamedData, Transform, positions

STREAM_ABOVE_BYTES = 1 << 30  # "auto": tables whose float32 features are larger stream


def is_parquet(path: Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"PAR1"


def table_should_stream(path: Path, streaming: str, label_column: str) -> bool:
    """A Parquet file streams when `streaming` is "always", or "auto" and its features would take more than
    STREAM_ABOVE_BYTES as float32 (from the footer; an unreadable footer is the in-memory reader's to
    report)."""
    if streaming == "never" or not is_parquet(path):
        return False
    if streaming == "always":
        return True
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception:  # noqa: BLE001 - pyarrow raises its own error types on a bad footer
        return False
    features = sum(1 for name in meta.schema.names if name != label_column)
    return int(meta.num_rows) * features * 4 > STREAM_ABOVE_BYTES


@lru_cache(maxsize=4)
def _mapped(path: str) -> np.ndarray:
    mapped: np.ndarray = np.load(path, mmap_mode="r")
    return mapped


@dataclass(frozen=True)
class TableStream(RowStream):
    """Rows of a memory-mapped float32 (N, F) `.npy`, `rows` the positions this stream holds."""

    path: str
    rows: np.ndarray
    features: int
    transform: Transform | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def row_shape(self) -> tuple[int, ...]:
        return (self.features,)

    def __getitem__(self, index: Tensor | np.ndarray | slice) -> TableStream:
        return replace(self, rows=self.rows[positions(len(self), index)])

    def with_transform(self, transform: Transform | None) -> TableStream:
        return replace(self, transform=transform)

    def batches(
        self, lists: Sequence[Rows], workers: int | None = None, device: torch.device | None = None
    ) -> Iterator[Tensor]:
        on_device = device is not None and device.type != "cpu"
        for index in lists:
            x = self._read(np.asarray(index, np.int64))
            if on_device:
                x = x.to(device, non_blocking=True)
            if self.transform is not None:
                with torch.no_grad():  # never yield inside: the caller would run without autograd
                    x = self.transform(x)
            yield x

    def raw(self, index: slice) -> Tensor:
        return self._read(positions(len(self), index))

    def _read(self, index: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(_mapped(self.path)[self.rows[index]]))


def open_table_stream(path: Path, label_column: str, cache: Path) -> StreamedData:
    """The table's features memory-mapped under `cache` (written on the first call), labels in memory."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        table = pq.ParquetFile(path)
        names = list(table.schema_arrow.names)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises its own error types
        raise DatasetError(f"cannot read parquet file {path.name}: {exc}", code="bad_table") from None
    columns = [c for c in names if c != label_column]
    if not columns:
        raise DatasetError(
            f"{path.name} has no feature columns besides {label_column!r}", code="bad_shape", field="x"
        )
    schema = table.schema_arrow
    bad = [c for c in columns if not _numeric(schema.field(c).type)]
    if bad:
        raise DatasetError(
            f"feature columns must be numeric; not numeric: {', '.join(bad[:10])}"
            f"{'' if label_column in names else f' (no label column named {label_column!r})'}",
            code="bad_dtype",
            field="x",
        )
    n = int(table.metadata.num_rows)
    if n == 0:
        raise DatasetError(f"{path.name} has no rows", code="empty_dataset", field="x")
    has_labels = label_column in names
    class_names = None
    if has_labels and not _numeric(schema.field(label_column).type):
        class_names = _class_names(table, label_column)
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{label_column}".encode())
    folder = Path(cache) / key.hexdigest()[:24]
    x_path, y_path = folder / "x.npy", folder / "y.npy"
    if not (x_path.is_file() and y_path.is_file()):
        _convert(table, columns, label_column if has_labels else None, class_names, n, folder)
    y = np.load(y_path, allow_pickle=False)
    stream = TableStream(str(x_path), np.arange(n, dtype=np.int64), len(columns))
    return StreamedData(stream, y, None, None, class_names)


def _numeric(kind: object) -> bool:
    import pyarrow as pa

    return bool(
        pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
    )


def _class_names(table: object, label_column: str) -> list[str]:
    found: set[str] = set()
    for group in range(table.num_row_groups):  # type: ignore[attr-defined]
        values = table.read_row_group(group, columns=[label_column]).column(0).to_pylist()  # type: ignore[attr-defined]
        found.update(str(v).strip() for v in values if v is not None and str(v).strip())
    return sorted(found)


def _convert(
    table: object,
    columns: list[str],
    label_column: str | None,
    class_names: list[str] | None,
    n: int,
    folder: Path,
) -> None:
    """Row group by row group into folder/x.npy (float32 (N, F), memory-mapped) and folder/y.npy."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".x.{os.getpid()}.npy"
    x = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, len(columns)))
    y = np.full(n, -1, np.int64)
    index = {name: i for i, name in enumerate(class_names or [])}
    start = 0
    wanted = columns + ([label_column] if label_column else [])
    for group in range(table.num_row_groups):  # type: ignore[attr-defined]
        block = table.read_row_group(group, columns=wanted)  # type: ignore[attr-defined]
        rows = block.num_rows
        features = np.column_stack(
            [block.column(c).to_numpy(zero_copy_only=False).astype(np.float32) for c in columns]
        )
        finite = np.isfinite(features).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise DatasetError(
                f"x has NaN or infinite values at row {start + int(bad[0])}", code="non_finite", field="x"
            )
        x[start : start + rows] = features
        if label_column is not None:
            labels = block.column(label_column)
            if class_names is not None:
                text = [None if v is None else str(v).strip() for v in labels.to_pylist()]
                y[start : start + rows] = [index[t] if t else -1 for t in text]
            else:
                y[start : start + rows] = labels_to_int(
                    labels.to_numpy(zero_copy_only=False).astype(np.float64), label_column
                )
        start += rows
    x.flush()
    del x
    np.save(folder / ".y.npy", y, allow_pickle=False)
    os.replace(folder / ".y.npy", folder / "y.npy")
    os.replace(tmp, folder / "x.npy")
