"""Dataset files that would decode to far more than they weigh are refused from what they declare.

Each hostile file here is small and built without allocating what it declares; `tracemalloc` (which numpy
reports its buffers to) shows the refusal came before any large buffer was made.
"""

from __future__ import annotations

import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from worker.distill import data_limits
from worker.distill.data import load_dataset
from worker.distill.data_formats import read_npz, read_table
from worker.distill.errors import ArchiveError, DatasetError

MiB = 1 << 20


def npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    """The bytes np.save writes before the data of an array of `shape` and `dtype` (version 1.0)."""
    import io

    buffer = io.BytesIO()
    header = {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def npz_bomb(path: Path, size: int) -> None:
    """A compressed x.npy member of `size` zero bytes, written in 1 MiB chunks (about 1000:1 for zeros)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("x.npy", "w") as member:
        member.write(npy_header((size // 8, 8), "u1"))
        for _ in range(size // MiB):
            member.write(bytes(MiB))


def peak_bytes(action) -> int:
    tracemalloc.start()
    try:
        action()
    except DatasetError:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_a_compressed_npz_bomb_is_refused_before_anything_inflates(tmp_path: Path) -> None:
    path = tmp_path / "bomb.npz"
    npz_bomb(path, 32 * MiB)
    assert path.stat().st_size < MiB / 8
    with pytest.raises(ArchiveError) as err:
        load_dataset(path)
    assert err.value.code == "archive_bomb" and "'x.npy'" in err.value.message
    assert peak_bytes(lambda: load_dataset(path)) < 2 * MiB  # the 32 MiB array was never made


def test_an_npy_header_declaring_more_than_its_member_holds_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "lying.npz"
    with zipfile.ZipFile(path, "w") as zf:  # stored: no ratio to catch, only the header lies
        zf.writestr("x.npy", npy_header((10**12, 4), "<f4") + bytes(64))
    assert peak_bytes(lambda: load_dataset(path)) < MiB
    with pytest.raises(DatasetError) as err:
        load_dataset(path)
    assert (err.value.code, err.value.field) == ("bad_npz", "x")


def test_the_decoded_budget_counts_features_as_float32(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((100, 10), np.uint8), y=np.zeros(100, np.int8))  # held: 4000 + 800 bytes
    with pytest.raises(DatasetError) as err:
        read_npz(path, max_bytes=4799)
    assert err.value.code == "dataset_too_large" and "'y'" in err.value.message
    assert read_npz(path, max_bytes=4800)["x"].shape == (100, 10)


def test_compressed_npz_that_compresses_like_data_still_loads(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    x = rng.integers(0, 4, (20_000, 64)).astype(np.uint8)  # 1.2 MiB, compresses about 4:1
    np.savez_compressed(path, x=x, y=np.arange(20_000) % 3, zeros=np.zeros(10 * MiB, np.uint8))
    data = load_dataset(path)  # the unread 10 MiB of zeros is no one's memory
    assert data.x.shape == (20_000, 64)
    small = tmp_path / "small.npz"
    np.savez_compressed(small, x=np.zeros((1000, 100), np.float32))  # 400 kB of zeros: under the floor
    assert load_dataset(small).x.shape == (1000, 100)


def test_a_csv_with_a_million_columns_is_refused_from_its_header(tmp_path: Path) -> None:
    path = tmp_path / "wide.csv"
    path.write_text(",".join(f"c{i}" for i in range(1_000_000)) + "\n" + ",".join("0" * 1_000_000) + "\n")
    started = time.perf_counter()
    with pytest.raises(DatasetError) as err:
        load_dataset(path)
    assert time.perf_counter() - started < 5  # pandas took over a minute on this before
    assert (err.value.code, err.value.field) == ("too_many_columns", "x")
    assert "1000000 columns" in err.value.message


def test_a_csv_header_line_over_the_cap_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(data_limits, "MAX_HEADER_BYTES", 1000)
    path = tmp_path / "long.csv"
    path.write_text("a" * 2000 + ",label\n1,0\n")
    with pytest.raises(DatasetError, match="header line is over") as err:
        load_dataset(path)
    assert err.value.code == "too_many_columns"
    path.write_text("a,label\n1,0\n2,1\n")
    assert load_dataset(path).x.shape == (2, 1)


def test_a_parquet_of_constant_columns_is_refused_from_its_footer(tmp_path: Path) -> None:
    path = tmp_path / "bomb.parquet"
    pq.write_table(pa.table({"f": np.zeros(4 * MiB, np.int8), "label": np.zeros(4 * MiB, np.int8)}), path)
    assert path.stat().st_size < 200_000
    with pytest.raises(ArchiveError) as err:
        load_dataset(path)
    assert err.value.code == "archive_bomb" and "rows of 2 columns" in err.value.message


def test_parquet_columns_and_decoded_size_are_capped(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({f"f{i}": np.arange(100, dtype=np.float32) for i in range(6)}), path)
    with pytest.raises(DatasetError) as err:
        data_limits.check_parquet(path, max_columns=5)
    assert err.value.code == "too_many_columns"
    with pytest.raises(DatasetError) as err:
        read_table(path, "parquet", "label", max_bytes=100 * 6 * 4 - 1)
    assert err.value.code == "dataset_too_large"
    assert read_table(path, "parquet", "label", max_bytes=100 * 6 * 4)["x"].shape == (100, 6)
