"""Readers for each dataset format. Each returns the fields of a `data.Dataset` as a dict of numpy arrays.

Kept apart from data.py (which owns the Dataset, detection, validation and splitting) so each stays short.
Nothing here unpickles: NPZ goes through `np.load(allow_pickle=False)`, tables through pandas' parsers.
"""

from __future__ import annotations

import gzip
import math
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from worker.distill.data_limits import (
    MAX_DECODED_BYTES,
    NPZ_FIELDS,
    check_csv_header,
    check_npz,
    check_parquet,
)
from worker.distill.errors import DatasetError

MAX_ARRAY_BYTES = MAX_DECODED_BYTES  # what one decoded array may take in memory
IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
IDX_NAME = re.compile(r"^(?P<prefix>.*?)[-_.]?(?P<kind>images|labels)[-_.]idx(?P<ndim>\d)-ubyte(\.gz)?$")
VAL_SPLIT_NAMES = ("val", "valid", "validation", "test")
Fields = dict[str, Any]


def labels_to_int(values: np.ndarray, field: str) -> np.ndarray:
    """Integer class ids from an int/bool/float column; NaN means unlabelled (-1)."""
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1:
        raise DatasetError(
            f"{field} must be one class id per row (N,), got shape {values.shape} (one-hot? use argmax)",
            code="bad_shape",
            field=field,
        )
    if values.dtype.kind in "iub":
        return values.astype(np.int64)
    if values.dtype.kind == "f":
        missing = np.isnan(values)
        if not np.all(np.mod(values[~missing], 1) == 0):
            raise DatasetError(f"{field} holds non-integer class ids", code="bad_labels", field=field)
        return np.where(missing, -1, np.nan_to_num(values)).astype(np.int64)
    raise DatasetError(
        f"{field} must hold integer class ids, not {values.dtype}", code="bad_dtype", field=field
    )


def translate_labels(
    y_val: np.ndarray, val_names: list[str] | None, train_names: list[str] | None
) -> np.ndarray:
    """A separate validation file's class ids in the training ids: each file numbered its sorted class
    names, so the same name may have another id there. Unknown names are an error."""
    if not (train_names and val_names) or val_names == train_names:
        return y_val
    index = {name: i for i, name in enumerate(train_names)}
    unknown = sorted(set(val_names) - set(index))
    if unknown:
        raise DatasetError(
            f"validation classes not in train: {', '.join(unknown)}", code="bad_labels", field="y_val"
        )
    lookup = np.array([index[name] for name in val_names], np.int64)
    return np.where(y_val >= 0, lookup[np.clip(y_val, 0, None)], -1)


def class_ids(classes: list[str | None], names: list[str] | None) -> tuple[np.ndarray, list[str]]:
    """Ids of each row's class folder (None: unlabelled, -1) in sorted `names` (found here when None; a
    validation split's classes must be among the training split's)."""
    found = sorted({c for c in classes if c is not None})
    unknown = sorted(set(found) - set(names)) if names is not None else []
    if unknown:
        raise DatasetError(
            f"validation classes not in train: {', '.join(unknown)}", code="bad_labels", field="y_val"
        )
    names = found if names is None else names
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[c] if c is not None else -1 for c in classes], np.int64), names


def class_index(key: str, member: str, data: bytes) -> int:
    """A WebDataset `.cls` member's class index (ASCII digits), or an error naming the sample."""
    text = data[:32].decode("ascii", "replace").strip()
    if not text.isdigit():
        raise DatasetError(
            f"sample {key!r}: {member} must hold a class index (0, 1, ...), not {text[:20]!r}",
            code="bad_labels",
            field="y",
        )
    return int(text)


def features(values: np.ndarray, field: str) -> np.ndarray:
    if values.dtype.kind not in "iubf":
        raise DatasetError(f"{field} must be numeric, not {values.dtype}", code="bad_dtype", field=field)
    return values.astype(np.float32, copy=False)


