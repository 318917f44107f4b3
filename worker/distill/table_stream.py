"""Rows read from a memory map (streams.RowStream): a Parquet table larger than memory, read one row group
at a time into a float32 `.npy` in the work folder; and an NPZ whose arrays are stored uncompressed
(`np.savez`), mapped where they lie inside the file, uint8 images staying uint8 until the batch.

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
from worker.distill.streams import Rows, RowStream, StreamedData, Transform, positions, prepared, transform_on

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


@lru_cache(maxsize=8)
def _mapped(path: str, offset: int | None, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only map of the array: a `.npy` file (offset None), or raw data at `offset` inside a file."""
    if offset is None:
        mapped: np.ndarray = np.load(path, mmap_mode="r")
        return mapped
    return np.memmap(path, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape)


@dataclass(frozen=True)
class TableStream(RowStream):
    """Rows of a memory-mapped array (`path`: a `.npy`, or a file holding the raw array at `offset`, of
    `dtype` and full `array_shape`); `rows` the positions this stream holds. Rows come out float32."""

    path: str
    rows: np.ndarray
    array_shape: tuple[int, ...]
    dtype: str = "float32"
    offset: int | None = None
    transform: Transform | None = None
    views: Tensor | None = None  # images: (N, 5) crop/flip per row (augment.py), applied after the transform

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.array_shape[1:])

    def __getitem__(self, index: Tensor | np.ndarray | slice) -> TableStream:
        rows = positions(len(self), index)
        views = None if self.views is None else self.views[torch.as_tensor(rows)]
        return replace(self, rows=self.rows[rows], views=views)

    def with_transform(self, transform: Transform | None) -> TableStream:
        return replace(self, transform=transform)

    def with_views(self, params: Tensor) -> TableStream:
        return replace(self, views=params)

    def batches(
        self, lists: Sequence[Rows], workers: int | None = None, device: torch.device | None = None
    ) -> Iterator[Tensor]:
        transform = transform_on(self.transform, device)
        for index in lists:  # as stored (uint8 images stay uint8) until `prepared`
            yield prepared(self._read(np.asarray(index, np.int64)), index, transform, self.views, device)

    def raw(self, index: slice) -> Tensor:
        return self._read(positions(len(self), index)).float()

    def _read(self, index: np.ndarray) -> Tensor:
        array = _mapped(self.path, self.offset, self.dtype, self.array_shape)
        return torch.from_numpy(np.ascontiguousarray(array[self.rows[index]]))


# -- NPZ ----------------------------------------------------------------------------------------------------


