"""Causal-LM teachers: a Hugging Face model folder (uploaded as .tar/.tar.gz/.zip) or a single GGUF file.

No code from the upload ever runs and nothing reaches a hub. Before transformers sees a byte, the folder is
checked: pickle-based weights (`*.bin`, `*.pt`, ...) are refused (`unsafe_weights`: only safetensors and
GGUF carry weights in), so are `auto_map` / `trust_remote_code` in a config and any `*.py` file
(`custom_code`), and a `model_type` outside transformers' built-in causal-LM mapping
(`unsupported_architecture`); a folder without config.json, tokenizer.json or its safetensors (every shard an
index names) is `invalid_teacher`. Loading then runs with `local_files_only=True`, `trust_remote_code=False`
and `use_safetensors=True`, and `HF_HUB_OFFLINE` set before transformers is imported.

`import transformers` happens inside the functions that load: the rest of the core never pays for it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from worker.distill.archives import safe_extract
from worker.distill.errors import ArchiveError, TeacherError, error_cause

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")
CODE_SUFFIXES = (".py", ".pyc", ".so")
GGUF_MAGIC = b"GGUF"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# llama.cpp spells a few architectures differently from transformers' model_type.
_GGUF_ARCH_NAMES = {
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
}


@dataclass(eq=False)
class LMTeacher:
    """A loaded causal LM in eval mode: fp32 on CPU, bf16 on CUDA. `source`: "hf_folder" or "gguf"."""

    model: Any  # transformers.PreTrainedModel (not imported here: see the module docstring)
    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    source: str

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def vocab_size(self) -> int:
        """The logits' last dimension (may exceed len(tokenizer): embeddings are often padded)."""
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def device(self) -> torch.device:
        device: torch.device = next(self.model.parameters()).device
        return device

    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids (B, L) int, attention_mask (B, L) bool/int, right-padded -> logits (B, L, V) on the
        model's device in its dtype (callers take the softmax in fp32)."""
        with torch.inference_mode():
            out = self.model(
                input_ids=input_ids.to(self.device, torch.long),
                attention_mask=attention_mask.to(self.device, torch.long),
                use_cache=False,
            )
        logits: Tensor = out.logits
        return logits

    def describe(self) -> dict[str, Any]:
        config = self.config
        architectures = getattr(config, "architectures", None) or [config.model_type]
        return {
            "source": self.source,
            "architecture": architectures[0],
            "model_type": config.model_type,
            "layers": getattr(config, "num_hidden_layers", None),
            "hidden": getattr(config, "hidden_size", None),
            "heads": getattr(config, "num_attention_heads", None),
            "vocab_size": self.vocab_size,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
        }


def load_lm_teacher(path: Path, work_tmp: Path, *, device: str | torch.device | None = None) -> LMTeacher:
    """The teacher in `path`: a zip/tar of a Hugging Face folder, or a GGUF file (told by its bytes).

    Archives are extracted (archives.safe_extract) into a fresh folder under `work_tmp`; a GGUF is linked
    into one, so nothing beside the upload is read. Every refusal is a TeacherError with a stable code.
    """
    path, work_tmp = Path(path), Path(work_tmp)
    if not path.is_file():
        raise TeacherError(
            f"teacher file {path.name} does not exist", code="teacher_not_found", field="teacher"
        )
    with open(path, "rb") as f:
        head = f.read(4)
    if head == GGUF_MAGIC:
        return _load_gguf(path, work_tmp, device)
    if head[:1] == b"\x80":  # pickle protocol >= 2: torch.save's legacy format, or any pickle
        raise TeacherError(
            f"{path.name} is a pickle; only safetensors (in a model folder) and GGUF are accepted",
            code="unsafe_weights",
            field="teacher",
        )
    dest = _fresh_dir(work_tmp, "lm_teacher")
    try:
        safe_extract(path, dest)
    except ArchiveError as exc:
        if exc.code == "bad_archive":
            raise TeacherError(
                f"{path.name} is neither a GGUF file nor a zip/tar of a Hugging Face model folder",
                code="invalid_teacher",
                field="teacher",
            ) from None
        raise TeacherError(exc.message, code=exc.code, field="teacher") from None
    root = check_hf_folder(dest)
    return _load_folder(root, device)


