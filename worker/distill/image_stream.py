"""Image datasets read a batch at a time: what lets a job's data be larger than the memory it runs in.

An image dataset (a zip, an uncompressed tar, a folder, or a folder of WebDataset tar shards) is first
*indexed*: every member is listed where it lies (container, byte offset for a tar member, name for a zip
member or a file) and its header is read, so the checks the in-memory path makes (readable image, one size
for all, `.cls` labels) still run on every member before any training, with errors that name the member.
The index is a few numpy arrays, bytes per image, whatever the pixels.

`ImageStream` then reads rows on demand: `batches(lists)` decodes each list of rows in DataLoader worker
processes (Pillow; as many as the machine has CPUs, up to `MAX_WORKERS`) into a uint8 (B, C, H, W) tensor,
and only the batch becomes float32, preprocessed (and cropped/flipped to a stored view) in this process.
Memory is a few batches in flight, never the dataset. Rows come out exactly as the in-memory path decodes
them (same Pillow conversion, same order), so a streamed job and an in-memory one compute the same thing.

Small datasets keep the in-memory path (`streaming: "auto"` streams only above `STREAM_ABOVE_BYTES` of
decoded float32 rows): holding rows on the device beats any loader.
"""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from worker.distill.data_formats import (
    GREY_MODES,
    IMAGE_SUFFIXES,
    VAL_SPLIT_NAMES,
    class_ids,
    class_index,
    translate_labels,
)
from worker.distill.data_limits import GiB
from worker.distill.errors import DatasetError
from worker.distill.streams import Rows, RowStream, StreamedData, Transform, positions, prepared, transform_on

STREAM_ABOVE_BYTES = 1 * GiB  # "auto": image datasets whose decoded float32 rows are larger stream
MAX_MEMBER_BYTES = 64 << 20  # one image file
MAX_MEMBERS = 50_000_000  # files in one dataset (a sample is two: its image and its .cls)
HEADER_BYTES = 64 << 10  # read to check an image's header at indexing time (the whole file when smaller)
MAX_WORKERS = 8
PREFETCH = 2  # batches each worker decodes ahead



M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 1 << 20
_malloc_fixed: list[bool] = []


def fixed_mmap_threshold() -> None:
    """Pin glibc's mmap threshold at 1 MiB in this process (once; nothing elsewhere than glibc). By default
    glibc raises it after each freed large block, up to 32 MiB, and then serves batch-sized buffers from a
    heap that fragments: a stream's process grew by a batch every few batches. Pinned, every batch buffer is
    its own mapping, returned whole when the batch goes."""
    if _malloc_fixed:
        return
    _malloc_fixed.append(True)
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


def loader_workers() -> int:
    """Decoding processes: one per CPU this process may run on, up to MAX_WORKERS."""
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


@dataclass(frozen=True)
class Members:
    """Where each image's bytes are. `containers`: (kind, path) with kind tar (read at `offset`), zip (read by
    name) or dir (a file under the folder, by name). Per member: its container, offset, size, and its name
    (a zip member's or file's path; a tar member's name), which errors quote."""

    containers: tuple[tuple[str, str], ...]
    container: np.ndarray  # int32 (N,)
    offset: np.ndarray  # int64 (N,)
    size: np.ndarray  # int64 (N,)
    names: np.ndarray  # bytes (N,)

    def __len__(self) -> int:
        return len(self.size)

    def name(self, i: int) -> str:
        kind, path = self.containers[int(self.container[i])]
        member = bytes(self.names[i]).decode("utf-8", "replace")
        return member if kind == "dir" or len(self.containers) == 1 else f"{Path(path).name}:{member}"

    def take(self, rows: np.ndarray) -> Members:
        return replace(
            self,
            container=self.container[rows],
            offset=self.offset[rows],
            size=self.size[rows],
            names=self.names[rows],
        )


