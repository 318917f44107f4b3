"""Text-classifier students by name: each reads right-padded token ids and returns class logits.

    text_transformer:layers=2;hidden=256;heads=4   a fresh encoder of the teacher's family (BERT for ONNX)
    teacher_layers:keep=0,2,4                      the teacher's width, initialised from the chosen teacher
                                                   layers plus its embeddings, pooler and head (DistilBERT)
    textcnn:embed=128;channels=100;kernels=3,4,5   Kim (2014): convolutions over embeddings, max over time
    bow:embed=64                                   fastText: the mean of the token embeddings, a linear head

Every student takes one int64 tensor (B, L) of token ids, right-padded with the teacher's `pad_id`, and
returns float32 logits (B, num_classes), so the classification training loop calls `student(x)` as it does
for images. The mask is always `ids != pad_id`, never the length of the batch: appending more padding to a
row leaves its logits unchanged. `classify(ids, mask)` takes an explicit mask instead (what ONNX exports).
The two Hugging Face kinds keep their model as `.hf`, a `*ForSequenceClassification` that
`from_pretrained` can load again; no remote code ever runs.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.distill.config import parse_model_spec
from worker.distill.errors import ConfigError
from worker.distill.registry import Registry

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Builder = Callable[..., tuple["TextClassifier", dict[str, Any]]]
TEXT_STUDENTS: Registry[Builder] = Registry("student")

# Positions past 512 cost memory quadratically and classification rarely needs them.
MAX_POSITIONS = 512
# Keys of the teacher's config a student must not inherit: where it came from, custom code, its dtype.
_DROPPED = (
    "_name_or_path",
    "auto_map",
    "quantization_config",
    "dtype",
    "torch_dtype",
    "transformers_version",
)
# The MLP width under each family's name (DistilBERT: hidden_dim).
_INTERMEDIATE_KEYS = ("intermediate_size", "hidden_dim")


class TextTeacherLike(Protocol):
    """What a student needs of a text teacher: padding, tokenizer and, for a Hugging Face teacher, model."""

    pad_id: int
    max_positions: int | None
    hf_config: Any | None  # the PretrainedConfig of a *ForSequenceClassification teacher; None for ONNX
    model: nn.Module | None
    tokenizer: Any  # a PreTrainedTokenizerFast; len(tokenizer) is the vocabulary size


class TextClassifier(nn.Module):
    """ids (B, L) int64 -> logits (B, C) float32, the mask taken from `pad_id`."""

    def __init__(self, pad_id: int) -> None:
        super().__init__()
        self.pad_id = pad_id

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.classify(input_ids, (input_ids != self.pad_id).long())

    def classify(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """mask (B, L) int64, 1 for a token, 0 for padding."""
        raise NotImplementedError


class HFTextClassifier(TextClassifier):
    def __init__(self, hf: PreTrainedModel, pad_id: int) -> None:
        super().__init__(pad_id)
        self.hf = hf

    def classify(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        logits: Tensor = self.hf(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits


class TextCNN(TextClassifier):
    """Each kernel size k reads the windows that start at a token: the row is extended by k - 1 zero
    embeddings, so a window never sees more of the batch's padding than of its own."""

    def __init__(
        self, vocab: int, pad_id: int, num_classes: int, embed: int, channels: int, kernels: list[int],
        dropout: float,
    ) -> None:  # fmt: skip
        super().__init__(pad_id)
        self.embedding = nn.Embedding(vocab, embed, padding_idx=pad_id)
        self.kernels = list(kernels)
        self.convs = nn.ModuleList(nn.Conv1d(embed, channels, k) for k in kernels)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels * len(kernels), num_classes)

    def classify(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        mask = attention_mask.to(torch.float32)
        x = (self.embedding(input_ids) * mask.unsqueeze(-1)).transpose(1, 2)  # (B, E, L)
        pooled = []
        for k, conv in zip(self.kernels, self.convs, strict=True):
            features = F.relu(conv(F.pad(x, (0, k - 1))))  # (B, channels, L)
            # ReLU outputs are >= 0: zeroing padded starts leaves the max over a row's own windows as it is
            pooled.append((features * mask.unsqueeze(1)).amax(dim=2))
        logits: Tensor = self.head(self.dropout(torch.cat(pooled, dim=1)))
        return logits


class BagOfEmbeddings(TextClassifier):
    def __init__(self, vocab: int, pad_id: int, num_classes: int, embed: int, hidden: int | None) -> None:
        super().__init__(pad_id)
        self.embedding = nn.Embedding(vocab, embed, padding_idx=pad_id)
        layers: list[nn.Module] = [nn.Linear(embed, hidden), nn.ReLU()] if hidden else []
        self.head = nn.Sequential(*layers, nn.Linear(hidden or embed, num_classes))

    def classify(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        mask = attention_mask.to(torch.float32).unsqueeze(-1)
        total = (self.embedding(input_ids) * mask).sum(dim=1)
        logits: Tensor = self.head(total / mask.sum(dim=1).clamp(min=1.0))
        return logits


def is_text_student(spec: str) -> bool:
    """Whether the spec's name (before the colon) is a text student; its parameters are not checked."""
    return spec.strip().partition(":")[0].strip() in TEXT_STUDENTS


def build_text_student(
    spec: str, teacher: TextTeacherLike, num_classes: int
) -> tuple[TextClassifier, dict[str, Any]]:
    """A fresh student (float32, CPU) from a spec like `"textcnn:embed=128"`; seed the RNG before calling.

    Returns (module, resolved): resolved is JSON-able, for the report. Bad names or parameters -> ConfigError.
    """
    name, params = parse_model_spec(spec)
    builder = TEXT_STUDENTS.get(name)
    accepted = [p for p in inspect.signature(builder).parameters if p not in ("teacher", "num_classes")]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"{name}: unknown parameter(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}",
            field="student",
        )
    if num_classes < 1:
        raise ConfigError(f"{name}: num_classes must be >= 1, got {num_classes}", field="student")
    vocab = len(teacher.tokenizer)
    if not 0 <= teacher.pad_id < vocab:
        raise ConfigError(
            f"{name}: pad id {teacher.pad_id} is outside the vocabulary of {vocab}", field="student"
        )
    module, sizes = builder(teacher, int(num_classes), **params)
    module = module.to("cpu", torch.float32)
    return module, {
        "student": name,
        **sizes,
        "num_classes": int(num_classes),
        "vocab_size": vocab,
        "pad_id": teacher.pad_id,
        "parameters": sum(p.numel() for p in module.parameters()),
    }


@TEXT_STUDENTS.register("text_transformer")
def text_transformer(
    teacher: TextTeacherLike,
    num_classes: int,
    layers: Any = None,
    hidden: Any = None,
    heads: Any = None,
    intermediate: Any = None,
    max_positions: Any = None,
) -> tuple[TextClassifier, dict[str, Any]]:
    """A fresh encoder of the teacher's family, or BERT for an ONNX teacher. Unset sizes follow the teacher:
    half its layers, its head size, half its width; BERT-mini sizes (4 x 256, 4 heads) for an ONNX teacher.
    The MLP is 4x the width, as in BERT."""
    name = "text_transformer"
    config = teacher.hf_config
    if config is not None:
        t = _sizes(config)
        head_dim = t["hidden"] // t["heads"]
        default_layers = max(1, t["layers"] // 2)
        default_hidden = max(head_dim, t["hidden"] // 2 // head_dim * head_dim)
    else:
        head_dim, default_layers, default_hidden = 64, 4, 256  # BERT-mini
    layers = _positive(name, "layers", layers if layers is not None else default_layers)
    if hidden is None:
        hidden = (
            heads * head_dim if isinstance(heads, int) and not isinstance(heads, bool) else default_hidden
        )
    hidden = _positive(name, "hidden", hidden)
    if heads is None:  # the teacher's head size where it divides the width, else the nearest wider heads
        heads = next(d for d in range(max(1, hidden // head_dim), 0, -1) if hidden % d == 0)
    heads = _positive(name, "heads", heads)
    if hidden % heads:
        raise ConfigError(
            f"{name}: hidden {hidden} is not a multiple of heads {heads}: each head needs hidden / heads "
            "dimensions (e.g. hidden=256;heads=4)",
            field="student",
        )
    intermediate = _positive(name, "intermediate", intermediate if intermediate is not None else 4 * hidden)
    limit, offset = _position_limit(teacher)
    positions = _positive(name, "max_positions", max_positions if max_positions is not None else limit)
    sizes = {"num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
             "intermediate_size": intermediate, "max_position_embeddings": positions + offset}  # fmt: skip
    if config is not None:
        student_config = _student_config(config, sizes, num_classes)
    else:
        from transformers import BertConfig

        student_config = BertConfig(vocab_size=len(teacher.tokenizer), pad_token_id=teacher.pad_id, **sizes)
        student_config.num_labels = num_classes
    hf = _from_config(student_config)
    return HFTextClassifier(hf, teacher.pad_id), _hf_sizes(hf, positions)


@TEXT_STUDENTS.register("teacher_layers")
def teacher_layers(
    teacher: TextTeacherLike, num_classes: int, keep: Any = None
) -> tuple[TextClassifier, dict[str, Any]]:
    """The teacher's width with only the layers in `keep` (ascending teacher indices), copied with the
    embeddings, and the pooler and classifier where their shapes fit (same class count)."""
    name = "teacher_layers"
    if teacher.model is None or teacher.hf_config is None:
        raise ConfigError(
            "teacher_layers needs a Hugging Face teacher (its layers are copied); "
            "use text_transformer, textcnn or bow with an ONNX teacher",
            field="student",
        )
    depth = _sizes(teacher.hf_config)["layers"]
    if keep is None:
        raise ConfigError(f"{name}: set keep, e.g. teacher_layers:keep=0,2,4", field="student")
    kept = keep if isinstance(keep, list) else [keep]
    if any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < depth for i in kept):
        raise ConfigError(
            f"{name}: keep must list teacher layers in 0..{depth - 1}, got {kept}", field="student"
        )
    if kept != sorted(set(kept)):
        raise ConfigError(f"{name}: keep must be ascending and distinct, got {kept}", field="student")
    hf = _from_config(_student_config(teacher.hf_config, {"num_hidden_layers": len(kept)}, num_classes))
    teacher_state = teacher.model.state_dict()
    prefix = _layers_prefix(teacher.model, depth)
    renumber = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    state = hf.state_dict()
    for key, value in state.items():
        match = renumber.match(key)
        source = teacher_state.get(
            f"{prefix}.{kept[int(match.group(1))]}.{key[match.end() :]}" if match else key
        )
        if source is not None and source.shape == value.shape:
            # A copy in float32: a half-precision teacher must not share (or narrow) the student's storage
            state[key] = source.detach().to("cpu", torch.float32, copy=True)
        elif match or "embeddings." in key:
            raise ConfigError(
                f"{name}: the teacher has no weight matching the student's {key}", field="student"
            )
    hf.load_state_dict(state, strict=True)
    positions = _sizes(teacher.hf_config)["max_position_embeddings"] - _position_limit(teacher)[1]
    return HFTextClassifier(hf, teacher.pad_id), {**_hf_sizes(hf, positions), "keep": kept}


@TEXT_STUDENTS.register("textcnn")
def textcnn(
    teacher: TextTeacherLike,
    num_classes: int,
    embed: Any = 128,
    channels: Any = 100,
    kernels: Any = (3, 4, 5),
    dropout: Any = 0.1,
) -> tuple[TextClassifier, dict[str, Any]]:
    name = "textcnn"
    e, c = _positive(name, "embed", embed), _positive(name, "channels", channels)
    ks = [
        _positive(name, "kernels", k) for k in (kernels if isinstance(kernels, (list, tuple)) else [kernels])
    ]
    p = _dropout(name, dropout)
    model = TextCNN(len(teacher.tokenizer), teacher.pad_id, num_classes, e, c, ks, p)
    return model, {"embed": e, "channels": c, "kernels": ks, "dropout": p}


@TEXT_STUDENTS.register("bow")
def bow(
    teacher: TextTeacherLike, num_classes: int, embed: Any = 64, hidden: Any = None
) -> tuple[TextClassifier, dict[str, Any]]:
    """fastText (Joulin et al. 2017) is linear; `hidden` adds one ReLU layer before the head."""
    e = _positive("bow", "embed", embed)
    h = None if hidden is None else _positive("bow", "hidden", hidden)
    return BagOfEmbeddings(len(teacher.tokenizer), teacher.pad_id, num_classes, e, h), {
        "embed": e,
        "hidden": h,
    }


def _sizes(config: Any) -> dict[str, int]:
    """A BERT-family config's sizes under canonical names (attribute_map reads DistilBERT's dim etc.)."""
    hidden = int(config.hidden_size)
    intermediate = next((getattr(config, k) for k in _INTERMEDIATE_KEYS if hasattr(config, k)), 4 * hidden)
    return {
        "layers": int(config.num_hidden_layers),
        "hidden": hidden,
        "heads": int(config.num_attention_heads),
        "intermediate": int(intermediate),
        "max_position_embeddings": int(getattr(config, "max_position_embeddings", 0) or 0),
    }


def _position_limit(teacher: TextTeacherLike) -> tuple[int, int]:
    """(the student's default sequence length, the positions its family reserves beyond it).

    RoBERTa's config counts two positions no token uses; the teacher's max_positions says how many do.
    """
    configured = _sizes(teacher.hf_config)["max_position_embeddings"] if teacher.hf_config is not None else 0
    usable = teacher.max_positions or configured or MAX_POSITIONS
    offset = max(0, configured - usable) if configured else 0
    return min(usable, MAX_POSITIONS), offset


def _student_config(teacher_config: Any, sizes: dict[str, int], num_classes: int) -> Any:
    """The teacher's config with `sizes` (canonical names) written under the family's own keys; its label
    names are kept when the class count is the teacher's."""
    cls = type(teacher_config)
    data = {k: v for k, v in teacher_config.to_dict().items() if k not in _DROPPED}
    aliases = getattr(cls, "attribute_map", {}) or {}
    if "hidden_size" in sizes and data.get("pooler_hidden_size") == teacher_config.hidden_size:
        data["pooler_hidden_size"] = sizes["hidden_size"]  # DeBERTa's pooler reads the hidden states
    for name, value in sizes.items():
        if name == "intermediate_size":
            key = next((k for k in _INTERMEDIATE_KEYS if k in data), name)
        else:
            key = aliases.get(name, name)
        data[key] = value
    if len(data.get("id2label") or {}) != num_classes:
        data.pop("id2label", None)
        data.pop("label2id", None)
        data["num_labels"] = num_classes
    return cls.from_dict(data)


def _from_config(config: Any) -> PreTrainedModel:
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_config(  # type: ignore[no-untyped-call]
            config, trust_remote_code=False, dtype=torch.float32
        )
    except ValueError as exc:
        raise ConfigError(
            f"cannot build a {config.model_type} text classifier: {exc}", field="student"
        ) from None
    return cast("PreTrainedModel", model.to("cpu", torch.float32))


def _hf_sizes(hf: PreTrainedModel, max_positions: int) -> dict[str, Any]:
    s = _sizes(hf.config)
    return {
        "family": hf.config.model_type,
        "layers": s["layers"],
        "hidden": s["hidden"],
        "heads": s["heads"],
        "intermediate": s["intermediate"],
        "max_positions": max_positions,
        "config": hf.config.to_dict(),
    }


def _layers_prefix(model: nn.Module, num_layers: int) -> str:
    """The state-dict prefix of the encoder layers ("bert.encoder.layer", "distilbert.transformer.layer")."""
    found = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    if len(found) != 1:
        raise ConfigError(
            f"cannot find the teacher's list of {num_layers} encoder layers for teacher_layers",
            field="student",
        )
    return str(found[0])


def _positive(student: str, key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{student}: {key} must be a positive integer, got {value!r}", field="student")
    return value


def _dropout(student: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{student}: dropout must be in [0, 1), got {value!r}", field="student")
    return float(value)
