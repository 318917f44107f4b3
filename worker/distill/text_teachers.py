"""Text-classification teachers (issue 16): a Hugging Face `*ForSequenceClassification` folder (`hf_text`), or
one ONNX classifier with its tokenizer.json (`onnx_text`), uploaded as a zip/tar. Told from the archive's
listing and its config.json, never from the file name.

A text teacher takes token ids, never text: `encode_texts` turns texts into right-padded rows with the
teacher's own fast tokenizer, and `logits` masks the padding (attention_mask = input_ids != pad_id).

No code from the upload runs and nothing reaches a hub. The folder is checked with lm_teachers' rules:
pickle-based weights are `unsafe_weights`, `auto_map` / `trust_remote_code` and code files `custom_code`, a
`model_type` transformers has no sequence classifier for `unsupported_architecture`, and a PEFT
adapter_config.json (its base model lives elsewhere) `external_reference`. The tokenizer is built by
PreTrainedTokenizerFast from a copy of tokenizer.json (+ tokenizer_config.json, special_tokens_map.json
without their `*_file` keys, which could name files outside the upload), never through AutoTokenizer. An ONNX
teacher passes teacher_formats.check_onnx_model (no custom-op domains, external data only beside the model)
and runs with onnxruntime on CPU.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import tarfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor, nn

from worker.distill.archives import _is_tar, safe_extract
from worker.distill.errors import ArchiveError, ConfigError, MismatchError, TeacherError, error_cause
from worker.distill.lm_teachers import (
    CODE_SUFFIXES,
    PICKLE_SUFFIXES,
    _check_weights,
    _fresh_dir,
    _is_macos_litter,
    _offline,
    _read_json,
)
from worker.distill.teacher_formats import ONNX_FLOAT_TYPES, _pick_output, check_onnx_model
from worker.distill.teachers import EnsembleTeacher, Teacher, sha256_file

SEQ_CLS_SUFFIX = "ForSequenceClassification"
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
ONNX_INT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}
# When tokenizer_config.json names no pad token (an ONNX upload often has only tokenizer.json): these
# special tokens mean padding in every tokenizer family we know.
PAD_NAMES = ("[PAD]", "<pad>")
MAX_SNIFFED_CONFIG = 1 << 20
MAX_SNIFFED_MEMBERS = 100_000
UNBOUNDED_LENGTH = 1_000_000  # tokenizers without a declared limit say model_max_length = 1e30
PROBE_TEXT = "hello world"
UNSUPPORTED_PROBLEMS = ("regression", "multi_label_classification")


class TextTeacher(Teacher):
    """A frozen text classifier: `logits(input_ids)` maps (B, L) right-padded ids to (B, C) float32 logits.

    `tokenizer_dir` holds the tokenizer files (tokenizer.json, ...) a student export copies; `max_positions`
    is the longest row the model takes (None: unbounded); `id2label` the class names when the upload gives
    real ones. `hf_config` and `model` are set for `hf_text` only.
    """

    def __init__(
        self,
        fmt: str,
        sha256: str,
        *,
        num_classes: int,
        tokenizer: Any,
        pad_id: int,
        tokenizer_dir: Path,
        max_positions: int | None = None,
        id2label: list[str] | None = None,
        hf_config: Any | None = None,
        model: nn.Module | None = None,
    ) -> None:
        super().__init__(fmt, sha256, num_classes=num_classes)
        self.num_classes: int = num_classes
        self.tokenizer = tokenizer  # transformers.PreTrainedTokenizerFast
        self.pad_id = pad_id
        self.tokenizer_dir = tokenizer_dir
        self.max_positions = max_positions
        self.id2label = id2label
        self.hf_config = hf_config
        self.model = model

    def logits(self, input_ids: Tensor) -> Tensor:
        raise NotImplementedError

    def to(self, device: torch.device | str) -> TextTeacher:
        return self


class HFTextTeacher(TextTeacher):
    """A transformers sequence classifier in eval mode, float32, on CPU until `to()` moves it."""

    model: nn.Module

    def __init__(self, model: nn.Module, sha256: str, **fields: Any) -> None:
        super().__init__("hf_text", sha256, hf_config=getattr(model, "config", None), model=model, **fields)
        self.takes_token_types = "token_type_ids" in inspect.signature(model.forward).parameters

    def logits(self, input_ids: Tensor) -> Tensor:
        device = next(self.model.parameters()).device
        ids = input_ids.to(device, torch.long)
        extra = {"token_type_ids": torch.zeros_like(ids)} if self.takes_token_types else {}
        with torch.no_grad():  # not inference_mode: the targets meet the student's graph in the loss
            out = self.model(input_ids=ids, attention_mask=(ids != self.pad_id).long(), **extra)
        logits: Tensor = out.logits.float()
        return logits.to(input_ids.device)

    def to(self, device: torch.device | str) -> HFTextTeacher:
        self.model.to(torch.device(device))
        return self


class OnnxTextTeacher(TextTeacher):
    """Runs on CPU through onnxruntime whatever `to()` says; logits come back on the input's device."""

    def __init__(self, session: OnnxTextSession, sha256: str, **fields: Any) -> None:
        super().__init__("onnx_text", sha256, **fields)
        self.session = session

    def logits(self, input_ids: Tensor) -> Tensor:
        ids = input_ids.detach().to("cpu", torch.long).numpy()
        out = torch.from_numpy(self.session(ids, self.pad_id)).float()
        if self.session.returns_probabilities:
            out = out.clamp_min(torch.finfo(torch.float32).tiny).log()
        return out.to(input_ids.device)


