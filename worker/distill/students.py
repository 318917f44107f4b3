"""Built-in architectures by name: the students, and the skeletons safetensors/state-dict teachers load into.

`build_student("mlp:hidden=128,64;dropout=0.1", input_shape=(1, 28, 28), num_classes=10)`. Every model takes
a preprocessed float32 batch `(N, *input_shape)` and returns logits `(N, num_classes)`; all are scriptable
and ONNX-exportable. Convolutional models need only the channel count: global pooling makes them work at
any spatial size, so a teacher's weights load without knowing the image size.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from worker.distill.config import parse_model_spec
from worker.distill.errors import ConfigError, MismatchError, describe_dim, describe_shape, error_cause
from worker.distill.model_formats import detect_format
from worker.distill.registry import Registry
from worker.distill.torchscript_guard import UnsafeOperator, load_torchscript

Builder = Callable[..., nn.Module]
STUDENTS: Registry[Builder] = Registry("student")


def build_student(spec: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A fresh model from a spec like `"cnn:channels=32,64"`; unknown names or parameters -> ConfigError."""
    name, params = parse_model_spec(spec)
    builder = STUDENTS.get(name)
    accepted = [p for p in inspect.signature(builder).parameters if p not in ("input_shape", "num_classes")]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"{name}: unknown parameter(s) {', '.join(unknown)}; accepted: {', '.join(accepted) or 'none'}",
            field="student",
        )
    if num_classes < 1:
        raise ConfigError(f"{name}: num_classes must be >= 1, got {num_classes}", field="student")
    if not input_shape or any(int(d) < 1 for d in input_shape):
        raise ConfigError(f"{name}: bad input shape {tuple(input_shape)}", field="student")
    return builder(tuple(int(d) for d in input_shape), int(num_classes), **params)


def load_student_init(path: Path, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """The user's own TorchScript module as the student's starting point, checked on a zero batch."""
    fmt = detect_format(Path(path))
    if fmt != "torchscript":
        raise ConfigError(
            f"student init must be a TorchScript archive (torch.jit.save); {Path(path).name} is {fmt}",
            code="invalid_student_init",
            field="student_init",
        )
    try:
        module = load_torchscript(Path(path))
    except UnsafeOperator as exc:
        raise ConfigError(
            exc.message(Path(path).name, "student init"), code="unsafe_operator", field="student_init"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any failure here is the file's fault
        raise ConfigError(
            f"cannot load student init: {error_cause(exc)}", code="invalid_student_init", field="student_init"
        ) from None
    probe = torch.zeros(2, *input_shape)
    module.eval()
    try:
        with torch.no_grad():
            out = module(probe)
    except Exception as exc:  # noqa: BLE001
        raise MismatchError(
            f"student init fails on input of shape {describe_shape(probe)}: {error_cause(exc)}",
            field="student_init",
        ) from None
    if not isinstance(out, Tensor) or tuple(out.shape) != (2, num_classes):
        got = f"a tensor of shape {describe_shape(out)}" if isinstance(out, Tensor) else type(out).__name__
        raise MismatchError(
            f"student init returns {got} for a batch of 2 rows; expected a 2-D (batch, classes) tensor "
            f"with batch 2 and the teacher's {describe_dim(num_classes)} classes",
            field="student_init",
        )
    module.train()
    return module


def _positive_ints(name: str, key: str, value: Any) -> list[int]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and v >= 1 for v in values):
        raise ConfigError(f"{name}: {key} must be positive integers, got {value!r}", field="student")
    return values


def _dropout(name: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{name}: dropout must be in [0, 1), got {value!r}", field="student")
    return float(value)


def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(input_shape) not in (2, 3):
        raise ConfigError(
            f"{name}: needs image inputs (C, H, W) or (H, W), got feature shape {input_shape}",
            field="student",
        )
    return input_shape


@STUDENTS.register("logreg")
def logreg(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


@STUDENTS.register("mlp")
def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: Any = 128, dropout: Any = 0.0) -> nn.Module:
    sizes = _positive_ints("mlp", "hidden", hidden)
    p = _dropout("mlp", dropout)
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for size in sizes:
        layers += [nn.Linear(width, size), nn.ReLU()]
        if p > 0:
            layers.append(nn.Dropout(p))
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class _ImageModel(nn.Module):
    """features -> global pool -> head; the channel axis is added for (N, H, W) grey inputs.

    `add_channel` is a plain attribute, not a layer, so the state-dict keys are the same either way.
    """

    def __init__(self, features: nn.Sequential, head: nn.Sequential, add_channel: bool) -> None:
        super().__init__()
        self.add_channel = add_channel
        self.features = features
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        if self.add_channel:
            x = x.unsqueeze(1)
        logits: Tensor = self.head(self.features(x))
        return logits


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


@STUDENTS.register("cnn")
def cnn(
    input_shape: tuple[int, ...], num_classes: int, channels: Any = (32, 64), dropout: Any = 0.0
) -> nn.Module:
    shape = _image_shape("cnn", input_shape)
    widths = _positive_ints("cnn", "channels", list(channels) if isinstance(channels, tuple) else channels)
    p = _dropout("cnn", dropout)
    layers: list[nn.Module] = []
    c_in = 1 if len(shape) == 2 else shape[0]
    for width in widths:
        # ceil_mode keeps a 1x1 map at 1x1, so depth never depends on the image size
        layers += [*_conv_bn(c_in, width), nn.MaxPool2d(2, ceil_mode=True)]
        c_in = width
    head: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if p > 0:
        head.append(nn.Dropout(p))
    head.append(nn.Linear(c_in, num_classes))
    return _ImageModel(nn.Sequential(*layers), nn.Sequential(*head), add_channel=len(shape) == 2)


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(c_in, c_out, stride), *_conv_bn(c_out, c_out)[:-1])
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.relu(self.body(x) + self.shortcut(x))
        return out


@STUDENTS.register("resnet")
def resnet(input_shape: tuple[int, ...], num_classes: int, depth: Any = 8, width: Any = 16) -> nn.Module:
    """CIFAR-style ResNet (He et al. 2016, section 4.2): depth = 6n + 2, three stages of width w, 2w, 4w."""
    shape = _image_shape("resnet", input_shape)
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ConfigError(f"resnet: depth must be 6n + 2 (8, 14, 20, ...), got {depth!r}", field="student")
    (w,) = _positive_ints("resnet", "width", width)
    blocks = (depth - 2) // 6
    layers = _conv_bn(1 if len(shape) == 2 else shape[0], w)
    c_in = w
    for stage, c_out in enumerate((w, 2 * w, 4 * w)):
        for i in range(blocks):
            layers.append(_BasicBlock(c_in, c_out, 2 if stage > 0 and i == 0 else 1))
            c_in = c_out
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))
    return _ImageModel(nn.Sequential(*layers), head, add_channel=len(shape) == 2)