class _Reader:
    """Reads members' bytes; opens containers lazily, once per process (a forked worker opens its own)."""

    def __init__(self, members: Members) -> None:
        self.members = members
        self._pid = -1
        self._open: dict[int, Any] = {}

    def read(self, i: int, limit: int | None = None) -> bytes:
        if self._pid != os.getpid():
            self._open, self._pid = {}, os.getpid()
        m = self.members
        c, size = int(m.container[i]), int(m.size[i])
        size = size if limit is None else min(size, limit)
        kind, path = m.containers[c]
        name = bytes(m.names[i]).decode("utf-8")
        try:
            if kind == "dir":
                with open(Path(path) / name, "rb") as f:
                    return f.read(size)
            if kind == "zip":
                if c not in self._open:
                    self._open[c] = zipfile.ZipFile(path)
                with self._open[c].open(name) as f:
                    return bytes(f.read(size))
            if c not in self._open:
                self._open[c] = os.open(path, os.O_RDONLY)
            data = os.pread(self._open[c], size, int(m.offset[i]))
        except (OSError, zipfile.BadZipFile, KeyError, EOFError) as exc:
            raise DatasetError(
                f"cannot read {m.name(i)}: {exc}", code="bad_image", field="x"
            ) from None
        if len(data) != size:
            raise DatasetError(f"{m.name(i)} is truncated", code="bad_image", field="x")
        return data


class _Decoder(torch.utils.data.Dataset[Any]):
    """What a DataLoader worker runs: a list of members -> uint8 (B, C, H, W). A DatasetError comes back
    as a value (code, field, message): DataLoader would re-raise it without its code."""

    def __init__(self, members: Members, shape: tuple[int, int, int]) -> None:
        self.reader, self.shape = _Reader(members), shape

    def __len__(self) -> int:
        return len(self.reader.members)

    def __getitem__(self, rows: Any) -> Any:
        try:
            batch = torch.empty((len(rows), *self.shape), dtype=torch.uint8)
            if torch.utils.data.get_worker_info() is not None:
                batch.share_memory_()  # type: ignore[no-untyped-call]  # decoded into what is handed over
            out = batch.numpy()
            for j, i in enumerate(rows):
                out[j] = decode(self.reader, int(i), self.shape)
            return batch
        except DatasetError as exc:
            return ("error", exc.code, exc.field, str(exc))


def decode(reader: _Reader, i: int, shape: tuple[int, int, int]) -> np.ndarray:
    """One member as uint8 (C, H, W), converted as the in-memory path converts (grey L or RGB)."""
    from PIL import Image

    channels, height, width = shape
    try:
        with Image.open(io.BytesIO(reader.read(i))) as im:
            if im.size != (width, height):
                raise DatasetError(
                    f"images must all be the same size: {reader.members.name(i)} is {im.size[0]}x{im.size[1]}"
                    f", the others {width}x{height}; resize them first",
                    code="image_size_mismatch",
                    field="x",
                )
            pixels = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except (OSError, Image.DecompressionBombError, ValueError) as exc:
        raise DatasetError(
            f"cannot decode image {reader.members.name(i)}: {exc}", code="bad_image", field="x"
        ) from None
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


@dataclass(frozen=True)
class ImageStream(RowStream):
    """Rows of an indexed image dataset, read on demand (see the module docstring and streams.RowStream)."""

    members: Members
    image_shape: tuple[int, int, int]  # (C, H, W)
    transform: Transform | None = None  # preprocessing, applied to each float32 batch
    views: Tensor | None = None  # (N, 5) crop/flip per row (augment.py), applied after the transform

    def __len__(self) -> int:
        return len(self.members)

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.image_shape

    def __getitem__(self, index: Tensor | np.ndarray | slice) -> ImageStream:
        rows = positions(len(self), index)
        views = None if self.views is None else self.views[torch.as_tensor(rows)]
        return replace(self, members=self.members.take(rows), views=views)

    def with_transform(self, transform: Transform | None) -> ImageStream:
        return replace(self, transform=transform)

    def with_views(self, params: Tensor) -> ImageStream:
        return replace(self, views=params)

    def pixel_batches(self, lists: Sequence[Rows], workers: int | None = None) -> Iterator[Tensor]:
        """One uint8 (B, C, H, W) batch per list of rows, in order, as decoded by `workers` processes
        (default: one per CPU; none for a single small list)."""
        fixed_mmap_threshold()
        rows = [np.asarray(r, np.int64) for r in lists]
        if workers is None:
            workers = 0 if len(rows) <= 1 and sum(map(len, rows)) <= 256 else loader_workers()
        loader = torch.utils.data.DataLoader(
            _Decoder(self.members, self.image_shape),
            batch_size=None,
            sampler=rows,  # each "index" is a list of rows: one batch
            num_workers=workers,
            prefetch_factor=PREFETCH if workers else None,
            multiprocessing_context="fork" if workers else None,
        )
        for pixels in loader:
            if isinstance(pixels, (tuple, list)):
                _, code, field, message = pixels
                raise DatasetError(message, code=code, field=field)
            yield pixels

    def batches(
        self, lists: Sequence[Rows], workers: int | None = None, device: torch.device | None = None
    ) -> Iterator[Tensor]:
        """One float32 batch per list of rows, in order: decoded as `pixel_batches`, then moved to `device`
        (uint8: a quarter of the bytes) and made float, transformed and viewed there."""
        transform = transform_on(self.transform, device)
        for index, pixels in zip(lists, self.pixel_batches(lists, workers), strict=True):
            yield prepared(pixels, index, transform, self.views, device)

    def raw(self, index: slice) -> Tensor:
        """These rows as float32 pixel values, not transformed: the dataset as the user gave it."""
        return replace(self, transform=None, views=None).decode(index)



