"""Language-model students by name, always in the teacher's own config family and with its tokenizer.

    causal_lm:layers=4;hidden=256;heads=4   a fresh model: the teacher's config with these sizes
    teacher_layers:keep=0,8,16,24           the teacher's width, initialised from the chosen teacher layers
                                            plus its embeddings, final norm and head (DistilBERT, Minitron)

`build_lm_student(spec, teacher)` returns the model (float32, on CPU) and the resolved config for the report;
`load_lm_student_init(folder, teacher)` loads a user's Hugging Face folder instead (safetensors only). A
student is built with `AutoModelForCausalLM.from_config(type(teacher.config)(...))`: no remote code ever runs,
and the vocabulary, special token ids and context length stay the teacher's, so the teacher's tokenizer and
soft labels fit the student as they are.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import nn

from worker.distill.config import parse_model_spec
from worker.distill.errors import ConfigError
from worker.distill.registry import Registry

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Builder = Callable[..., "PreTrainedModel"]
LM_STUDENTS: Registry[Builder] = Registry("student")

# Keys of the teacher's config a student must not inherit: where it came from, custom code, quantisation
# (a GGUF teacher is dequantised), its dtype (students train in float32) and per-layer lists sized for the
# teacher's depth (rebuilt below where the family has them).
_DROPPED = (
    "_name_or_path",
    "auto_map",
    "quantization_config",
    "dtype",
    "torch_dtype",
    "transformers_version",
)
_PER_LAYER = ("layer_types",)
_PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack")


class TeacherLike(Protocol):
    """What a student needs of `lm_teachers.LMTeacher`: its Hugging Face model and config."""

    model: nn.Module
    config: Any


def build_lm_student(spec: str, teacher: TeacherLike) -> tuple[PreTrainedModel, dict[str, Any]]:
    """A student from a spec like `"causal_lm:layers=4;hidden=256"`; unknown names/parameters -> ConfigError.

    Returns (model, resolved): resolved holds the student's sizes, parameter count and full config (JSON).
    """
    name, params = parse_model_spec(spec)
    builder = LM_STUDENTS.get(name)
    accepted = [p for p in inspect.signature(builder).parameters if p != "teacher"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"{name}: unknown parameter(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}",
            field="student",
        )
    model = builder(teacher, **params)
    return model, {"student": name, **resolved_config(model)}


@LM_STUDENTS.register("causal_lm")
def causal_lm(
    teacher: TeacherLike,
    layers: int | None = None,
    hidden: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    intermediate: int | None = None,
) -> PreTrainedModel:
    """A fresh model of the teacher's family. Unset sizes follow the teacher: half its layers; the teacher's
    head size (so `heads` alone sets the width and `hidden` alone the head count); half its width; key/value
    heads equal to heads; an MLP 3x the width."""
    t = _sizes(teacher.config)
    head_dim = t["head_dim"]
    layers = _positive("layers", layers if layers is not None else max(1, t["layers"] // 2))
    if hidden is None:
        hidden = (
            heads * head_dim if heads is not None else max(head_dim, t["hidden"] // 2 // head_dim * head_dim)
        )
    hidden = _positive("hidden", hidden)
    if heads is None:
        heads = hidden // head_dim if hidden % head_dim == 0 else _largest_divisor(hidden, t["heads"])
    heads = _positive("heads", heads)
    if hidden % heads:
        raise ConfigError(
            f"causal_lm: hidden {hidden} is not a multiple of heads {heads}: each head needs hidden / heads "
            "dimensions (e.g. hidden=256;heads=4)",
            field="student",
        )
    kv_heads = _positive("kv_heads", kv_heads if kv_heads is not None else heads)
    if heads % kv_heads:
        raise ConfigError(f"causal_lm: kv_heads {kv_heads} must divide heads {heads}", field="student")
    if (hidden // heads) % 2 and _has_rotary(teacher.config):
        raise ConfigError(
            f"causal_lm: head size hidden / heads = {hidden // heads} must be even (rotary embeddings)",
            field="student",
        )
    intermediate = _positive("intermediate", intermediate if intermediate is not None else 3 * hidden)
    sizes = {
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate,
        "head_dim": hidden // heads,
    }
    return _from_config(_student_config(teacher.config, sizes, per_layer=list(range(layers))))


@LM_STUDENTS.register("teacher_layers")
def teacher_layers(teacher: TeacherLike, keep: int | list[int] | None = None) -> PreTrainedModel:
    """The teacher's width with only the layers in `keep` (ascending teacher indices), copied with the
    embeddings, final norm and head: every other weight is the teacher's, renumbered."""
    t = _sizes(teacher.config)
    if keep is None:
        raise ConfigError("teacher_layers: set keep, e.g. teacher_layers:keep=0,8,16,24", field="student")
    kept = keep if isinstance(keep, list) else [keep]
    if any(not isinstance(i, int) or not 0 <= i < t["layers"] for i in kept):
        raise ConfigError(
            f"teacher_layers: keep must list teacher layers in 0..{t['layers'] - 1}, got {kept}",
            field="student",
        )
    if kept != sorted(set(kept)):
        raise ConfigError(f"teacher_layers: keep must be ascending and distinct, got {kept}", field="student")
    student = _from_config(_student_config(teacher.config, {"num_hidden_layers": len(kept)}, per_layer=kept))
    teacher_state = teacher.model.state_dict()
    prefix = _layers_prefix(teacher.model, t["layers"])
    renumber = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    state = {}
    for key in student.state_dict():
        match = renumber.match(key)
        source = f"{prefix}.{kept[int(match.group(1))]}.{key[match.end() :]}" if match else key
        # A copy in float32: a bf16 or dequantised teacher must not share (or narrow) the student's storage.
        state[key] = teacher_state[source].detach().to("cpu", torch.float32, copy=True)
    student.load_state_dict(state, strict=True)
    return student