def read_npz(path: Path, *, max_bytes: int = MAX_DECODED_BYTES) -> Fields:
    """x, y, x_val, y_val, class_names from an NPZ; its declared sizes are checked before anything inflates
    (np.load trusts them), against `max_bytes` for all arrays as held and the archives' compression ratio."""
    check_npz(path, max_bytes=max_bytes)
    with np.load(path, allow_pickle=False) as npz:
        if "x" not in npz.files:
            raise DatasetError(
                f"NPZ needs an array named 'x' (N, ...); it has: {', '.join(npz.files) or 'nothing'}",
                code="missing_x",
                field="x",
            )
        out: Fields = {}
        for key in NPZ_FIELDS:
            if key not in npz.files:
                continue
            try:
                value = npz[key]
            except ValueError as exc:  # object arrays need pickle, which is never allowed
                raise DatasetError(
                    f"NPZ array {key!r} cannot be read: {exc}", code="bad_dtype", field=key
                ) from None
            if key == "class_names":
                out[key] = [str(v) for v in value.tolist()]
            else:
                out[key] = features(value, key) if key.startswith("x") else labels_to_int(value, key)
    return out


def read_table(path: Path, kind: str, label_column: str, *, max_bytes: int = MAX_DECODED_BYTES) -> Fields:
    """A CSV or Parquet table; its header (CSV) or footer (Parquet) is checked before the parser runs."""
    import pandas as pd

    try:
        if kind == "parquet":
            check_parquet(path, max_bytes=max_bytes)
        else:
            check_csv_header(path)
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow raises its own error types on a bad footer
        raise DatasetError(f"cannot read {kind} file {path.name}: {exc}", code="bad_table") from None
    try:
        frame = pd.read_parquet(path) if kind == "parquet" else pd.read_csv(path, low_memory=False)
    except Exception as exc:  # noqa: BLE001 - pandas/pyarrow raise many parser error types
        raise DatasetError(f"cannot read {kind} file {path.name}: {exc}", code="bad_table") from None
    columns = [c for c in frame.columns if c != label_column]
    if not columns:
        raise DatasetError(
            f"{path.name} has no feature columns besides {label_column!r}", code="bad_shape", field="x"
        )
    bad = [str(c) for c in columns if frame[c].dtype.kind not in "iubf"]
    if bad:
        raise DatasetError(
            f"feature columns must be numeric; not numeric: {', '.join(bad[:10])}"
            f"{'' if label_column in frame.columns else f' (no label column named {label_column!r})'}",
            code="bad_dtype",
            field="x",
        )
    out: Fields = {"x": frame[columns].to_numpy(dtype=np.float32)}
    if label_column in frame.columns:
        labels = frame[label_column]
        if labels.dtype.kind in "iubf":
            out["y"] = labels_to_int(labels.to_numpy(dtype=np.float64), label_column)
        else:  # class names: sorted, so the ids are the same whatever the row order
            text = labels.astype("string").str.strip()
            present = text.notna() & (text != "")
            names = sorted(set(text[present]))
            index = {name: i for i, name in enumerate(names)}
            out["y"] = np.array(
                [index[v] if ok else -1 for v, ok in zip(text, present, strict=True)], np.int64
            )
            out["class_names"] = names
    return out


def is_idx_header(head: bytes) -> bool:
    return len(head) >= 4 and head[0] == 0 and head[1] == 0 and head[2] in IDX_TYPES and 1 <= head[3] <= 8


def _open(path: Path) -> Any:
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def read_idx(path: Path) -> np.ndarray:
    """One IDX array (the MNIST format), gzipped or not; its declared size is checked before reading."""
    try:
        with _open(path) as f:
            head = f.read(4)
            if not is_idx_header(head):
                raise DatasetError(f"{path.name} is not an IDX file", code="bad_idx", field="dataset")
            raw_dims = f.read(4 * head[3])
            if len(raw_dims) != 4 * head[3]:
                raise DatasetError(f"{path.name} is truncated (header)", code="bad_idx", field="dataset")
            dims = struct.unpack(f">{head[3]}I", raw_dims)
            dtype = np.dtype(IDX_TYPES[head[2]])
            size = math.prod(dims) * dtype.itemsize
            if size > MAX_ARRAY_BYTES:
                raise DatasetError(
                    f"{path.name} declares {size} bytes; the cap is {MAX_ARRAY_BYTES}",
                    code="dataset_too_large",
                )
            data = f.read(size)
    except (OSError, EOFError) as exc:
        raise DatasetError(f"cannot read {path.name}: {exc}", code="bad_idx", field="dataset") from None
    if len(data) != size:
        raise DatasetError(
            f"{path.name} is truncated: {len(data)} of {size} data bytes", code="bad_idx", field="dataset"
        )
    return np.frombuffer(data, dtype).reshape(dims)