# -- Indexing -----------------------------------------------------------------------------------------------


@dataclass
class _Listing:
    """Every regular member of a dataset's containers, in container order."""

    containers: list[tuple[str, str]]
    container: list[int]
    offset: list[int]
    size: list[int]
    names: list[str]

    def members(self) -> Members:
        return Members(
            containers=tuple(self.containers),
            container=np.asarray(self.container, np.int32),
            offset=np.asarray(self.offset, np.int64),
            size=np.asarray(self.size, np.int64),
            names=np.asarray([n.encode() for n in self.names], dtype=bytes),
        )

    def add(self, c: int, name: str, offset: int, size: int) -> None:
        if len(self.size) >= MAX_MEMBERS:
            raise DatasetError(
                f"the dataset holds more than {MAX_MEMBERS} files", code="dataset_too_large", field="dataset"
            )
        self.container.append(c)
        self.offset.append(offset)
        self.size.append(size)
        self.names.append(name)


def streamable(path: Path) -> list[tuple[str, str]] | None:
    """The containers this dataset would stream from, or None when its format is read whole (NPZ, tables,
    IDX, compressed tars)."""
    path = Path(path)
    if path.is_dir():
        visible = [p for p in sorted(path.iterdir()) if not p.name.startswith((".", "__MACOSX"))]
        if visible and all(p.is_file() and p.suffix.lower() == ".tar" for p in visible):
            return [("tar", str(p)) for p in visible]  # a WebDataset shard set
        return [("dir", str(path))]
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PAR1":
        return None
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            return None  # the in-memory reader reports what is wrong with it
        return None if names and all(n.endswith(".npy") for n in names) else [("zip", str(path))]
    try:
        with tarfile.open(path, "r:") as tf:  # uncompressed only: a member is read at its offset
            tf.next()
        return [("tar", str(path))]
    except (tarfile.TarError, OSError, EOFError):
        return None


def _list(containers: list[tuple[str, str]]) -> _Listing:
    listing = _Listing(containers, [], [], [], [])
    for c, (kind, path) in enumerate(containers):
        if kind == "dir":
            root = Path(path)
            for p in sorted(root.rglob("*")):
                rel = p.relative_to(root).as_posix()
                if p.is_file() and not p.is_symlink():
                    listing.add(c, rel, 0, p.stat().st_size)
        elif kind == "zip":
            try:
                with zipfile.ZipFile(path) as zf:
                    for info in zf.infolist():
                        if not info.is_dir():
                            if info.flag_bits & 0x1:
                                raise DatasetError(
                                    f"{info.filename} is encrypted", code="bad_archive", field="dataset"
                                )
                            listing.add(c, info.filename, 0, info.file_size)
            except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
                raise DatasetError(
                    f"cannot read zip {Path(path).name}: {exc}", code="bad_archive", field="dataset"
                ) from None
        else:
            try:
                with tarfile.open(path, "r:") as tf:
                    for member in tf:
                        if member.issym() or member.islnk() or member.isdev() or member.isfifo():
                            raise DatasetError(
                                f"{Path(path).name}: member {member.name!r} is a link or device; a dataset "
                                "holds plain files",
                                code="bad_archive",
                                field="dataset",
                            )
                        if member.isfile():
                            listing.add(c, member.name, member.offset_data, member.size)
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise DatasetError(
                    f"cannot read tar {Path(path).name}: {exc}", code="bad_archive", field="dataset"
                ) from None
    return listing


def _hidden(name: str) -> bool:
    return any(part.startswith((".", "__MACOSX")) for part in name.split("/"))


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES and not _hidden(name)