def check_hf_folder(folder: Path) -> Path:
    """The model's root inside an extracted `folder` (where config.json is), after every refusal above."""
    files = [p for p in Path(folder).rglob("*") if p.is_file() and not _is_macos_litter(p, folder)]
    for suffixes, code, what in (
        (PICKLE_SUFFIXES, "unsafe_weights", "pickle-based weights; save with safetensors instead"),
        (CODE_SUFFIXES, "custom_code", "code; only built-in transformers architectures are run"),
    ):
        found = sorted(p.relative_to(folder).as_posix() for p in files if p.name.lower().endswith(suffixes))
        if found:
            raise TeacherError(
                f"the teacher folder holds {what}: {', '.join(found[:5])}", code=code, field="teacher"
            )
    configs = sorted((p for p in files if p.name == "config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise TeacherError("the teacher folder has no config.json", code="invalid_teacher", field="teacher")
    if len(configs) > 1 and len(configs[1].parts) == len(configs[0].parts):
        raise TeacherError(
            "the archive holds more than one model folder", code="invalid_teacher", field="teacher"
        )
    root = configs[0].parent
    config = _read_json(root / "config.json")
    for name in ("config.json", "tokenizer_config.json"):
        data = config if name == "config.json" else _read_json(root / name, required=False)
        if "auto_map" in data or "trust_remote_code" in data:
            raise TeacherError(
                f"{name} asks for custom code (auto_map / trust_remote_code); only built-in transformers "
                "architectures are run",
                code="custom_code",
                field="teacher",
            )
    _check_architecture(str(config.get("model_type", "")), "config.json's model_type")
    if not (root / "tokenizer.json").is_file():
        raise TeacherError(
            "the teacher folder has no tokenizer.json (a fast tokenizer; save_pretrained writes it)",
            code="invalid_teacher",
            field="teacher",
        )
    _check_weights(root)
    return root


def _check_weights(root: Path) -> None:
    index = root / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        names = set(weight_map.values()) if isinstance(weight_map, dict) else set()
        bad = sorted(n for n in names if not isinstance(n, str) or "/" in n or "\\" in n or n.startswith("."))
        missing = sorted(n for n in names - set(bad) if not (root / n).is_file())
        if not names or bad or missing:
            named = ", ".join((bad + missing)[:5])
            raise TeacherError(
                f"{SAFETENSORS_INDEX} names shards that are not in the folder: {named}"
                if names
                else f"{SAFETENSORS_INDEX} has no weight_map",
                code="invalid_teacher",
                field="teacher",
            )
    elif not any(root.glob("*.safetensors")):
        raise TeacherError(
            "the teacher folder has no *.safetensors weights", code="invalid_teacher", field="teacher"
        )


def _check_architecture(model_type: str, where: str) -> str:
    _offline()  # before the first import of transformers in this process
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not model_type:
        raise TeacherError(f"{where} is missing", code="invalid_teacher", field="teacher")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise TeacherError(
            f"{where} {model_type[:80]!r} is not a causal language model transformers has built in",
            code="unsupported_architecture",
            field="teacher",
        )
    return model_type


def _load_folder(root: Path, device: str | torch.device | None) -> LMTeacher:
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    device, dtype = _placement(device)
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(
            root, local_files_only=True, trust_remote_code=False
        )
        model = AutoModelForCausalLM.from_pretrained(
            root, local_files_only=True, trust_remote_code=False, use_safetensors=True, dtype=dtype
        )
    except Exception as exc:  # noqa: BLE001 - transformers raises many error types on a bad folder
        raise TeacherError(
            f"cannot load the teacher folder: {error_cause(exc)}", code="invalid_teacher", field="teacher"
        ) from None
    return _ready(model, tokenizer, "hf_folder", device)


def _load_gguf(path: Path, work_tmp: Path, device: str | torch.device | None) -> LMTeacher:
    _check_architecture(_gguf_model_type(path), "the GGUF's general.architecture")
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    # transformers takes a folder and a file name: a folder of its own, so it reads nothing beside the GGUF.
    folder = _fresh_dir(work_tmp, "lm_teacher_gguf")
    (folder / "model.gguf").symlink_to(path.resolve())
    device, dtype = _placement(device)
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False, gguf_file="model.gguf"
        )
        model = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False, gguf_file="model.gguf", dtype=dtype
        )
    except Exception as exc:  # noqa: BLE001 - transformers and gguf raise many error types on a bad file
        raise TeacherError(
            f"cannot load GGUF teacher {path.name}: {error_cause(exc)}",
            code="invalid_teacher",
            field="teacher",
        ) from None
    return _ready(model, tokenizer, "gguf", device)


def _gguf_model_type(path: Path) -> str:
    """general.architecture from the GGUF's header, as transformers' model_type."""
    _offline()
    import gguf

    try:
        field = gguf.GGUFReader(path).fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception as exc:  # noqa: BLE001 - the reader raises on any malformed header
        raise TeacherError(
            f"cannot read the GGUF header of {path.name}: {error_cause(exc)}",
            code="invalid_teacher",
            field="teacher",
        ) from None
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    model_type = _GGUF_ARCH_NAMES.get(arch, arch)
    if model_type not in GGUF_CONFIG_MAPPING or model_type in ("general", "tokenizer"):
        raise TeacherError(
            f"GGUF architecture {arch[:80]!r} is not one transformers can load",
            code="unsupported_architecture",
            field="teacher",
        )
    return model_type


def _ready(model: Any, tokenizer: Any, source: str, device: torch.device) -> LMTeacher:
    model = model.to(device).eval()
    model.requires_grad_(False)
    teacher = LMTeacher(model, tokenizer, source)
    if len(tokenizer) > teacher.vocab_size:
        raise TeacherError(
            f"the tokenizer has {len(tokenizer)} tokens but the model only {teacher.vocab_size} logits",
            code="invalid_teacher",
            field="teacher",
        )
    return teacher


def _placement(device: str | torch.device | None) -> tuple[torch.device, torch.dtype]:
    resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return resolved, torch.bfloat16 if resolved.type == "cuda" else torch.float32


def _offline() -> None:
    # Read by huggingface_hub when transformers is first imported; local_files_only covers a later import.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _fresh_dir(work_tmp: Path, prefix: str) -> Path:
    work_tmp.mkdir(parents=True, exist_ok=True)
    for i in range(10_000):
        candidate = work_tmp / f"{prefix}-{i}"
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise TeacherError(f"no free folder under {work_tmp}", code="invalid_teacher")


def _read_json(path: Path, *, required: bool = True) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise TeacherError(
                f"the teacher folder has no {path.name}", code="invalid_teacher", field="teacher"
            )
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise TeacherError(
            f"{path.name} is not valid JSON: {exc}", code="invalid_teacher", field="teacher"
        ) from None
    if not isinstance(data, dict):
        raise TeacherError(f"{path.name} must hold a JSON object", code="invalid_teacher", field="teacher")
    return data


def _is_macos_litter(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    return parts[0] == "__MACOSX" or path.name.startswith("._") or path.name == ".DS_Store"