class TextEnsemble(TextTeacher):
    """Members sharing one tokenizer (byte-identical tokenizer.json, same pad id) and class count; logits are
    the log of the mean of their probabilities (teachers.EnsembleTeacher)."""

    def __init__(self, members: Sequence[TextTeacher]) -> None:
        first = members[0]
        shared = (first.tokenizer_dir / "tokenizer.json").read_bytes()
        for m in members[1:]:
            if m.pad_id != first.pad_id or (m.tokenizer_dir / "tokenizer.json").read_bytes() != shared:
                raise TeacherError(
                    "ensemble members must share one tokenizer (byte-identical tokenizer.json, same pad "
                    f"token); {m.format} member {members.index(m) + 1} has another",
                    code="ensemble_tokenizers_differ",
                    field="teacher",
                )
        if len({m.num_classes for m in members}) > 1:
            shown = ", ".join(f"{m.format}={m.num_classes}" for m in members[:6])
            raise TeacherError(
                f"ensemble members disagree on the class count: {shown}",
                code="ensemble_classes_differ",
                field="teacher",
            )
        labels = [m.id2label for m in members if m.id2label is not None]
        if any(names != labels[0] for names in labels):
            raise TeacherError(
                "ensemble members name their classes differently (config.json id2label); averaging them "
                "would mix up classes",
                code="ensemble_labels_differ",
                field="teacher",
            )
        limits = [m.max_positions for m in members if m.max_positions is not None]
        hf = next((m for m in members if m.model is not None), None)
        super().__init__(
            "ensemble",
            hashlib.sha256("\n".join(sorted(m.sha256 for m in members)).encode()).hexdigest(),
            num_classes=first.num_classes,
            tokenizer=first.tokenizer,
            pad_id=first.pad_id,
            tokenizer_dir=first.tokenizer_dir,
            max_positions=min(limits) if limits else None,
            id2label=labels[0] if labels else None,
            hf_config=hf.hf_config if hf else None,
            model=hf.model if hf else None,
        )
        self.members = list(members)
        self._mean = EnsembleTeacher(self.members)

    def logits(self, input_ids: Tensor) -> Tensor:
        return self._mean.logits(input_ids)

    def to(self, device: torch.device | str) -> TextEnsemble:
        self._mean.to(device)
        return self