def _idx_images(path: Path) -> np.ndarray:
    images = read_idx(path)
    if images.ndim < 2:
        raise DatasetError(
            f"{path.name} holds labels, not images; pass the images file or the folder",
            code="bad_idx",
            field="dataset",
        )
    x = features(images, "x")
    return x[:, None] if x.ndim == 3 else x  # (N, H, W) grey -> (N, 1, H, W), like decoded images


def _labels_beside(images: Path) -> Path | None:
    match = IDX_NAME.match(images.name)
    if not match or match["kind"] != "images":
        return None
    for candidate in sorted(images.parent.iterdir()):
        other = IDX_NAME.match(candidate.name)
        if (
            other
            and other["kind"] == "labels"
            and other["prefix"] == match["prefix"]
            and other["ndim"] == "1"
        ):
            return candidate
    return None


def read_idx_images(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """An images file and, when one sits beside it with the same prefix, its labels file."""
    x = _idx_images(path)
    labels = _labels_beside(path)
    return x, (labels_to_int(read_idx(labels), "y") if labels else None)


def read_idx_dir(root: Path) -> Fields:
    """A folder of `<prefix>-images-idx3-ubyte[.gz]` (+ labels) files: `train*` is train, the other val."""
    images = sorted(
        p for p in _visible_files(root) if (m := IDX_NAME.match(p.name)) and m["kind"] == "images"
    )
    if not images:
        raise DatasetError(f"no IDX images file (*-images-idx3-ubyte[.gz]) under {root.name}", code="bad_idx")
    train = [p for p in images if "train" in p.name.lower()]
    if len(images) == 1:
        train = images
    if len(images) > 2 or len(train) != 1:
        names = ", ".join(p.name for p in images)
        raise DatasetError(
            f"cannot tell the train and validation IDX files apart: {names}; expected one '*train*' file and "
            "at most one other",
            code="ambiguous_dataset",
        )
    out: Fields = {}
    out["x"], out["y"] = read_idx_images(train[0])
    others = [p for p in images if p != train[0]]
    if others:
        out["x_val"], out["y_val"] = read_idx_images(others[0])
    return out


def find_idx_images(root: Path) -> bool:
    return any((m := IDX_NAME.match(p.name)) and m["kind"] == "images" for p in _visible_files(root))


def _visible_files(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith((".", "__MACOSX")) for part in p.relative_to(root).parts)
    )


GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def read_image_folder(root: Path) -> Fields:
    """`class_name/*.png|jpg` (top-level images are unlabelled); `train/` + `val/` folders give a split."""
    root = _unwrap(root)
    splits = {d.name.lower(): d for d in _subdirs(root)}
    val_name = next((n for n in VAL_SPLIT_NAMES if n in splits), None)
    if "train" in splits and val_name and set(splits) <= {"train", *VAL_SPLIT_NAMES}:
        x, y, names = _read_split(splits["train"], None)
        x_val, y_val, _ = _read_split(splits[val_name], names)
        return {"x": x, "y": y, "x_val": x_val, "y_val": y_val, "class_names": names}
    x, y, names = _read_split(root, None)
    return {"x": x, "y": y, "class_names": names or None}


def _subdirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith((".", "__MACOSX")))


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _unwrap(root: Path) -> Path:
    """Step into a lone wrapping folder (`mydata/cats/1.png` zipped as a folder) but never into a class."""
    while True:
        dirs = _subdirs(root)
        if len(dirs) != 1 or any(_is_image(p) for p in root.iterdir()) or not _subdirs(dirs[0]):
            return root
        root = dirs[0]