def mapped_npz_array(path: Path, field: str) -> tuple[int, str, tuple[int, ...]] | None:
    """Where `field`.npy's data lies inside the NPZ (offset, dtype, shape), when it is stored uncompressed in
    C order with a plain numeric dtype; else None (that array is read whole)."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        try:
            info = zf.getinfo(f"{field}.npy")
        except KeyError:
            return None
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        f.seek(info.header_offset + 30 + name_len + extra_len)
        try:
            version = np.lib.format.read_magic(f)
            fmt = np.lib.format
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
        except ValueError:
            return None
        offset = f.tell()
    if fortran or dtype.hasobject or dtype.kind not in "iubf":
        return None
    end = offset + int(np.prod(shape)) * dtype.itemsize
    if end > info.header_offset + 30 + name_len + extra_len + info.file_size:
        raise DatasetError(f"NPZ array {field!r} is truncated", code="bad_dtype", field=field)
    return offset, dtype.str, tuple(int(d) for d in shape)


def npz_should_stream(path: Path, streaming: str) -> bool:
    """An NPZ streams when its `x` is stored uncompressed and `streaming` is "always", or "auto" and x would
    take more than STREAM_ABOVE_BYTES as float32 (a compressed x is read whole, under the decode cap)."""
    import zipfile

    if streaming == "never" or not Path(path).is_file() or not zipfile.is_zipfile(path):
        return False
    try:
        found = mapped_npz_array(path, "x")
        with zipfile.ZipFile(path) as zf:
            has_val = "x_val.npy" in zf.namelist()
        if found is None or (has_val and mapped_npz_array(path, "x_val") is None):
            return False  # a compressed array is read whole, under the decode cap
    except (DatasetError, OSError, zipfile.BadZipFile, ValueError, EOFError):
        return False
    return streaming == "always" or int(np.prod(found[2])) * 4 > STREAM_ABOVE_BYTES


def open_npz_stream(path: Path) -> StreamedData:
    """x (and x_val) mapped in place; y, y_val and class_names read (they are small)."""
    from worker.distill.data_formats import labels_to_int

    path = Path(path)
    found = mapped_npz_array(path, "x")
    if found is None:
        raise DatasetError("x is compressed: an NPZ streams only when written with np.savez", field="x")
    _check_small_members(path, rows=found[2][0])
    with np.load(path, allow_pickle=False) as npz:
        small = {k: npz[k] for k in ("y", "y_val", "class_names") if k in npz.files}
        has_val = "x_val" in npz.files
    x = _npz_stream(path, "x", found)
    _check_finite(x, "x")
    y = labels_to_int(small["y"], "y") if "y" in small else np.full(len(x), -1, np.int64)
    _check_length(x, y, "x", "y")
    x_val = y_val = None
    if has_val:
        val = mapped_npz_array(path, "x_val")
        if val is None:  # npz_should_stream checked it: a file changed under us
            raise DatasetError("x_val is compressed: write the NPZ with np.savez to stream", field="x_val")
        x_val = _npz_stream(path, "x_val", val)
        _check_finite(x_val, "x_val")
        y_val = (
            labels_to_int(small["y_val"], "y_val") if "y_val" in small else np.full(len(x_val), -1, np.int64)
        )
        _check_length(x_val, y_val, "x_val", "y_val")
        if x_val.row_shape != x.row_shape:
            raise DatasetError(
                f"validation rows have shape {x_val.row_shape}, training rows {x.row_shape}",
                code="val_shape_mismatch",
                field="x_val",
            )
    names = [str(v) for v in small["class_names"].tolist()] if "class_names" in small else None
    return StreamedData(x, y, x_val, y_val, names)


def _check_small_members(path: Path, rows: int) -> None:
    """The arrays read whole (labels, class names) declare at most what they can need: 8 bytes a label of
    x's rows (x_val is no larger in any sane file) and 16 MiB of class names; zipfile holds a member to its
    declared size, so nothing inflates past this."""
    import zipfile

    limits = {"y.npy": 8 * rows + 4096, "y_val.npy": 8 * rows + 4096, "class_names.npy": 16 << 20}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            limit = limits.get(info.filename)
            if limit is not None and info.file_size > limit:
                field = info.filename.removesuffix(".npy")
                raise DatasetError(
                    f"NPZ array {field!r} declares {info.file_size} bytes, more than {limit} for {rows} rows",
                    code="dataset_too_large",
                    field=field,
                )


def _npz_stream(path: Path, field: str, found: tuple[int, str, tuple[int, ...]]) -> TableStream:
    offset, dtype, shape = found
    if len(shape) < 2 or shape[0] == 0:
        raise DatasetError(
            f"{field} must be (N, features...), got shape {shape}", code="bad_shape", field=field
        )
    return TableStream(str(path), np.arange(shape[0], dtype=np.int64), shape, dtype, offset)


def _check_length(x: RowStream, y: np.ndarray, fx: str, fy: str) -> None:
    if len(y) != len(x):
        raise DatasetError(f"{fx} has {len(x)} rows but {fy} has {len(y)}", code="length_mismatch", field=fy)


def _check_finite(x: TableStream, field: str, chunk: int = 4096) -> None:
    """Every row finite, a chunk of rows at a time (integer arrays always are)."""
    if np.dtype(x.dtype).kind != "f":
        return
    array = _mapped(x.path, x.offset, x.dtype, x.array_shape)
    for start in range(0, len(array), chunk):
        block = np.asarray(array[start : start + chunk]).reshape(min(chunk, len(array) - start), -1)
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            raise DatasetError(
                f"{field} has NaN or infinite values, first at row {start + int(np.flatnonzero(~finite)[0])}",
                code="non_finite",
                field=field,
            )


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
    stream = TableStream(str(x_path), np.arange(n, dtype=np.int64), (n, len(columns)))
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
