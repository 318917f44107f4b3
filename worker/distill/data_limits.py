"""Cheap checks of what a dataset file will decode to, made before a reader inflates or parses anything.

A small upload must not become a large process: a 1 MB `.npz` can hold a 1 GiB array of zeros, a CSV header
can declare a million columns, a Parquet file of constant columns can decode to gigabytes. Each check reads
only what the file declares (the zip's central directory and each `.npy` header, the CSV header line, the
Parquet footer) and refuses with a dataset error naming the part at fault. Compressed content is held to the
same ratio as archives (`archives.MAX_RATIO`, above `archives.RATIO_FLOOR_BYTES`).
"""

from __future__ import annotations

import csv
import math
import zipfile
from pathlib import Path
from typing import IO

import numpy as np

from worker.distill.archives import MAX_RATIO, RATIO_FLOOR_BYTES
from worker.distill.errors import ArchiveError, DatasetError

GiB = 1 << 30
MAX_DECODED_BYTES = 8 * GiB  # one dataset file's arrays, as the dataset holds them (float32 x, int64 y)
MAX_COLUMNS = 100_000
MAX_HEADER_BYTES = 16 << 20  # a CSV header line; 100k named columns fit many times over
NPZ_FIELDS = ("x", "y", "x_val", "y_val", "class_names")


def check_npz(path: Path, *, max_bytes: int = MAX_DECODED_BYTES, max_ratio: float = MAX_RATIO) -> None:
    """Refuse an NPZ whose members (those a reader loads) inflate more than `max_ratio` times or whose
    declared arrays would take more than `max_bytes` once read."""
    total = 0
    with zipfile.ZipFile(path) as zf:
        for field in NPZ_FIELDS:
            try:
                info = zf.getinfo(f"{field}.npy")  # the entry np.load would open: the last of that name
            except KeyError:
                continue
            _check_ratio(info, max_ratio)
            with zf.open(info) as f:
                shape, dtype, header_bytes = _npy_header(f, field)
            count = math.prod(shape)
            if count * dtype.itemsize > info.file_size - header_bytes:
                raise DatasetError(
                    f"NPZ array {field!r} declares shape {shape[:4]} of {dtype} but its member holds "
                    f"{info.file_size} bytes; the file is damaged",
                    code="bad_npz",
                    field=field,
                )
            total += count * max(dtype.itemsize, _HELD_ITEMSIZE.get(field, 0))
            _check_budget(total, max_bytes, f"NPZ arrays up to {field!r}")


# Features are held as float32 and labels as int64 whatever the file stores.
_HELD_ITEMSIZE = {"x": 4, "x_val": 4, "y": 8, "y_val": 8}


def _check_ratio(info: zipfile.ZipInfo, max_ratio: float) -> None:
    if info.file_size > RATIO_FLOOR_BYTES and info.file_size > max_ratio * max(info.compress_size, 1):
        raise ArchiveError(
            f"NPZ member {info.filename!r} inflates from {info.compress_size} to {info.file_size} bytes, "
            f"over {max_ratio:g} times: it looks like a decompression bomb; save the arrays with np.savez "
            "(uncompressed) instead",
            code="archive_bomb",
        )


def _npy_header(f: IO[bytes], field: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header length) from the start of a `.npy` stream; nothing past the header is read."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read(f)  # numpy caps the header's length; version 3 differs only in encoding
    except (ValueError, OSError, EOFError) as exc:
        raise DatasetError(
            f"NPZ array {field!r} has no valid .npy header: {str(exc)[:200]}", code="bad_npz", field=field
        ) from None
    if dtype.hasobject:
        raise DatasetError(
            f"NPZ array {field!r} cannot be read: it holds Python objects, which need pickle, and pickle is "
            "never used; save numeric arrays (strings for class_names)",
            code="bad_dtype",
            field=field,
        )
    return tuple(int(d) for d in shape), dtype, f.tell()


def check_csv_header(path: Path, *, max_columns: int = MAX_COLUMNS) -> None:
    """Refuse a CSV whose header line is over MAX_HEADER_BYTES or names more than `max_columns` columns:
    the parser would spend minutes and gigabytes before any other check could fail."""
    with open(path, "rb") as f:
        line = f.readline(MAX_HEADER_BYTES + 1)
    if len(line) > MAX_HEADER_BYTES:
        raise DatasetError(
            f"{path.name}: the header line is over {MAX_HEADER_BYTES >> 20} MiB", code="too_many_columns"
        )
    text = line.decode("utf-8", errors="replace").lstrip("\ufeff")
    columns = len(next(csv.reader([text.rstrip("\r\n")]), []))
    _check_columns(path, columns, max_columns)


def check_parquet(
    path: Path,
    *,
    max_bytes: int = MAX_DECODED_BYTES,
    max_ratio: float = MAX_RATIO,
    max_columns: int = MAX_COLUMNS,
) -> None:
    """From the footer alone: at most `max_columns` columns, and rows x columns as float32 within
    `max_bytes` and within `max_ratio` times the file's size."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    _check_columns(path, meta.num_columns, max_columns)
    decoded = meta.num_rows * meta.num_columns * 4
    _check_budget(decoded, max_bytes, f"{path.name} ({meta.num_rows} rows of {meta.num_columns} columns)")
    size = max(path.stat().st_size, 1)
    if decoded > RATIO_FLOOR_BYTES and decoded > max_ratio * size:
        raise ArchiveError(
            f"{path.name} declares {meta.num_rows} rows of {meta.num_columns} columns, {decoded} bytes as "
            f"float32, over {max_ratio:g} times its own {size} bytes: it looks like a decompression bomb",
            code="archive_bomb",
        )


def _check_columns(path: Path, columns: int, max_columns: int) -> None:
    if columns > max_columns:
        raise DatasetError(
            f"{path.name} has {columns} columns; at most {max_columns} are accepted (for images or other "
            "wide data, use NPZ with x shaped (N, ...))",
            code="too_many_columns",
            field="x",
        )


def _check_budget(total: int, max_bytes: int, what: str) -> None:
    if total > max_bytes:
        raise DatasetError(
            f"{what} would take {total} bytes once read; the cap is {max_bytes}", code="dataset_too_large"
        )
