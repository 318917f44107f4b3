"""Datasets: every format loads, each bad input names its problem, the holdout is stratified and seeded."""

from __future__ import annotations

import gzip
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from worker.distill.config import DistillConfig
from worker.distill.data import (
    Dataset,
    detect_dataset_format,
    load_dataset,
    split_validation,
    validate_dataset,
)
from worker.distill.errors import ArchiveError, DatasetError, MismatchError

FASHION = Path("/usr/share/datasets/fashion-mnist")
RNG = np.random.default_rng(0)


def _code(exc_info: pytest.ExceptionInfo) -> tuple[str, str | None]:
    return exc_info.value.code, exc_info.value.field


# ---------- NPZ


def test_npz_with_all_arrays(tmp_path: Path) -> None:
    x = RNG.integers(0, 255, (20, 3, 4, 4)).astype(np.uint8)
    y = np.arange(20) % 4
    np.savez(tmp_path / "d.npz", x=x, y=y, x_val=x[:5], y_val=y[:5], class_names=np.array(list("abcd")))
    ds = load_dataset(tmp_path / "d.npz")
    assert ds.x.dtype == np.float32 and ds.x.shape == (20, 3, 4, 4)
    np.testing.assert_array_equal(ds.x, x.astype(np.float32))
    assert ds.y.dtype == np.int64 and ds.y.tolist() == y.tolist()
    assert ds.x_val.shape == (5, 3, 4, 4) and ds.class_names == ["a", "b", "c", "d"]
    assert (ds.num_classes, ds.num_labelled, ds.feature_shape, len(ds)) == (4, 20, (3, 4, 4), 20)


def test_npz_without_labels_is_an_unlabelled_transfer_set(tmp_path: Path) -> None:
    np.savez_compressed(tmp_path / "d.npz", x=RNG.normal(size=(10, 6)))
    ds = load_dataset(tmp_path / "d.npz")
    assert ds.y.tolist() == [-1] * 10 and ds.num_labelled == 0 and ds.num_unlabelled == 10
    assert ds.num_classes is None


def test_npz_nan_labels_mean_unlabelled(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.ones((4, 2)), y=np.array([0.0, np.nan, 2.0, -1.0]))
    assert load_dataset(tmp_path / "d.npz").y.tolist() == [0, -1, 2, -1]


