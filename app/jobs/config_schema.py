"""The API's mirror of `worker.distill.config.DistillConfig`: same field names, same constraints, no torch.

The app may not import the worker, so the names below are copies; `tests/app/test_config_mirror.py`
compares them with the core's dataclass and registries so the two cannot drift apart silently.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

SOFT_LABEL_FORMATS = ("full", "topk")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "onecycle", "constant")
EXPORT_FORMATS = ("torchscript", "onnx", "safetensors", "hf")
DEFAULT_EXPORT_FORMATS = ("torchscript", "onnx", "safetensors")
MAX_TEXT_LENGTH = 8192
MAX_VIEWS = 32
METHODS = ("dist", "dkd", "hinton", "mse_logits", "soft_target")
STUDENTS = ("cnn", "logreg", "mlp", "resnet", "text_transformer", "teacher_layers", "textcnn", "bow")
# Students of a text classifier (a transformer teacher): token ids in, so their exports differ. The two
# transformer ones are Hugging Face models ("hf": a folder `from_pretrained` loads); none is TorchScript.
TEXT_STUDENTS = ("text_transformer", "teacher_layers", "textcnn", "bow")
HF_TEXT_STUDENTS = ("text_transformer", "teacher_layers")
TEXT_EXPORT_DEFAULTS = {"hf": ["hf", "onnx"], "other": ["onnx", "safetensors"]}
LM_STUDENTS = ("causal_lm", "teacher_layers")
LM_METHODS = ("ce", "fkl", "gkd", "rkl")
LM_SOFT_LABEL_FORMATS = ("topk", "sampled")
LM_EXPORT_FORMATS = ("hf",)
TASKS = ("classification", "causal_lm")
# Per-format default k: top-64 (DistillKit's figure), or 12 draws for sampled targets (Anshumann et al.).
LM_DEFAULT_K = {"topk": 64, "sampled": 12}
TEACHER_FORMATS = ("auto", "torchscript", "onnx", "safetensors", "state_dict")


def parse_model_spec(
    spec: str, field: str, known: tuple[str, ...] = STUDENTS
) -> tuple[str, dict[str, Any]]:
    """`"mlp:hidden=128,64;dropout=0.1"` -> `("mlp", {...})`; the same grammar as the core's parser."""
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"empty model spec {spec!r}; expected e.g. 'mlp:hidden=128'")
    if name not in known:
        raise ValueError(f"unknown architecture {name!r} in {field}; known: {', '.join(known)}")
    params: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(";"))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ValueError(f"bad parameter {part!r} in model spec {spec!r}; expected key=value")
        if any(_non_finite(item) for item in value.split(",")):
            raise ValueError(f"parameter {key.strip()!r} in {field} must be a finite number")
        params[key.strip()] = value
    return name, params


def _non_finite(text: str) -> bool:
    """The core reads every spec value that parses as a number as one; "nan", "inf" or "1e999" would reach
    a layer as a size or rate no model can use."""
    try:
        return not math.isfinite(float(text))
    except ValueError:
        return False


def model_spec(value: str, field: str, known: tuple[str, ...] = STUDENTS) -> str:
    if len(value) > 500:
        raise ValueError("model spec is longer than 500 characters")
    parse_model_spec(value, field, known)
    return value.strip()


PositiveFloat = Annotated[float, Field(gt=0)]

# Every request model refuses unknown keys and non-finite floats. Python's json reads NaN and Infinity
# literals and pydantic turns "nan"/"inf" strings into floats; stored, they become JSON null and the job
# later fails far from the cause, so every float field (lists and dict values too) refuses them here.
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


class PreprocessSchema(BaseModel):
    """Applied to raw inputs before teacher and student alike: `(x * scale - mean) / std`."""

    model_config = STRICT

    scale: float = 1.0
    mean: list[float] = Field(default_factory=lambda: [0.0], min_length=1, max_length=64)
    std: list[PositiveFloat] = Field(default_factory=lambda: [1.0], min_length=1, max_length=64)

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _scalar_to_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    @field_validator("scale")
    @classmethod
    def _nonzero(cls, value: float) -> float:
        if value == 0:
            raise ValueError("scale must not be 0")
        return value


class CropSchema(BaseModel):
    model_config = STRICT

    scale: tuple[Annotated[float, Field(gt=0, le=1)], Annotated[float, Field(gt=0, le=1)]] = (0.35, 1.0)
    ratio: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (3 / 4, 4 / 3)

    @model_validator(mode="after")
    def _ordered(self) -> CropSchema:
        if self.scale[0] > self.scale[1] or self.ratio[0] > self.ratio[1]:
            raise ValueError("scale and ratio are [min, max] with min <= max")
        return self