def _read_split(root: Path, names: list[str] | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    items: list[tuple[Path, str | None]] = [(p, None) for p in sorted(root.iterdir()) if _is_image(p)]
    for folder in _subdirs(root):
        items += [(p, folder.name) for p in sorted(folder.rglob("*")) if _is_image(p)]
    if not items:
        raise DatasetError(
            f"no .png/.jpg images under {root.name}/; expected class_name/*.png",
            code="empty_dataset",
            field="x",
        )
    y, names = class_ids([c for _, c in items], names)
    return _decode_images(root, [p for p, _ in items]), y, names


def find_webdataset(root: Path) -> bool:
    """WebDataset's layout: samples as `key.<ext>` files side by side, a `key.cls` holding each label."""
    return any(p.suffix.lower() == ".cls" for p in _visible_files(root))


def read_webdataset(root: Path) -> Fields:
    """A WebDataset shard (`key.jpg|png|webp` + `key.cls`, the class index as text; the key is the path up to
    the first dot of the file name): one row per image, in key order; an image without `.cls` is unlabelled,
    a `.cls` without an image or with anything but an integer is an error naming the key."""
    samples: dict[str, dict[str, Path]] = {}
    for path in _visible_files(root):
        rel = path.relative_to(root).as_posix()
        folder, _, name = rel.rpartition("/")
        stem, dot, ext = name.partition(".")
        if not dot:
            continue
        samples.setdefault(f"{folder}/{stem}" if folder else stem, {})[ext.lower()] = path
    images, labels = [], []
    for key in sorted(samples):
        members = samples[key]
        image = next((members[e] for e in sorted(members) if f".{e}" in IMAGE_SUFFIXES), None)
        label = members.get("cls")
        if image is None:
            if label is not None:
                raise DatasetError(f"sample {key!r} has a .cls but no image", code="bad_labels", field="y")
            continue
        value = -1 if label is None else class_index(key, label.name, label.read_bytes()[:32])
        images.append(image)
        labels.append(value)
    if not images:
        raise DatasetError(
            "no key.jpg/png/webp samples in this WebDataset shard", code="empty_dataset", field="x"
        )
    return {"x": _decode_images(root, images), "y": np.array(labels, np.int64)}


def _decode_images(root: Path, paths: list[Path]) -> np.ndarray:
    """Every image as float32 (N, C, H, W), C 1 when all are greyscale else 3; all must share one size."""
    from PIL import Image

    def where(p: Path) -> str:
        return p.relative_to(root).as_posix()

    first: tuple[Path, tuple[int, int]] | None = None
    modes = set()
    for path in paths:  # headers only: cheap, and a size mismatch is found before decoding anything
        try:
            with Image.open(path) as im:
                size, mode = im.size, im.mode
        except (OSError, Image.DecompressionBombError) as exc:
            raise DatasetError(
                f"cannot read image {where(path)}: {exc}", code="bad_image", field="x"
            ) from None
        modes.add(mode)
        if first is None:
            first = (path, size)
        elif size != first[1]:
            raise DatasetError(
                f"images must all be the same size: {where(first[0])} is {first[1][0]}x{first[1][1]} but "
                f"{where(path)} is {size[0]}x{size[1]}; resize them first",
                code="image_size_mismatch",
                field="x",
            )
    assert first is not None
    (width, height), mode = first[1], ("L" if modes <= GREY_MODES else "RGB")
    channels = 1 if mode == "L" else 3
    if len(paths) * channels * height * width * 4 > MAX_ARRAY_BYTES:
        raise DatasetError(
            f"{len(paths)} images of {width}x{height} exceed the memory cap", code="dataset_too_large"
        )
    x = np.empty((len(paths), channels, height, width), np.float32)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                pixels = np.asarray(im.convert(mode), dtype=np.float32)
        except (OSError, Image.DecompressionBombError) as exc:
            raise DatasetError(
                f"cannot decode image {where(path)}: {exc}", code="bad_image", field="x"
            ) from None
        x[i] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    return x
