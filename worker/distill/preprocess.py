"""Input normalisation shared by teacher and student: `(x * scale - mean) / std`.

An nn.Module rather than a function so the exported student carries it inside and takes the same raw input
as the teacher. Scalars broadcast over everything; per-channel values apply along axis 1 (channels of an
(N, C, H, W) image batch, or features of an (N, F) table).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from worker.distill.config import Preprocess
from worker.distill.errors import ConfigError


class PreprocessModule(nn.Module):
    if TYPE_CHECKING:  # the buffers' types, for mypy only: TorchScript cannot read these string annotations
        mean: Tensor
        std: Tensor

    def __init__(
        self, scale: float = 1.0, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)
    ) -> None:
        super().__init__()
        mean, std = list(mean), list(std)
        if not mean or not std:
            raise ConfigError("preprocess: mean and std need at least one value", field="preprocess")
        if scale == 0 or any(s <= 0 for s in std):
            raise ConfigError("preprocess: scale must be non-zero and std > 0", field="preprocess")
        if len(mean) > 1 and len(std) > 1 and len(mean) != len(std):
            raise ConfigError(
                f"preprocess: mean has {len(mean)} channels but std has {len(std)}", field="preprocess"
            )
        self.scale = float(scale)
        # Per-channel flags are fixed Python bools so scripting and ONNX export see one static graph.
        self.mean_per_channel = len(mean) > 1
        self.std_per_channel = len(std) > 1
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    @classmethod
    def from_config(cls, config: Preprocess) -> PreprocessModule:
        return cls(config.scale, config.mean, config.std)

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and bool((self.mean == 0).all()) and bool((self.std == 1).all())

    @property
    def channels(self) -> int | None:
        """How many channels (axis 1) the input must have, or None when every value is a scalar."""
        if self.mean_per_channel or self.std_per_channel:
            return max(self.mean.numel(), self.std.numel())
        return None

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, ...) raw values -> same shape, normalised."""
        x = x * self.scale
        mean = self.mean
        std = self.std
        if self.mean_per_channel or self.std_per_channel:
            shape = [1, -1] + [1] * (x.dim() - 2)
            if self.mean_per_channel:
                mean = mean.view(shape)
            if self.std_per_channel:
                std = std.view(shape)
        return (x - mean) / std

    def extra_repr(self) -> str:
        return f"scale={self.scale}, mean={self.mean.tolist()}, std={self.std.tolist()}"