class OnnxTextSession:
    """An onnxruntime CPU session taking input_ids (+ attention_mask, token_type_ids when declared)."""

    def __init__(self, path: Path) -> None:
        import onnx
        import onnxruntime as ort

        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - protobuf raises its own DecodeError types
            raise _invalid(f"cannot read ONNX teacher {path.name}: {error_cause(exc)}") from None
        check_onnx_model(model, path)
        graph = model.graph
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise _invalid(f"onnxruntime cannot load {path.name}: {error_cause(exc)}") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        bad = [
            f"{name[:80]}: {i.type}"
            for name, i in inputs.items()
            if name not in TOKEN_INPUTS or i.type not in ONNX_INT_TYPES or len(i.shape or []) != 2
        ]
        if bad or "input_ids" not in inputs:
            raise TeacherError(
                f"an ONNX text teacher takes 2-D integer tensors named {', '.join(TOKEN_INPUTS)} (input_ids "
                f"required); {path.name} takes {', '.join(bad[:6]) or 'no input_ids'}",
                code="unsupported_inputs",
                field="teacher",
            )
        self.dtypes = {name: ONNX_INT_TYPES[i.type] for name, i in inputs.items()}
        batch, length = inputs["input_ids"].shape
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None
        self.fixed_length = length if isinstance(length, int) and length > 0 else None
        outputs = self.session.get_outputs()
        named = [o for o in outputs if o.name == "logits" and o.type in ONNX_FLOAT_TYPES]
        output, self.returns_probabilities = (named[0], False) if named else _pick_output(outputs, graph)
        self.output_name = output.name

    def __call__(self, ids: np.ndarray, pad_id: int) -> np.ndarray:
        """ids (N, L) int, right-padded with `pad_id` -> (N, C) float outputs."""
        n, length = ids.shape
        if self.fixed_length is not None and length != self.fixed_length:
            if length > self.fixed_length:
                raise MismatchError(
                    f"the ONNX teacher takes at most {self.fixed_length} tokens a row, got {length}",
                    field="teacher",
                )
            ids = np.pad(ids, ((0, 0), (0, self.fixed_length - length)), constant_values=pad_id)
        step = self.fixed_batch or max(n, 1)
        chunks = [self._run(ids[i : i + step], pad_id, step) for i in range(0, n, step)]
        return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)

    def _run(self, chunk: np.ndarray, pad_id: int, step: int) -> np.ndarray:
        n = len(chunk)
        if self.fixed_batch is not None and n < step:  # exported with a fixed batch: pad with pad rows, trim
            chunk = np.concatenate([chunk, np.full((step - n, chunk.shape[1]), pad_id, chunk.dtype)])
        values = {
            "input_ids": chunk,
            "attention_mask": chunk != pad_id,
            "token_type_ids": np.zeros_like(chunk),
        }
        feeds = {name: values[name].astype(dtype) for name, dtype in self.dtypes.items()}
        return np.asarray(self.session.run([self.output_name], feeds)[0])[:n]


def is_text_teacher(path: Path) -> bool:
    """Whether `path` is a zip/tar of a sequence-classification folder, or of one .onnx and a tokenizer.json;
    told from the archive's listing and its config.json only."""
    try:
        return _archive_kind(Path(path)) is not None
    except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError, ValueError):
        return False


def load_text_teacher(path: Path, work_tmp: Path, *, device: str | torch.device | None = None) -> TextTeacher:
    """The text teacher in the archive at `path`, extracted into a fresh folder under `work_tmp`; on CPU
    unless `device` says otherwise. Every refusal is a TeacherError with a stable code."""
    path, work_tmp = Path(path), Path(work_tmp)
    if not path.is_file():
        raise TeacherError(
            f"teacher file {path.name} does not exist", code="teacher_not_found", field="teacher"
        )
    dest = _fresh_dir(work_tmp, "text_teacher")
    try:
        written = safe_extract(path, dest)
    except ArchiveError as exc:
        if exc.code == "bad_archive":
            raise _not_text_teacher(path) from None
        raise TeacherError(exc.message, code=exc.code, field="teacher") from None
    root = dest.resolve()
    names = [p.relative_to(root).as_posix() for p in written]
    kind = _kind(names, lambda name: _json_object((root / name).read_bytes()))
    if kind is None:
        raise _not_text_teacher(path)
    sha = sha256_file(path)
    teacher = _load_hf(root, sha, work_tmp) if kind == "hf_text" else _load_onnx(root, names, sha, work_tmp)
    return teacher.to(device) if device is not None else teacher


def load_text_teachers(
    paths: Sequence[Path], work_tmp: Path, *, device: str | torch.device | None = None
) -> TextTeacher:
    """One text teacher, or an ensemble (TextEnsemble) of several sharing a tokenizer."""
    files = [Path(p) for p in paths]
    if not files:
        raise TeacherError("no teacher file given", code="teacher_not_found", field="teacher")
    members = [load_text_teacher(p, work_tmp, device=device) for p in files]
    return members[0] if len(members) == 1 else TextEnsemble(members)


