"""Export an LM student the Hugging Face way: a folder `from_pretrained` loads, and that folder as a tar.gz.

    out_dir/student_hf/          model.safetensors, config.json, generation_config.json,
                                 tokenizer.json, tokenizer_config.json (+ special tokens map, if any)
    out_dir/student_hf.tar.gz    that folder's files at the archive's root: byte-identical for the same
                                 student (sorted members, mtime 0, uid/gid 0, no gzip name or timestamp)
    out_dir/model_card.json      base family, resolved config, parameter count, and the caller's fields

Extracting the tar into any folder gives `AutoModelForCausalLM.from_pretrained(folder)` and
`AutoTokenizer.from_pretrained(folder)`; weights are safetensors only, so loading runs no pickle.
"""

from __future__ import annotations

import gzip
import json
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

FOLDER = "student_hf"
ARCHIVE = "student_hf.tar.gz"
MODEL_CARD = "model_card.json"


def export_hf(
    student: PreTrainedModel,
    tokenizer: Any,
    out_dir: Path,
    *,
    resolved: dict[str, Any] | None = None,
    card: dict[str, Any] | None = None,
) -> Path:
    """Write the folder, the archive and the model card into `out_dir`; returns the archive's path.

    resolved: the student's resolved config from `lm_students` (goes into the card); card: more fields
    (teacher, dataset, metrics) merged into the model card as given.
    """
    out_dir = Path(out_dir)
    folder = out_dir / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    module: nn.Module = student  # nn.Module's own typing: transformers' decorated .to() confuses mypy
    module.to("cpu", torch.float32).eval()
    config = student.config
    _align_special_tokens(student, tokenizer)
    student.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if not (folder / "generation_config.json").is_file():  # families that cannot generate write none
        student.generation_config.save_pretrained(folder)
    if not (folder / "tokenizer.json").is_file():
        raise ValueError("the tokenizer is not a fast (tokenizers) tokenizer: no tokenizer.json was written")
    archive = out_dir / ARCHIVE
    _write_tar_gz(folder, archive)
    model_card = {
        "format": "huggingface",
        "artifact": ARCHIVE,
        "base_family": config.model_type,
        "architectures": list(getattr(config, "architectures", None) or [type(student).__name__]),
        "parameters": sum(p.numel() for p in student.parameters()),
        "resolved_config": resolved if resolved is not None else {"config": config.to_dict()},
        "files": sorted(p.name for p in folder.iterdir() if p.is_file()),
        **(card or {}),
    }
    tmp = out_dir / f".{MODEL_CARD}.partial"
    tmp.write_text(json.dumps(model_card, indent=2, sort_keys=True, default=str))
    tmp.replace(out_dir / MODEL_CARD)
    return archive


def _align_special_tokens(student: PreTrainedModel, tokenizer: Any) -> None:
    """generate() reads eos/pad/bos from generation_config: give it the tokenizer's where the config has
    none, so a user's `.generate()` stops at end of text without being told."""
    generation = getattr(student, "generation_config", None)
    if generation is None:
        return
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if getattr(generation, name, None) is None and getattr(tokenizer, name, None) is not None:
            setattr(generation, name, getattr(tokenizer, name))


def _write_tar_gz(folder: Path, archive: Path) -> None:
    """The folder's files, sorted, with fixed metadata: the same files give the same bytes."""
    tmp = archive.with_name(f".{archive.name}.partial")
    # Streamed: a model of gigabytes never sits in memory; gzip gets no file name and mtime 0.
    with (
        open(tmp, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            info = tarfile.TarInfo(path.relative_to(folder).as_posix())
            info.size, info.mtime, info.mode = path.stat().st_size, 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(path, "rb") as f:
                tar.addfile(info, f)
    tmp.replace(archive)