def should_stream(path: Path, val_path: Path | None, streaming: str) -> bool:
    """`streaming` "always": any streamable image dataset, and a folder of WebDataset shards whatever the
    setting but "never"; "auto": one whose decoded float32 rows would take more than STREAM_ABOVE_BYTES
    (estimated from the member count and the first image's header; anything unreadable is left to the
    in-memory reader to report)."""
    return _listing_to_stream(path, val_path, streaming) is not None


def _listing_to_stream(path: Path, val_path: Path | None, streaming: str) -> _Listing | None:
    """The dataset's listing when it is to stream (see `should_stream`), else None: listed once for both
    the decision and the index."""
    if streaming == "never":
        return None
    containers = streamable(path)
    if containers is None:
        return None
    if streaming == "always" or (Path(path).is_dir() and containers[0][0] == "tar"):
        return _list(containers)  # a folder of shards has no in-memory reader
    from PIL import Image

    try:
        listing = _list(containers)
        total = 0
        for found in [listing, *([_list(streamable(val_path) or [])] if val_path else [])]:
            images = [i for i, n in enumerate(found.names) if _is_image(n)]
            if images:
                with Image.open(io.BytesIO(_Reader(found.members()).read(images[0], HEADER_BYTES))) as im:
                    (width, height), channels = im.size, 1 if im.mode in GREY_MODES else 3
                total += len(images) * channels * height * width * 4
    except (DatasetError, OSError, ValueError, EOFError, Image.DecompressionBombError):
        return None
    return listing if total > STREAM_ABOVE_BYTES else None


def open_image_stream(
    path: Path, *, val_path: Path | None = None, streaming: str = "always"
) -> StreamedData | None:
    """Index an image dataset for streaming; None when it is not to stream (`should_stream`), its format is
    read whole (see `streamable`) or it holds no images (a zipped CSV)."""
    listing = _listing_to_stream(path, val_path, streaming)
    if listing is None:
        return None
    members = listing.members()
    if any(n.endswith(".cls") and not _hidden(n) for n in listing.names):
        splits, names = {"train": _webdataset_rows(listing, _Reader(members))}, None
    elif any(_is_image(n) for n in listing.names):
        splits, names = _folder_rows(listing)
    else:
        return None
    del listing
    shape = _check_headers(members, [rows for rows, _ in splits.values()])

    def stream(rows: np.ndarray) -> ImageStream:
        return ImageStream(members.take(rows), shape)

    train_rows, y = splits["train"]
    data = StreamedData(stream(train_rows), y, None, None, names)
    if "val" in splits:
        val_rows, y_val = splits["val"]
        data = replace(data, x_val=stream(val_rows), y_val=y_val)
    if val_path is not None:
        data = _attach_validation(data, val_path)
    return data


def _attach_validation(data: StreamedData, val_path: Path) -> StreamedData:
    val = open_image_stream(val_path)
    if val is None:
        raise DatasetError(
            "the validation file must be an image dataset too (zip, tar or folder)",
            code="ambiguous_dataset",
            field="validation",
        )
    if data.x_val is not None:
        raise DatasetError(
            "the dataset already has a validation split; drop the separate validation file",
            code="ambiguous_dataset",
            field="validation",
        )
    if val.feature_shape != data.feature_shape:
        raise DatasetError(
            f"validation images are {val.feature_shape}, training images {data.feature_shape}",
            code="val_shape_mismatch",
            field="x_val",
        )
    return replace(data, x_val=val.x, y_val=translate_labels(val.y, val.class_names, data.class_names))


def _webdataset_rows(listing: _Listing, reader: _Reader) -> tuple[np.ndarray, np.ndarray]:
    """WebDataset samples (`key.jpg|png|webp` + `key.cls`; a sample's files adjacent, as WebDataset writers
    put them): the image member of each, and its label (-1 without `.cls`); rows in (shard, key) order,
    the order the in-memory reader gives one shard."""
    rows: list[int] = []
    labels: list[int] = []
    keys: list[str] = []
    current: tuple[int, str] | None = None
    group: dict[str, int] = {}

    def flush() -> None:
        if current is None:
            return
        image = next((group[e] for e in sorted(group) if f".{e}" in IMAGE_SUFFIXES), None)
        label = group.get("cls")
        key = current[1]
        if image is None:
            if label is not None:
                raise DatasetError(f"sample {key!r} has a .cls but no image", code="bad_labels", field="y")
            return
        value = -1 if label is None else class_index(key, listing.names[label], reader.read(label, 32))
        rows.append(image)
        labels.append(value)
        keys.append(key)

    for i, name in enumerate(listing.names):
        if _hidden(name):
            continue
        folder, _, base = name.rpartition("/")
        stem, dot, ext = base.partition(".")
        if not dot:
            continue
        key = (listing.container[i], f"{folder}/{stem}" if folder else stem)
        if key != current:
            flush()
            current, group = key, {}
        group[ext.lower()] = i
    flush()
    if not rows:
        raise DatasetError(
            "no key.jpg/png/webp samples in this WebDataset shard", code="empty_dataset", field="x"
        )
    shard = np.asarray([listing.container[i] for i in rows])
    order = np.lexsort((np.asarray(keys, dtype=str), shard))
    return np.asarray(rows, np.int64)[order], np.asarray(labels, np.int64)[order]