def encode_texts(tokenizer: Any, texts: list[str], max_length: int, pad_id: int) -> tuple[np.ndarray, int]:
    """texts -> (ids (N, L) int64 right-padded with `pad_id`, how many texts were cut at `max_length`).

    Special tokens are added as the tokenizer's post-processor says ([CLS] ... [SEP] for BERT); L is the
    longest encoded row (1 <= L <= max_length), so a batch of short texts stays short.
    """
    reserved = int(tokenizer.num_special_tokens_to_add(pair=False))
    if max_length <= reserved:
        raise ConfigError(
            f"max_length {max_length} leaves no room for text beside the tokenizer's {reserved} "
            "special tokens",
            field="max_length",
        )
    if not texts:
        return np.full((0, 1), pad_id, np.int64), 0
    batch = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_length)
    rows: list[list[int]] = batch["input_ids"]
    truncated = sum(1 for encoding in batch.encodings if encoding.overflowing)
    ids = np.full((len(rows), max(1, *map(len, rows))), pad_id, np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    return ids, truncated


def _load_hf(root: Path, sha: str, work_tmp: Path) -> HFTextTeacher:
    root = _check_classifier_folder(root)
    tokenizer, pad_id, tokenizer_dir = _load_tokenizer(root, work_tmp)
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            root, local_files_only=True, trust_remote_code=False, use_safetensors=True, dtype=torch.float32
        )
    except Exception as exc:  # noqa: BLE001 - transformers raises many error types on a bad folder
        raise _invalid(f"cannot load the teacher folder: {error_cause(exc)}") from None
    model.eval().requires_grad_(False)
    config = model.config
    num_classes = int(config.num_labels)
    _check_problem(num_classes, getattr(config, "problem_type", None))
    # Decoder classifiers (GPT-2, Llama, ...) pool the last token that is not config.pad_token_id.
    config.pad_token_id = pad_id
    return HFTextTeacher(
        model,
        sha,
        num_classes=num_classes,
        tokenizer=tokenizer,
        pad_id=pad_id,
        tokenizer_dir=tokenizer_dir,
        max_positions=_usable_length(getattr(config, "max_position_embeddings", None), tokenizer),
        id2label=_labels(config.id2label, num_classes),
    )


def _load_onnx(root: Path, names: list[str], sha: str, work_tmp: Path) -> OnnxTextTeacher:
    model_path = root / next(n for n in _listed(names) if n.lower().endswith(".onnx"))
    folder = model_path.parent
    if not (folder / "tokenizer.json").is_file():
        raise TeacherError(
            f"tokenizer.json must sit beside {model_path.name} in the archive",
            code="no_tokenizer",
            field="teacher",
        )
    tokenizer, pad_id, tokenizer_dir = _load_tokenizer(folder, work_tmp)
    session = OnnxTextSession(model_path)
    ids, _ = encode_texts(tokenizer, [PROBE_TEXT], session.fixed_length or 16, pad_id)
    try:
        probe = session(ids, pad_id)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise _invalid(f"the ONNX teacher fails on a tokenized sentence: {error_cause(exc)}") from None
    if probe.ndim != 2 or probe.shape[0] != 1:
        raise _invalid(f"the ONNX teacher must output (batch, classes) logits, not shape {list(probe.shape)}")
    num_classes = int(probe.shape[1])
    config = _read_json(folder / "config.json", required=False)  # optional: class names, length limit
    _check_problem(num_classes, config.get("problem_type"))
    declared = session.fixed_length or config.get("max_position_embeddings")
    return OnnxTextTeacher(
        session,
        sha,
        num_classes=num_classes,
        tokenizer=tokenizer,
        pad_id=pad_id,
        tokenizer_dir=tokenizer_dir,
        max_positions=_usable_length(declared if isinstance(declared, int) else None, tokenizer),
        id2label=_labels(config.get("id2label"), num_classes),
    )


