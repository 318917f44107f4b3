"""Image augmentation for training, and the stored views of multi-view soft labels (FKD).

`augment` in a job's config, for image data (inputs N x C x H x W):

    {"random_resized_crop": {"scale": [0.35, 1.0], "ratio": [0.75, 1.333]}, "hflip": true, "seed": 0}

`random_resized_crop` (or `true` for those defaults) takes a box of `scale` of the image's area with an aspect
ratio in `ratio` (log-uniform), as torchvision's RandomResizedCrop draws it (ten tries, then the whole image
clipped to the ratio), and resizes it back to H x W (bilinear); `hflip` mirrors half the views. Plain torch
ops (`affine_grid` + `grid_sample`, one batched call), on any float tensor: torchvision from PyPI does not
load beside the CPU torch build these machines use.

Multi-view soft labels (Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition", ECCV
2022): the soft-label stage draws `views` augmented views of every training image and stores, per view, the
view's parameters (`ViewParams`: crop box and flip, 5 integers per image) and the teacher's logits on it.
Training replays view `(epoch - 1) % views` in epoch `epoch`, so augmented distillation never runs the
teacher again. A view is a pure function of (`seed`, view index, row, image size, the crop settings): the
stage and any later reader draw the same boxes; the stored parameters are there to be read and checked.
The exported student's preprocessing is the evaluation transform: augmentation is for training only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from worker.distill.errors import ConfigError

DEFAULT_SCALE = (0.35, 1.0)  # FKD's ImageNet setting (torchvision's 0.08 is harsh on small images)
DEFAULT_RATIO = (3 / 4, 4 / 3)
MAX_VIEWS = 32
_TRIES = 10
VIEW_PARAMS = 5  # top, left, height, width, flip


@dataclass(frozen=True)
class Augment:
    crop_scale: tuple[float, float] | None  # None: no crop
    crop_ratio: tuple[float, float]
    hflip: bool
    seed: int

    @classmethod
    def from_config(cls, settings: dict[str, Any] | None) -> Augment | None:
        """The validated settings of `augment`, or None when absent; ConfigError(field="augment") else."""
        if settings is None:
            return None
        if not isinstance(settings, dict):
            raise ConfigError("augment: an object such as {\"hflip\": true}", field="augment")
        unknown = sorted(set(settings) - {"random_resized_crop", "hflip", "seed"})
        if unknown:
            raise ConfigError(
                f"augment: unknown {unknown}; known: random_resized_crop, hflip, seed", field="augment"
            )
        crop = settings.get("random_resized_crop", False)
        scale: tuple[float, float] | None = None
        ratio = DEFAULT_RATIO
        if crop is True:
            scale = DEFAULT_SCALE
        elif isinstance(crop, dict):
            extra = sorted(set(crop) - {"scale", "ratio"})
            if extra:
                message = f"augment.random_resized_crop: unknown {extra}; known: scale, ratio"
                raise ConfigError(message, field="augment")
            scale = _pair(crop.get("scale", DEFAULT_SCALE), "scale", low=0.0, high=1.0)
            ratio = _pair(crop.get("ratio", DEFAULT_RATIO), "ratio", low=0.0, high=math.inf)
        elif crop is not False and crop is not None:
            raise ConfigError("augment.random_resized_crop: true, false or {scale, ratio}", field="augment")
        hflip = settings.get("hflip", False)
        seed = settings.get("seed", 0)
        if not isinstance(hflip, bool):
            raise ConfigError("augment.hflip: true or false", field="augment")
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31:
            raise ConfigError("augment.seed: an integer in [0, 2^31)", field="augment")
        if scale is None and not hflip:
            raise ConfigError("augment: names no transform (random_resized_crop, hflip)", field="augment")
        return cls(scale, ratio, hflip, seed)

    def sample(self, rows: int, height: int, width: int, view: int) -> Tensor:
        """(rows, 5) int32 view parameters (top, left, height, width, flip) of view `view` of every row."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + view)
        top = torch.zeros(rows, dtype=torch.int64)
        left = torch.zeros(rows, dtype=torch.int64)
        h = torch.full((rows,), height, dtype=torch.int64)
        w = torch.full((rows,), width, dtype=torch.int64)
        if self.crop_scale is not None:
            top, left, h, w = _crop_boxes(gen, rows, height, width, self.crop_scale, self.crop_ratio)
        flip = torch.rand(rows, generator=gen) < 0.5 if self.hflip else torch.zeros(rows, dtype=torch.bool)
        return torch.stack([top, left, h, w, flip.long()], dim=1).to(torch.int32)