def _folder_rows(listing: _Listing) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str] | None]:
    """`class_name/*.png|jpg` (top-level images unlabelled), `train/` + `val/` giving a split, a lone
    wrapping folder stepped into: data_formats.read_image_folder's layout, on member names."""
    images = {tuple(n.split("/")): i for i, n in enumerate(listing.names) if _is_image(n)}
    prefix: tuple[str, ...] = ()
    while True:  # step into a lone wrapping folder, never into a class
        level = {p[len(prefix)] for p in images if len(p) > len(prefix) + 1}
        at_root = any(len(p) == len(prefix) + 1 for p in images)
        deeper = any(len(p) > len(prefix) + 2 for p in images)
        if len(level) != 1 or at_root or not deeper:
            break
        prefix = (*prefix, next(iter(level)))
    dirs = {p[len(prefix)].lower(): p[len(prefix)] for p in images if len(p) > len(prefix) + 1}
    val_name = next((n for n in VAL_SPLIT_NAMES if n in dirs), None)
    if "train" in dirs and val_name and set(dirs) <= {"train", *VAL_SPLIT_NAMES}:
        train, classes = _split_rows(images, (*prefix, dirs["train"]), None)
        val, _ = _split_rows(images, (*prefix, dirs[val_name]), classes)
        return {"train": train, "val": val}, classes
    train, classes = _split_rows(images, prefix, None)
    return {"train": train}, classes or None


def _split_rows(
    images: dict[tuple[str, ...], int], root: tuple[str, ...], names: list[str] | None
) -> tuple[tuple[np.ndarray, np.ndarray], list[str]]:
    depth = len(root)
    under = sorted(p for p in images if p[:depth] == root)
    items: list[tuple[tuple[str, ...], str | None]] = [(p, None) for p in under if len(p) == depth + 1]
    items += [(p, p[depth]) for p in under if len(p) > depth + 1]
    if not items:
        where = "/".join(root) or "the dataset"
        raise DatasetError(
            f"no .png/.jpg images under {where}; expected class_name/*.png", code="empty_dataset", field="x"
        )
    labels, names = class_ids([c for _, c in items], names)
    return (np.asarray([images[p] for p, _ in items], np.int64), labels), names


def _check_headers(members: Members, splits: list[np.ndarray]) -> tuple[int, int, int]:
    """Every image's header: readable, not oversized, one size for all; (C, H, W), C 1 when all are grey."""
    from PIL import Image

    reader = _Reader(members)
    first: tuple[int, tuple[int, int]] | None = None
    grey = True
    for rows in splits:
        for i in rows.tolist():
            if members.size[i] > MAX_MEMBER_BYTES:
                raise DatasetError(
                    f"{members.name(i)} is {members.size[i]} bytes; one image may take {MAX_MEMBER_BYTES}",
                    code="bad_image",
                    field="x",
                )
            try:
                head = reader.read(i, HEADER_BYTES)
                with Image.open(io.BytesIO(head)) as im:
                    size, mode = im.size, im.mode
            except (OSError, Image.DecompressionBombError) as exc:
                raise DatasetError(
                    f"cannot read image {members.name(i)}: {exc}", code="bad_image", field="x"
                ) from None
            grey = grey and mode in GREY_MODES
            if first is None:
                first = (i, size)
            elif size != first[1]:
                (w0, h0) = first[1]
                raise DatasetError(
                    f"images must all be the same size: {members.name(first[0])} is {w0}x{h0} but "
                    f"{members.name(i)} is {size[0]}x{size[1]}; resize them first",
                    code="image_size_mismatch",
                    field="x",
                )
    assert first is not None
    width, height = first[1]
    return (1 if grey else 3, height, width)