def _check_classifier_folder(folder: Path) -> Path:
    """The model's root in an extracted `folder` (where config.json is), after every refusal of lm_teachers'
    check_hf_folder, with transformers' sequence classifiers in place of its causal LMs."""
    files = [p for p in folder.rglob("*") if p.is_file() and not _is_macos_litter(p, folder)]
    for suffixes, code, what in (
        (PICKLE_SUFFIXES, "unsafe_weights", "pickle-based weights; save with safetensors instead"),
        (CODE_SUFFIXES, "custom_code", "code; only built-in transformers architectures are run"),
    ):
        found = sorted(p.relative_to(folder).as_posix() for p in files if p.name.lower().endswith(suffixes))
        if found:
            raise TeacherError(
                f"the teacher folder holds {what}: {', '.join(found[:5])}", code=code, field="teacher"
            )
    if any(p.name == "adapter_config.json" for p in files):
        raise TeacherError(
            "the teacher folder is a PEFT adapter (adapter_config.json), whose base model lives elsewhere; "
            "merge the adapter and save the whole model",
            code="external_reference",
            field="teacher",
        )
    configs = sorted((p for p in files if p.name == "config.json"), key=lambda p: len(p.parts))
    if len(configs) > 1 and len(configs[1].parts) == len(configs[0].parts):
        raise _invalid("the archive holds more than one model folder")
    root = configs[0].parent
    config = _read_json(root / "config.json")
    if "auto_map" in config or "trust_remote_code" in config:
        raise TeacherError(
            "config.json asks for custom code (auto_map / trust_remote_code); only built-in transformers "
            "architectures are run",
            code="custom_code",
            field="teacher",
        )
    _offline()  # before the first import of transformers in this process
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    model_type = str(config.get("model_type", ""))
    if model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise TeacherError(
            f"config.json's model_type {model_type[:80]!r} is not a sequence classifier transformers has "
            "built in",
            code="unsupported_architecture",
            field="teacher",
        )
    if not (root / "tokenizer.json").is_file():
        raise TeacherError(
            "the teacher folder has no tokenizer.json (a fast tokenizer; save_pretrained writes it)",
            code="no_tokenizer",
            field="teacher",
        )
    _check_weights(root)
    return root