def load_lm_student_init(folder: Path, teacher: TeacherLike) -> tuple[PreTrainedModel, dict[str, Any]]:
    """A user's Hugging Face folder (config.json + *.safetensors) as the student, offline, no remote code.

    Its vocabulary must be the teacher's: the student reads the teacher's tokens and learns its soft labels.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise _init_error(f"student init {folder.name} has no config.json")
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLED_SUFFIXES)
    if pickled:
        raise _init_error(f"student init holds pickle-based weights ({', '.join(pickled)}); use safetensors")
    if not any(folder.glob("*.safetensors")):
        raise _init_error("student init has no *.safetensors weights")
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise _init_error(f"student init config.json is not JSON: {exc}") from None
    if not isinstance(raw, dict) or "auto_map" in raw:
        raise _init_error(
            "student init config.json asks for custom code (auto_map); only built-in families load"
        )
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, use_safetensors=True, trust_remote_code=False, dtype=torch.float32
        )
    except Exception as exc:  # noqa: BLE001 - any failure here is the folder's fault
        raise _init_error(f"cannot load student init: {type(exc).__name__}: {str(exc)[:300]}") from None
    vocab = _sizes(teacher.config)["vocab_size"]
    if model.config.vocab_size != vocab:
        raise _init_error(
            f"student init has a vocabulary of {model.config.vocab_size} ids; the teacher's has {vocab}"
        )
    return model, {"student": "student_init", **resolved_config(model)}


def resolved_config(model: PreTrainedModel) -> dict[str, Any]:
    """The report's view of a student: family, sizes, parameter count and its full config (JSON-able)."""
    s = _sizes(model.config)
    return {
        "family": model.config.model_type,
        "layers": s["layers"],
        "hidden": s["hidden"],
        "heads": s["heads"],
        "kv_heads": s["kv_heads"],
        "head_dim": s["head_dim"],
        "intermediate": s["intermediate"],
        "vocab_size": s["vocab_size"],
        "max_position_embeddings": s["max_position_embeddings"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": model.config.to_dict(),
    }


def _sizes(config: Any) -> dict[str, int]:
    """The sizes of a config under their canonical names (attribute_map reads GPT-2's n_layer etc.)."""

    def get(name: str, default: Any = None) -> Any:
        value = getattr(config, name, None)
        return default if value is None else value

    hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
    return {
        "layers": int(get("num_hidden_layers")),
        "hidden": hidden,
        "heads": heads,
        "kv_heads": int(get("num_key_value_heads", heads)),
        "head_dim": int(get("head_dim", hidden // heads)),
        "intermediate": int(get("intermediate_size", get("n_inner", 4 * hidden))),
        "vocab_size": int(get("vocab_size")),
        "max_position_embeddings": int(get("max_position_embeddings", 0)),
    }


def _student_config(teacher_config: Any, sizes: dict[str, int], per_layer: list[int]) -> Any:
    """The teacher's config with `sizes` (canonical names) set, written under the family's own key names;
    sizes the family has no field for (head_dim in GPT-2) are left out."""
    cls = type(teacher_config)
    data = {k: v for k, v in teacher_config.to_dict().items() if k not in _DROPPED}
    aliases = getattr(cls, "attribute_map", {}) or {}
    for name, value in sizes.items():
        key = aliases.get(name, name)
        if key in data:
            data[key] = value
        elif name == "intermediate_size" and "n_inner" in data:
            data["n_inner"] = value
    for key in _PER_LAYER:
        if isinstance(data.get(key), list):
            data[key] = [data[key][i] for i in per_layer]
    return cls.from_dict(data)


def _from_config(config: Any) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            config, trust_remote_code=False, dtype=torch.float32
        )
    except ValueError as exc:
        raise ConfigError(f"cannot build a {config.model_type} student: {exc}", field="student") from None
    return cast("PreTrainedModel", model.to("cpu", torch.float32))


def _layers_prefix(model: nn.Module, num_layers: int) -> str:
    """The state-dict prefix of the decoder layers ("model.layers" in Llama, "transformer.h" in GPT-2)."""
    found = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    if len(found) != 1:
        raise ConfigError(
            f"cannot find the teacher's list of {num_layers} decoder layers for teacher_layers",
            field="student",
        )
    return str(found[0])


def _positive(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"causal_lm: {name} must be a positive integer, got {value!r}", field="student")
    return value


def _has_rotary(config: Any) -> bool:
    return any(
        getattr(config, k, None) is not None for k in ("rope_parameters", "rope_theta", "rope_scaling")
    )


def _largest_divisor(n: int, at_most: int) -> int:
    return next(d for d in range(min(n, max(1, at_most)), 0, -1) if n % d == 0)


def _init_error(message: str) -> ConfigError:
    return ConfigError(message, code="invalid_student_init", field="student_init")
