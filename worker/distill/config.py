"""The fully resolved settings of one distillation run.

One plain dataclass, built from a JSON-able dict at the edge (`DistillConfig.from_dict`) and written back
into the model card (`to_dict`). The service's API schema mirrors these field names.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from worker.distill.augment import MAX_VIEWS, Augment
from worker.distill.errors import ConfigError

Auto = Literal["auto"]
SOFT_LABEL_FORMATS = ("full", "topk")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "onecycle", "constant")
EXPORT_FORMATS = ("torchscript", "onnx", "safetensors", "hf")
DEFAULT_EXPORT_FORMATS = ("torchscript", "onnx", "safetensors")  # "hf": text students (a model folder)
MAX_TEXT_LENGTH = 8192


def parse_model_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """`"mlp:hidden=128,64;dropout=0.1"` -> `("mlp", {"hidden": [128, 64], "dropout": 0.1})`.

    Parameters are separated by `;`, list items by `,`; numbers are parsed, anything else stays a string.
    """
    name, _, rest = spec.strip().partition(":")
    if not name:
        raise ConfigError(f"empty model spec {spec!r}; expected e.g. 'mlp:hidden=128'", field="student")
    params: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(";"))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip() or not value.strip():
            message = f"bad parameter {part!r} in model spec {spec!r}; expected key=value"
            raise ConfigError(message, field="student")
        items = [_number(v.strip()) for v in value.split(",")]
        if any(isinstance(item, float) and not math.isfinite(item) for item in items):
            message = f"parameter {key.strip()!r} in {spec!r} must be a finite number"
            raise ConfigError(message, field="student")
        params[key.strip()] = items if len(items) > 1 else items[0]
    return name.strip(), params


def _number(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


@dataclass
class Preprocess:
    """Applied to raw inputs before teacher and student alike: `(x * scale - mean) / std`.

    `mean`/`std` are scalars or one value per channel (axis 1 of the input). Baked into exported students.
    """

    scale: float = 1.0
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])


STREAMING = ("auto", "always", "never")


@dataclass
class DistillConfig:
    # Teacher: "auto" detects TorchScript / ONNX / safetensors / state dict from the file's bytes.
    teacher_format: str = "auto"
    teacher_arch: str | None = None  # registry spec, needed for safetensors/state-dict teachers
    # Data
    label_column: str = "label"  # CSV/Parquet/JSONL
    # Text datasets (a transformer teacher): the column of texts, tokens per text (longer ones are truncated)
    text_column: str = "text"
    max_length: int = 128
    val_fraction: float = 0.1  # seeded stratified holdout when the dataset brings no validation split
    # Image datasets (zip, uncompressed tar, folder, WebDataset shards) decoded a batch at a time instead of
    # whole (image_stream.py): "auto" above image_stream.STREAM_ABOVE_BYTES of decoded rows, or always, never.
    streaming: str = "auto"
    preprocess: Preprocess = field(default_factory=Preprocess)
    # Image training augmentation (augment.py), and the augmented views of every training image whose teacher
    # logits the soft-label stage stores (FKD): epoch e trains on view (e - 1) % views. None / 1: neither.
    augment: dict[str, Any] | None = None
    views: int = 1
    # Soft-label stage
    soft_label_format: str = "full"  # "full" (fp16 logits) or "topk"
    topk: int = 5
    shard_size: int = 8192
    # Method: a losses.METHODS name, or "auto" (autotune picks Hinton KD or DIST on validation).
    method: str = "auto"
    temperature: float | Auto = "auto"
    alpha: float | Auto = "auto"
    method_params: dict[str, float] = field(default_factory=dict)  # e.g. dkd beta, dist gamma
    # Student
    student: str = "mlp:hidden=128"
    # Training
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    schedule: str = "cosine"
    grad_clip: float | None = 1.0
    seed: int = 0
    # A checkpoint inside an epoch every this many steps (as well as every train.CHECKPOINT_SECONDS and per
    # epoch); None: by time alone. One process; a data-parallel run checkpoints per epoch.
    checkpoint_every_steps: int | None = None
    finetune_epochs: int = 0  # hard-label fine-tuning after distillation (labelled rows only)
    finetune_lr: float | None = None
    # Report and outputs
    baseline: bool = True  # also train the same student on hard labels alone, same budget
    export_formats: list[str] = field(default_factory=lambda: list(DEFAULT_EXPORT_FORMATS))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DistillConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}", field=unknown[0])
        values = dict(data)
        if isinstance(values.get("preprocess"), dict):
            values["preprocess"] = Preprocess(**_as_lists(values["preprocess"]))
        config = cls(**values)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"{name}: {why}", field=name)

        formats = SOFT_LABEL_FORMATS
        need(self.soft_label_format in formats, "soft_label_format", f"one of {formats}")
        need(self.topk >= 1, "topk", "must be >= 1")
        need(self.shard_size >= 1, "shard_size", "must be >= 1")
        auto_or_positive = self.temperature == "auto" or _positive(self.temperature)
        need(auto_or_positive, "temperature", "'auto' or a number > 0")
        need(self.alpha == "auto" or _unit(self.alpha), "alpha", "'auto' or a number in [0, 1]")
        need(
            not (self.method == "auto" and self.method_params),
            "method_params",
            "name the method they belong to (method 'auto' takes each method's defaults)",
        )
        need(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        need(self.streaming in STREAMING, "streaming", f"one of {STREAMING}")
        need(self.epochs >= 1, "epochs", "must be >= 1")
        Augment.from_config(self.augment)  # ConfigError(field="augment") names what is wrong
        need(1 <= self.views <= MAX_VIEWS, "views", f"must be in 1..{MAX_VIEWS}")
        need(self.views == 1 or self.augment is not None, "views", "more than 1 needs `augment` to draw them")
        need(1 <= self.max_length <= MAX_TEXT_LENGTH, "max_length", f"must be in 1..{MAX_TEXT_LENGTH}")
        need(bool(self.text_column), "text_column", "must not be empty")
        need(self.finetune_epochs >= 0, "finetune_epochs", "must be >= 0")
        every = self.checkpoint_every_steps
        need(every is None or every >= 1, "checkpoint_every_steps", "null or an integer >= 1")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.lr > 0, "lr", "must be > 0")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}")
        need(self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}")
        need(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "null or > 0")
        bad = [f for f in self.export_formats if f not in EXPORT_FORMATS]
        need(not bad, "export_formats", f"unknown {bad}; known {list(EXPORT_FORMATS)}")
        need(self.preprocess.scale != 0 and all(s > 0 for s in self.preprocess.std), "preprocess", "std > 0")
        parse_model_spec(self.student)
        if self.teacher_arch is not None:
            parse_model_spec(self.teacher_arch)


def _positive(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _unit(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0


def _as_lists(d: dict[str, Any]) -> dict[str, Any]:
    out = dict(d)
    for key in ("mean", "std"):
        if key in out and not isinstance(out[key], list):
            out[key] = [out[key]]
    return out