def _load_tokenizer(folder: Path, work_tmp: Path) -> tuple[Any, int, Path]:
    """(PreTrainedTokenizerFast, pad id, its own folder) from the tokenizer files in `folder`."""
    tokenizer_dir = _fresh_dir(work_tmp, "text_tokenizer")
    shutil.copyfile(folder / "tokenizer.json", tokenizer_dir / "tokenizer.json")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        data = _read_json(folder / name, required=False)
        if "auto_map" in data or "trust_remote_code" in data:
            raise TeacherError(
                f"{name} asks for custom code (auto_map / trust_remote_code)",
                code="custom_code",
                field="teacher",
            )
        if data:  # `*_file(s)` keys name files by path, and some transformers versions open them verbatim
            kept = {k: v for k, v in data.items() if not k.endswith(("_file", "_files"))}
            _write_json(tokenizer_dir / name, kept)
    _offline()
    from transformers import PreTrainedTokenizerFast

    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(
            tokenizer_dir, local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:  # noqa: BLE001 - tokenizers raises many error types on a bad file
        raise _invalid(f"cannot load the teacher's tokenizer.json: {error_cause(exc)}") from None
    if tokenizer.pad_token_id is None:
        pad = _declared_pad(tokenizer)
        if pad is None:
            raise TeacherError(
                "the teacher's tokenizer has no pad token; set one (tokenizer.pad_token = ...) and save it",
                code="no_pad_token",
                field="teacher",
            )
        tokenizer.pad_token = pad
        config_path = tokenizer_dir / "tokenizer_config.json"  # so an export's copy pads the same way
        _write_json(config_path, _read_json(config_path, required=False) | {"pad_token": pad})
    return tokenizer, int(tokenizer.pad_token_id), tokenizer_dir


def _declared_pad(tokenizer: Any) -> str | None:
    """The pad token tokenizer.json itself declares (its padding settings, or a special [PAD] / <pad>)."""
    backend = tokenizer.backend_tokenizer
    padding = backend.padding
    if padding and padding.get("pad_token"):
        return str(padding["pad_token"])
    specials = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    return next((name for name in PAD_NAMES if name in specials), None)


def _check_problem(num_classes: int, problem_type: Any) -> None:
    if num_classes < 2 or problem_type in UNSUPPORTED_PROBLEMS:
        what = problem_type if problem_type in UNSUPPORTED_PROBLEMS else f"{num_classes} output"
        raise TeacherError(
            f"the teacher is not a single-label classifier ({what}); distillation needs one softmax over "
            "two or more classes",
            code="unsupported_problem_type",
            field="teacher",
        )


def _labels(id2label: Any, num_classes: int) -> list[str] | None:
    """Class names ordered by id, or None when there are none or they are transformers' LABEL_0 defaults."""
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        by_id = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        raise _invalid("config.json's id2label keys must be class ids 0, 1, ...") from None
    if sorted(by_id) != list(range(num_classes)):
        raise TeacherError(
            f"config.json's id2label names {len(by_id)} classes but the teacher outputs {num_classes}",
            code="label_count_mismatch",
            field="teacher",
        )
    labels = [by_id[i] for i in range(num_classes)]
    return None if labels == [f"LABEL_{i}" for i in range(num_classes)] else labels


def _usable_length(declared: int | None, tokenizer: Any) -> int | None:
    """The smaller of the model's position limit and the tokenizer's model_max_length (RoBERTa declares 514
    positions, of which 512 are usable, and says so in model_max_length)."""
    limit = tokenizer.model_max_length
    limits = [v for v in (declared, limit) if isinstance(v, int) and 0 < v < UNBOUNDED_LENGTH]
    return min(limits) if limits else None


def _archive_kind(path: Path) -> str | None:
    if not path.is_file():
        return None
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            infos = {i.filename: i for i in zf.infolist() if not i.is_dir()}
            return _kind(list(infos), lambda name: _small_json(zf.open(infos[name]), infos[name].file_size))
    if not _is_tar(path):
        return None
    with tarfile.open(path, mode="r:*") as tf:
        members: dict[str, tarfile.TarInfo] = {}
        while (member := tf.next()) is not None:
            if len(members) >= MAX_SNIFFED_MEMBERS:
                return None
            if member.isreg():
                members[member.name] = member

        def read(name: str) -> dict[str, Any] | None:
            src = tf.extractfile(members[name])
            return None if src is None else _small_json(src, members[name].size)

        return _kind(list(members), read)


def _kind(names: list[str], read_config: Callable[[str], dict[str, Any] | None]) -> str | None:
    """`hf_text`, `onnx_text` or None for an archive holding the files `names` (posix paths); a folder with
    both a classifier config.json and an .onnx is the ONNX one unless it also has safetensors weights."""
    files = _listed(names)
    configs = sorted((n for n in files if _basename(n) == "config.json"), key=lambda n: n.count("/"))
    architectures = (read_config(configs[0]) or {}).get("architectures") if configs else None
    classifier = isinstance(architectures, list) and any(
        isinstance(a, str) and a.endswith(SEQ_CLS_SUFFIX) for a in architectures
    )
    onnx_files = [n for n in files if n.lower().endswith(".onnx")]
    if classifier and (not onnx_files or any(n.endswith(".safetensors") for n in files)):
        return "hf_text"
    if len(onnx_files) == 1 and any(_basename(n) == "tokenizer.json" for n in files):
        return "onnx_text"
    return None


def _listed(names: list[str]) -> list[str]:
    """Archive member names as posix paths, without macOS litter (__MACOSX/, ._*, .DS_Store)."""
    paths = [PurePosixPath(n.replace("\\", "/")) for n in names]
    return [p.as_posix() for p in paths if p.parts and not _is_macos_litter(Path(p), Path("."))]


def _basename(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def _small_json(src: IO[bytes], size: int) -> dict[str, Any] | None:
    with src:
        return _json_object(src.read(MAX_SNIFFED_CONFIG + 1)) if size <= MAX_SNIFFED_CONFIG else None


def _json_object(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


def _not_text_teacher(path: Path) -> TeacherError:
    return _invalid(
        f"{path.name} is not a text classifier: upload a zip/tar of a Hugging Face *{SEQ_CLS_SUFFIX} folder "
        "(config.json, safetensors, tokenizer.json) or of one .onnx file with its tokenizer.json"
    )


def _invalid(message: str) -> TeacherError:
    return TeacherError(message, code="invalid_teacher", field="teacher")
