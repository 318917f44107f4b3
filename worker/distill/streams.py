"""`RowStream`: a dataset's rows read a batch at a time instead of held in memory, the one shape every stage
reads a large dataset through (image_stream.py: images decoded by loader processes; table_stream.py: a
Parquet table's rows, memory-mapped).

Indexing a stream with a tensor, array or slice gives the stream of those rows (nothing is read); `batches`
reads, one float32 batch per list of rows, in order, made ready (transformed, and for images cropped to a
stored view) on `device`.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from worker.distill.augment import apply_views

BATCH_BYTES = 16 << 20  # the largest float32 batch a stage reads at once (training batches are the config's)
Transform = Callable[[Tensor], Tensor]
Rows = Tensor | np.ndarray | range


class RowStream(ABC):
    @abstractmethod
    def __len__(self) -> int: ...

    @property
    @abstractmethod
    def row_shape(self) -> tuple[int, ...]:
        """One row's shape: (C, H, W) for images, (features,) for a table."""

    @abstractmethod
    def __getitem__(self, index: Tensor | np.ndarray | slice) -> RowStream: ...

    @abstractmethod
    def with_transform(self, transform: Transform | None) -> RowStream: ...

    @abstractmethod
    def with_views(self, params: Tensor) -> RowStream:
        """Each row cropped and flipped by its (5,) parameters (augment.py) as it is read: images only."""

    @abstractmethod
    def batches(
        self, lists: Sequence[Rows], workers: int | None = None, device: torch.device | None = None
    ) -> Iterator[Tensor]: ...

    @abstractmethod
    def raw(self, index: slice) -> Tensor:
        """These rows as the user gave them (float32, not transformed)."""

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.row_shape)

    @property
    def decoded_bytes(self) -> int:
        """What the rows would take as float32 in memory."""
        return len(self) * int(np.prod(self.row_shape)) * 4

    def batch_rows(self, wanted: int) -> int:
        """`wanted` rows per batch, or fewer where that many would take more than BATCH_BYTES as float32."""
        return max(1, min(wanted, BATCH_BYTES // (int(np.prod(self.row_shape)) * 4)))

    def decode(self, index: slice | Rows) -> Tensor:
        """These rows, read here and prepared (a few rows: the preflight, samples)."""
        rows = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index, np.int64)
        return next(self.batches([rows], workers=0))


def transform_on(transform: Transform | None, device: torch.device | None) -> Transform | None:
    """`transform` for batches on `device`: a module is copied there (the job's own stays where it is)."""
    if device is None or device.type == "cpu" or not isinstance(transform, torch.nn.Module):
        return transform
    return copy.deepcopy(transform).to(device)


def prepared(
    x: Tensor, rows: Rows, transform: Transform | None, views: Tensor | None, device: torch.device | None
) -> Tensor:
    """One batch as read (any dtype, on the CPU) made ready: moved to `device` as it is (uint8 pixels are a
    quarter of the bytes), made float32, transformed, and cropped/flipped to each row's stored view."""
    if device is not None and device.type != "cpu":
        x = x.pin_memory().to(device, non_blocking=True)
    with torch.no_grad():  # a value, never a generator suspended here: the caller keeps autograd
        x = x.float()
        if transform is not None:
            x = transform(x)
        if views is not None:
            x = apply_views(x, views[torch.as_tensor(np.asarray(rows, np.int64))].to(x.device))
    return x


def row_batches(
    x: Tensor | RowStream, n: int, batch: int, device: torch.device | None = None
) -> Iterator[Tensor]:
    """Rows 0..n of `x` in order, at most `batch` at a time: cut from a tensor, or read from a stream
    (fewer rows per batch where its rows are large; see `batch_rows`)."""
    if isinstance(x, RowStream):
        rows = x.batch_rows(batch)
        return x.batches([range(s, min(n, s + rows)) for s in range(0, n, rows)], device=device)
    return (x[s : s + batch] for s in range(0, n, batch))


def positions(n: int, index: Tensor | np.ndarray | slice) -> np.ndarray:
    """Row positions of `index` into a stream of n rows."""
    return np.arange(n)[index] if isinstance(index, slice) else np.asarray(index, np.int64)


@dataclass(frozen=True)
class StreamedData:
    """A streamed dataset's train rows (and validation rows, when the dataset has them) with their labels."""

    x: RowStream
    y: np.ndarray
    x_val: RowStream | None
    y_val: np.ndarray | None
    class_names: list[str] | None

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return self.x.row_shape