class AugmentSchema(BaseModel):
    """worker/distill/augment.py: training augmentation of image students, and the views FKD stores."""

    model_config = STRICT

    random_resized_crop: bool | CropSchema = False
    hflip: bool = False
    seed: int = Field(default=0, ge=0, le=2**31 - 1)

    @field_validator("random_resized_crop")
    @classmethod
    def _resolved(cls, value: bool | CropSchema) -> bool | CropSchema:
        return CropSchema() if value is True else value  # stored resolved: the config shown is the one run

    @model_validator(mode="after")
    def _names_a_transform(self) -> AugmentSchema:
        if self.random_resized_crop is False and not self.hflip:
            raise ValueError("augment names no transform (random_resized_crop, hflip)")
        return self


class DistillConfigSchema(BaseModel):
    """Every DistillConfig setting except `student` (a top-level field of the job request)."""

    model_config = STRICT

    # The request's `task`, copied in to pick this schema (not stored: the job has a column for it).
    task: Literal["classification"] = Field(default="classification", exclude=True)

    teacher_format: Literal[TEACHER_FORMATS] = "auto"  # type: ignore[valid-type]
    teacher_arch: str | None = None
    label_column: str = Field(default="label", min_length=1, max_length=200)
    text_column: str = Field(default="text", min_length=1, max_length=200)
    max_length: int = Field(default=128, ge=1, le=MAX_TEXT_LENGTH)
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    streaming: Literal["auto", "always", "never"] = "auto"
    preprocess: PreprocessSchema = Field(default_factory=PreprocessSchema)
    augment: AugmentSchema | None = None
    views: int = Field(default=1, ge=1, le=MAX_VIEWS)
    soft_label_format: Literal[SOFT_LABEL_FORMATS] = "full"  # type: ignore[valid-type]
    topk: int = Field(default=5, ge=1, le=1000)
    shard_size: int = Field(default=8192, ge=1, le=1_000_000)
    method: Literal[("auto", *METHODS)] = "auto"  # type: ignore[valid-type]
    temperature: Literal["auto"] | Annotated[float, Field(gt=0, le=100)] = "auto"
    alpha: Literal["auto"] | Annotated[float, Field(ge=0, le=1)] = "auto"
    method_params: dict[str, float] = Field(default_factory=dict, max_length=16)
    epochs: int = Field(default=10, ge=1, le=10_000)
    batch_size: int = Field(default=128, ge=1, le=65_536)
    lr: float = Field(default=1e-3, gt=0, le=10)
    weight_decay: float = Field(default=1e-4, ge=0, le=10)
    optimizer: Literal[OPTIMIZERS] = "adamw"  # type: ignore[valid-type]
    schedule: Literal[SCHEDULES] = "cosine"  # type: ignore[valid-type]
    grad_clip: Annotated[float, Field(gt=0)] | None = 1.0
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    checkpoint_every_steps: int | None = Field(default=None, ge=1)
    finetune_epochs: int = Field(default=0, ge=0, le=10_000)
    finetune_lr: Annotated[float, Field(gt=0, le=10)] | None = None
    baseline: bool = True
    export_formats: list[Literal[EXPORT_FORMATS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(DEFAULT_EXPORT_FORMATS), min_length=1, max_length=len(EXPORT_FORMATS)
    )

    def for_student(self, student: str) -> DistillConfigSchema:
        """The export formats resolved for `student` (a text student's default differs), or a ValueError
        naming a format that student cannot be written in."""
        name = student.partition(":")[0].strip()
        formats = self.export_formats
        if name in TEXT_STUDENTS:
            if "export_formats" not in self.model_fields_set:
                formats = TEXT_EXPORT_DEFAULTS["hf" if name in HF_TEXT_STUDENTS else "other"]
            refused = {"torchscript"} | (set() if name in HF_TEXT_STUDENTS else {"hf"})
        else:
            refused = {"hf"}
        bad = [f for f in formats if f in refused]
        if bad:
            who = {"hf": "text_transformer and teacher_layers", "torchscript": "image and tabular students"}
            raise ValueError(
                f"student {name!r} cannot be exported as {', '.join(bad)} "
                f"({'; '.join(f'{f} is for {who[f]}' for f in bad)})"
            )
        return self.model_copy(update={"export_formats": list(formats)})

    @field_validator("teacher_arch")
    @classmethod
    def _teacher_arch(cls, value: str | None) -> str | None:
        return None if value is None else model_spec(value, "teacher_arch")

    @field_validator("method_params")
    @classmethod
    def _params_name_their_method(cls, value: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        if value and info.data.get("method") == "auto":
            raise ValueError("name the method these belong to (method 'auto' uses each method's defaults)")
        return value

    @field_validator("export_formats")
    @classmethod
    def _unique_formats(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("export formats must not repeat")
        return value

    @model_validator(mode="after")
    def _views_need_augment(self) -> DistillConfigSchema:
        if self.views > 1 and self.augment is None:
            raise ValueError("views: more than 1 needs `augment` to draw them")
        return self


Prompt = Annotated[str, Field(max_length=2000)]


class GenerateSchema(BaseModel):
    """A causal_lm job's `generate` (`worker.distill.lm_config.GENERATE_DEFAULTS`): for a dataset of prompts
    alone, the teacher writes each completion first, greedy or sampled; the job's artifact generated.jsonl."""

    model_config = STRICT

    max_new_tokens: int = Field(default=128, ge=1, le=1024)
    do_sample: bool = False
    temperature: float = Field(default=1.0, gt=0, le=100)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)  # unset: the job's seed

    @model_validator(mode="after")
    def _sampling_settings_need_sampling(self) -> GenerateSchema:
        if not self.do_sample and (self.temperature != 1.0 or self.top_p != 1.0):
            raise ValueError(
                "temperature and top_p shape sampling only: set do_sample true, or leave them at 1"
            )
        return self


class LMConfigSchema(BaseModel):
    """Every `worker.distill.lm_config.LMConfig` setting of a `causal_lm` job except `student`. Settings
    whose default depends on the task are resolved at submission (`resolved()`), so the config shown is the
    config run."""

    model_config = STRICT

    task: Literal["causal_lm"] = "causal_lm"
    method: Literal[("auto", *LM_METHODS)] = "auto"  # type: ignore[valid-type]
    temperature: Literal["auto"] | Annotated[float, Field(gt=0, le=100)] = "auto"
    alpha: Literal["auto"] | Annotated[float, Field(ge=0, le=1)] = "auto"
    method_params: dict[str, float] = Field(default_factory=dict, max_length=4)
    soft_label_format: Literal[LM_SOFT_LABEL_FORMATS] = "topk"  # type: ignore[valid-type]
    topk: int | None = Field(default=None, ge=1, le=1024)
    max_length: int = Field(default=128, ge=8, le=8192)
    text_column: str = Field(default="text", min_length=1, max_length=200)
    pack: bool = True
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    epochs: int = Field(default=4, ge=1, le=1000)
    batch_size: int = Field(default=8, ge=1, le=4096)
    lr: float = Field(default=1e-3, gt=0, le=10)
    baseline_lr: Annotated[float, Field(gt=0, le=10)] | None = None  # None: lr
    weight_decay: float = Field(default=0.01, ge=0, le=10)
    grad_clip: Annotated[float, Field(gt=0)] | None = 1.0
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    shard_rows: int = Field(default=256, ge=1, le=1_000_000)
    checkpoint_every_steps: int | None = Field(default=None, ge=1)
    baseline: bool = True
    export_formats: list[Literal[LM_EXPORT_FORMATS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(LM_EXPORT_FORMATS), min_length=1, max_length=1
    )
    generation_prompts: list[Prompt] | None = Field(default=None, max_length=16)
    max_new_tokens: int = Field(default=32, ge=1, le=1024)
    generate: GenerateSchema | None = None

    @field_validator("method_params")
    @classmethod
    def _only_beta(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - {"beta"})
        if unknown:
            raise ValueError(f"unknown method parameter(s) {unknown}; known: beta (gkd)")
        if not 0.0 <= value.get("beta", 0.5) <= 1.0:
            raise ValueError("beta must be between 0 and 1")
        return value

    def resolved(self) -> dict[str, Any]:
        """`auto` for a language model means forward KL at T=1 with no CE term (a search is not yet worth
        its cost: the report says so); `topk` unset means the format's default k; `generate.seed` unset,
        the job's seed."""
        data = self.model_dump(mode="json")
        if data["method"] == "auto":
            data["method"] = "fkl"
        for key, default in (("temperature", 1.0), ("alpha", 1.0)):
            if data[key] == "auto":
                data[key] = default
        if data["topk"] is None:
            data["topk"] = LM_DEFAULT_K[data["soft_label_format"]]
        if data["generate"] is not None and data["generate"]["seed"] is None:
            data["generate"]["seed"] = data["seed"]
        return data

    @model_validator(mode="after")
    def _sampled_needs_forward_kl(self) -> LMConfigSchema:
        if self.soft_label_format == "sampled" and self.method in ("rkl", "gkd"):
            raise ValueError("sampled targets train with fkl only: rkl and gkd need the teacher's log-probs")
        return self