def test_npz_problems_are_named(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", X=np.ones((4, 2)))
    with pytest.raises(DatasetError, match="needs an array named 'x'.*it has: X") as err:
        load_dataset(tmp_path / "a.npz")
    assert _code(err) == ("missing_x", "x")
    np.savez(tmp_path / "b.npz", x=np.ones((3, 2)), y=np.array([{"a": 1}, None, 3], dtype=object))
    with pytest.raises(DatasetError, match="cannot be read") as err:
        load_dataset(tmp_path / "b.npz")
    assert _code(err) == ("bad_dtype", "y")
    np.savez(tmp_path / "c.npz", x=np.ones((3, 2)), y=np.array([0.5, 1, 2]))
    with pytest.raises(DatasetError, match="non-integer") as err:
        load_dataset(tmp_path / "c.npz")
    np.savez(tmp_path / "d.npz", x=np.ones((3, 2)), y=np.eye(3))
    with pytest.raises(DatasetError, match="one-hot") as err:
        load_dataset(tmp_path / "d.npz")
    assert _code(err) == ("bad_shape", "y")
    np.savez(tmp_path / "e.npz", x=np.ones((3, 2)), y=np.array([0, 1]))
    with pytest.raises(DatasetError, match="x has 3 rows but y has 2") as err:
        load_dataset(tmp_path / "e.npz")
    assert _code(err) == ("length_mismatch", "y")


def test_num_classes_comes_from_labels_of_both_splits_unless_given() -> None:
    x = np.zeros((2, 3), np.float32)
    assert Dataset(x=x, y=np.array([0, 1]), x_val=x, y_val=np.array([4, -1])).num_classes == 5
    assert Dataset(x=x, y=np.array([0, 1]), num_classes=10).num_classes == 10


# ---------- CSV and Parquet


def _frame() -> pd.DataFrame:
    return pd.DataFrame({"f1": [0.5, 1.5, 2.5, 3.5], "f2": [1, 2, 3, 4], "label": [1, None, 0, 2]})


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_table_with_labels_and_unlabelled_rows(kind: str, tmp_path: Path) -> None:
    path = tmp_path / f"d.{kind}"
    _frame().to_csv(path, index=False) if kind == "csv" else _frame().to_parquet(path)
    ds = load_dataset(path)
    np.testing.assert_array_equal(ds.x, np.array([[0.5, 1], [1.5, 2], [2.5, 3], [3.5, 4]], np.float32))
    assert ds.y.tolist() == [1, -1, 0, 2] and ds.num_labelled == 3


def test_csv_named_label_column_and_class_names(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("a,b,species\n1,2,setosa\n3,4,virginica\n5,6,\n7,8,setosa\n")
    ds = load_dataset(tmp_path / "d.csv", DistillConfig(label_column="species"))
    assert ds.class_names == ["setosa", "virginica"] and ds.y.tolist() == [0, 1, -1, 0]
    assert ds.feature_shape == (2,)


def test_csv_without_the_label_column_is_unlabelled(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("a,b\n1,2\n3,4\n")
    assert load_dataset(tmp_path / "d.csv").num_labelled == 0


def test_table_problems_are_named(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("a,colour,label\n1,red,0\n2,blue,1\n")
    with pytest.raises(DatasetError, match="not numeric: colour") as err:
        load_dataset(tmp_path / "a.csv")
    assert _code(err) == ("bad_dtype", "x")
    (tmp_path / "b.csv").write_text("a,label\n1,0\n,1\n")
    with pytest.raises(DatasetError, match="NaN or infinite values in 1 row.*row 1") as err:
        load_dataset(tmp_path / "b.csv")
    assert _code(err) == ("non_finite", "x")
    (tmp_path / "c.csv").write_text("label\n0\n1\n")
    with pytest.raises(DatasetError, match="no feature columns"):
        load_dataset(tmp_path / "c.csv")


def test_separate_validation_file_maps_class_names_onto_train_ids(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("a,label\n1,cat\n2,dog\n3,fox\n")
    (tmp_path / "val.csv").write_text("a,label\n4,fox\n5,cat\n6,\n")
    ds = load_dataset(tmp_path / "train.csv", val_path=tmp_path / "val.csv")
    assert ds.class_names == ["cat", "dog", "fox"]
    assert ds.y_val.tolist() == [2, 0, -1], "fox is id 1 in the validation file alone, 2 in train"


# ---------- image folders


def _images(
    root: Path, spec: dict[str, int], size: tuple[int, int] = (5, 4), mode: str = "L", ext: str = "png"
):
    pixels = {}
    for cls, count in spec.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
            arr = RNG.integers(0, 256, shape).astype(np.uint8)
            Image.fromarray(arr, mode=mode).save(root / cls / f"{i}.{ext}")
            pixels[f"{cls}/{i}"] = arr
    return pixels


def _zip_dir(src: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted(src.rglob("*")):
            zf.write(p, p.relative_to(src).as_posix())
    return dest


def test_zip_image_folder_decodes_pixels_and_classes(tmp_path: Path) -> None:
    pixels = _images(tmp_path / "src", {"shirt": 2, "boot": 3})
    ds = load_dataset(_zip_dir(tmp_path / "src", tmp_path / "d.zip"))
    assert ds.class_names == ["boot", "shirt"] and ds.y.tolist() == [0, 0, 0, 1, 1]
    assert ds.x.shape == (5, 1, 4, 5) and ds.x.dtype == np.float32
    np.testing.assert_array_equal(ds.x[3, 0], pixels["shirt/0"].astype(np.float32))


def test_tar_image_folder_rgb_jpg_wrapped_in_a_folder(tmp_path: Path) -> None:
    _images(tmp_path / "src/mydata", {"a": 2, "b": 1}, size=(6, 6), mode="RGB", ext="jpg")
    with tarfile.open(tmp_path / "d.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "src/mydata", arcname="mydata")
    ds = load_dataset(tmp_path / "d.tar.gz")
    assert ds.x.shape == (3, 3, 6, 6) and ds.class_names == ["a", "b"] and ds.y.tolist() == [0, 0, 1]
    assert 0 <= ds.x.min() and ds.x.max() <= 255


def test_image_folder_with_train_and_val_and_unlabelled_images(tmp_path: Path) -> None:
    _images(tmp_path / "src/train", {"cat": 2, "dog": 2})
    _images(tmp_path / "src/val", {"dog": 1})
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(tmp_path / "src/train/unsorted.png")
    ds = load_dataset(_zip_dir(tmp_path / "src", tmp_path / "d.zip"))
    assert ds.y.tolist() == [-1, 0, 0, 1, 1] and ds.y_val.tolist() == [1]
    assert ds.class_names == ["cat", "dog"]


def test_images_of_different_sizes_are_refused(tmp_path: Path) -> None:
    _images(tmp_path / "src", {"a": 1}, size=(5, 4))
    _images(tmp_path / "src", {"b": 1}, size=(6, 4))
    with pytest.raises(DatasetError, match="same size: a/0.png is 5x4 but b/0.png is 6x4") as err:
        load_dataset(_zip_dir(tmp_path / "src", tmp_path / "d.zip"))
    assert _code(err) == ("image_size_mismatch", "x")


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    _images(tmp_path / "src", {"a": 1})
    (tmp_path / "src/a/broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match="cannot read image a/broken.png") as err:
        load_dataset(_zip_dir(tmp_path / "src", tmp_path / "d.zip"))
    assert err.value.code == "bad_image"


def test_unsafe_archive_is_refused_through_load_dataset(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as zf:
        zf.writestr("cats/1.png", b"x")
        zf.writestr("../../escape.png", b"x")
    with pytest.raises(ArchiveError, match=r"\.\.") as err:
        load_dataset(tmp_path / "d.zip")
    assert err.value.code == "unsafe_member"


def test_zipped_csv_loads(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as zf:
        zf.writestr("data/table.csv", "a,b,label\n1,2,0\n3,4,1\n")
    ds = load_dataset(tmp_path / "d.zip")
    assert ds.x.shape == (2, 2) and ds.y.tolist() == [0, 1]


# ---------- IDX


def _idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def _mnist_like(root: Path, gz: bool = True) -> tuple[np.ndarray, ...]:
    root.mkdir(parents=True, exist_ok=True)
    x, y = RNG.integers(0, 256, (12, 6, 6), dtype=np.uint8), RNG.integers(0, 10, 12, dtype=np.uint8)
    xv, yv = x[:4], y[:4]
    suffix = ".gz" if gz else ""
    _idx(root / f"train-images-idx3-ubyte{suffix}", x, gz)
    _idx(root / f"train-labels-idx1-ubyte{suffix}", y, gz)
    _idx(root / f"t10k-images-idx3-ubyte{suffix}", xv, gz)
    _idx(root / f"t10k-labels-idx1-ubyte{suffix}", yv, gz)
    return x, y, xv, yv


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_gives_train_and_val(gz: bool, tmp_path: Path) -> None:
    x, y, xv, yv = _mnist_like(tmp_path / "mnist", gz)
    ds = load_dataset(tmp_path / "mnist")
    assert ds.x.shape == (12, 1, 6, 6) and ds.x_val.shape == (4, 1, 6, 6)
    np.testing.assert_array_equal(ds.x[:, 0], x.astype(np.float32))
    assert ds.y.tolist() == y.tolist() and ds.y_val.tolist() == yv.tolist()


def test_idx_images_file_finds_its_labels_beside_it(tmp_path: Path) -> None:
    _, y, _, _ = _mnist_like(tmp_path)
    ds = load_dataset(tmp_path / "train-images-idx3-ubyte.gz")
    assert detect_dataset_format(tmp_path / "train-images-idx3-ubyte.gz") == "idx"
    assert ds.y.tolist() == y.tolist() and ds.x_val is None
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    assert load_dataset(tmp_path / "train-images-idx3-ubyte.gz").num_labelled == 0


def test_idx_inside_a_tar(tmp_path: Path) -> None:
    _mnist_like(tmp_path / "src/fashion")
    with tarfile.open(tmp_path / "d.tar", "w") as tf:
        tf.add(tmp_path / "src/fashion", arcname="fashion")
    ds = load_dataset(tmp_path / "d.tar")
    assert (len(ds), len(ds.x_val)) == (12, 4)


def test_truncated_idx_is_named(tmp_path: Path) -> None:
    _mnist_like(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DatasetError, match="truncated") as err:
        load_dataset(path)
    assert err.value.code == "bad_idx"


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_loads_train_and_t10k() -> None:
    ds = load_dataset(FASHION)
    assert ds.x.shape == (60000, 1, 28, 28) and ds.x_val.shape == (10000, 1, 28, 28)
    assert ds.num_classes == 10 and ds.num_labelled == 60000
    assert np.bincount(ds.y).tolist() == [6000] * 10 and np.bincount(ds.y_val).tolist() == [1000] * 10
    assert ds.x.min() == 0 and ds.x.max() == 255
    validate_dataset(ds, num_classes=10)


def test_unknown_format_lists_what_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "d.bin").write_bytes(b"\x01\x02\x03 nothing we know")
    with pytest.raises(DatasetError, match="accepted: NPZ.*CSV or Parquet.*IDX") as err:
        load_dataset(tmp_path / "d.bin")
    assert _code(err) == ("unknown_dataset_format", "dataset")


# ---------- validate_dataset


def _ds(**kw) -> Dataset:
    base = {"x": np.zeros((6, 3), np.float32), "y": np.array([0, 1, 2, 0, 1, -1])}
    return Dataset(**{**base, **kw})


@pytest.mark.parametrize(
    "kw,code,field",
    [
        ({"x": np.zeros((0, 3), np.float32), "y": np.zeros(0, np.int64)}, "empty_dataset", "x"),
        ({"x": np.zeros((6, 3))}, "bad_dtype", "x"),
        ({"x": np.zeros(6, np.float32)}, "bad_shape", "x"),
        ({"y": np.zeros(6, np.int32)}, "bad_dtype", "y"),
        ({"y": np.zeros((6, 2), np.int64)}, "bad_shape", "y"),
        ({"y": np.zeros(5, np.int64)}, "length_mismatch", "y"),
        ({"x": np.full((6, 3), np.inf, np.float32)}, "non_finite", "x"),
        ({"y": np.array([0, 1, -2, 0, 1, 0])}, "label_out_of_range", "y"),
        ({"y": np.array([0, 1, 3, 0, 1, 0])}, "label_out_of_range", "y"),
        ({"x_val": np.zeros((2, 4), np.float32)}, "val_shape_mismatch", "x_val"),
        ({"x_val": np.zeros((2, 3), np.float32), "y_val": np.array([0, 7])}, "label_out_of_range", "y_val"),
        ({"x_val": np.zeros((2, 3), np.float32), "y_val": np.array([0])}, "length_mismatch", "y_val"),
    ],
)
def test_validate_names_each_problem(kw: dict, code: str, field: str) -> None:
    with pytest.raises(DatasetError) as err:
        validate_dataset(_ds(**kw), num_classes=3)
    assert _code(err) == (code, field)


def test_validate_accepts_a_good_dataset_and_checks_class_names_against_the_teacher() -> None:
    validate_dataset(_ds(), num_classes=3)
    validate_dataset(_ds(), num_classes=10)  # a teacher may know more classes than the labels use
    with pytest.raises(MismatchError, match="names 2 classes but the teacher outputs 3") as err:
        validate_dataset(_ds(y=np.array([0, 1, 1, 0, 1, -1]), class_names=["a", "b"]), num_classes=3)
    assert _code(err) == ("class_count_mismatch", "y")


# ---------- split_validation


def test_holdout_is_stratified_and_keeps_unlabelled_rows_in_train() -> None:
    y = np.array([0] * 50 + [1] * 30 + [2] * 20 + [-1] * 40)
    ds = Dataset(x=np.arange(len(y), dtype=np.float32)[:, None], y=y)
    split = split_validation(ds, 0.1, seed=3)
    assert np.bincount(split.y_val).tolist() == [5, 3, 2]
    assert (split.y == -1).sum() == 40 and len(split) == 130
    rows = np.concatenate([split.x[:, 0], split.x_val[:, 0]])
    assert sorted(rows.tolist()) == list(range(140)), "every row lands in exactly one split"


def test_holdout_is_deterministic_for_a_seed() -> None:
    ds = Dataset(x=np.arange(200, dtype=np.float32)[:, None], y=np.arange(200) % 4)
    first, again, other = (split_validation(ds, 0.2, seed=s) for s in (7, 7, 8))
    np.testing.assert_array_equal(first.x_val, again.x_val)
    assert not np.array_equal(first.x_val, other.x_val)


def test_holdout_rounds_small_classes_without_emptying_train() -> None:
    ds = Dataset(x=np.zeros((9, 2), np.float32), y=np.array([0, 0, 0, 0, 0, 0, 1, 1, 2]))
    split = split_validation(ds, 0.25, seed=0)
    assert len(split.x_val) == 2 and 2 in split.y, "a class with one row stays in train"


def test_holdout_leaves_a_given_split_and_zero_fraction_alone() -> None:
    ds = _ds(x_val=np.ones((2, 3), np.float32), y_val=np.array([0, 1]))
    assert split_validation(ds, 0.5, seed=0) is ds
    assert split_validation(_ds(), 0.0, seed=0).x_val is None


def test_holdout_of_an_unlabelled_set_is_random() -> None:
    ds = Dataset(x=np.arange(50, dtype=np.float32)[:, None])
    split = split_validation(ds, 0.2, seed=1)
    assert len(split.x_val) == 10 and len(split) == 40 and split.y_val.tolist() == [-1] * 10


def _webdataset(tmp_path: Path, samples: dict[str, tuple[str, bytes | None]]) -> Path:
    """A WebDataset shard tar: for each key an image (`ext`) and, when given, `key.cls`."""
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, (key, (ext, cls)) in enumerate(samples.items()):
            image = tmp_path / f"img-{i}.{ext}"
            Image.fromarray(np.full((6, 5), 10 * i, np.uint8)).save(image)
            tar.add(image, arcname=f"{key}.{ext}")
            if cls is not None:
                label = tmp_path / f"img-{i}.cls"
                label.write_bytes(cls)
                tar.add(label, arcname=f"{key}.cls")
    return shard


def test_a_webdataset_shard_pairs_each_image_with_its_cls(tmp_path: Path) -> None:
    samples = {"s/000002": ("png", b"1\n"), "s/000001": ("webp", b"0"), "s/000003": ("jpg", None)}
    ds = load_dataset(_webdataset(tmp_path, samples), DistillConfig())
    # Key order; no .cls: unlabelled. WebP has no greyscale mode, so the set reads as RGB.
    assert ds.x.shape == (3, 3, 6, 5) and ds.y.tolist() == [0, 1, -1]
    assert ds.x[1, 0, 0, 0] == 0.0 and abs(float(ds.x[0, 0, 0, 0]) - 10.0) <= 2  # webp and jpg are lossy


@pytest.mark.parametrize(
    "samples, message",
    [
        ({"a": ("png", b"cat")}, "class index"),
        ({"a": ("png", b"0"), "b": ("cls", None)}, "no image"),
    ],
)
def test_webdataset_label_problems_name_the_sample(tmp_path: Path, samples, message) -> None:
    shard = _webdataset(tmp_path, {k: v for k, v in samples.items() if v[0] != "cls"})
    if "b" in samples:  # a .cls with no image beside it
        with tarfile.open(shard, "a") as tar:
            (tmp_path / "orphan.cls").write_bytes(b"1")
            tar.add(tmp_path / "orphan.cls", arcname="b.cls")
    with pytest.raises(DatasetError) as info:
        load_dataset(shard, DistillConfig())
    assert info.value.code == "bad_labels" and message in info.value.message