def _pair(value: Any, name: str, *, low: float, high: float) -> tuple[float, float]:
    ok = (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    )
    if not ok or not (low < float(value[0]) <= float(value[1]) <= high):
        message = f"augment.random_resized_crop.{name}: [min, max] with {low} < min <= max <= {high}"
        raise ConfigError(message, field="augment")
    return float(value[0]), float(value[1])


def _crop_boxes(
    gen: torch.Generator,
    rows: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """torchvision's RandomResizedCrop.get_params, for every row at once: the first of ten draws that fits,
    else the whole image clipped to the ratio range, centred."""
    area = height * width
    target = area * torch.empty(rows, _TRIES).uniform_(scale[0], scale[1], generator=gen)
    log_ratio = torch.empty(rows, _TRIES).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(fits.any(1), fits.long().argmax(1), torch.full((rows,), -1))
    # Fallback: the whole image, cut to the nearest ratio in range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = int(round(height * ratio[1])), height
    else:
        fw, fh = width, height
    pick = first.clamp_min(0).unsqueeze(1)
    h_sel = torch.where(first >= 0, h.gather(1, pick).squeeze(1), torch.full((rows,), fh))
    w_sel = torch.where(first >= 0, w.gather(1, pick).squeeze(1), torch.full((rows,), fw))
    u_top, u_left = torch.rand(rows, generator=gen), torch.rand(rows, generator=gen)
    top = torch.where(first >= 0, (u_top * (height - h_sel + 1)).long(), (height - h_sel) // 2)
    left = torch.where(first >= 0, (u_left * (width - w_sel + 1)).long(), (width - w_sel) // 2)
    return top, left, h_sel, w_sel


def apply_views(x: Tensor, params: Tensor) -> Tensor:
    """Each image of `x` (B, C, H, W), cropped to its box, resized back to H x W (bilinear) and flipped where
    its flag says: one batched `grid_sample`, in x's float dtype (integer images are computed in float32)."""
    if x.ndim != 4:
        message = f"augment needs images (N, C, H, W); got inputs of shape {tuple(x.shape)}"
        raise ConfigError(message, field="augment")
    out_dtype = x.dtype if x.is_floating_point() else torch.float32
    xf = x.to(out_dtype)
    batch, _, height, width = x.shape
    p = params.to(device=x.device, dtype=torch.float32)
    top, left, h, w, flip = p.unbind(1)
    # align_corners=False: pixel i's centre is at -1 + (2i + 1) / size; the box [left, left + w) maps to
    # centre (2 * left + w) / width - 1 and half-width w / width in normalised units.
    cx = (2 * left + w) / width - 1
    cy = (2 * top + h) / height - 1
    sx = (w / width) * torch.where(flip > 0, -1.0, 1.0)
    sy = h / height
    theta = torch.zeros(batch, 2, 3, device=x.device, dtype=torch.float32)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, sy, cy
    grid = F.affine_grid(theta, [batch, 1, height, width], align_corners=False)
    return F.grid_sample(xf.float(), grid, mode="bilinear", padding_mode="border", align_corners=False).to(
        out_dtype
    )


def view_split(view: int) -> str:
    """The soft-label split that holds the teacher's logits on view `view` of the training rows."""
    return f"train.v{view}"


def view_params_name(view: int) -> str:
    """The file beside the soft labels that holds view `view`'s parameters, (N, 5) int32 (.npy)."""
    return f"{view_split(view)}-params.npy"
