"""A causal-LM job's inputs as its stages find them in the work folder (layout in lm_pipeline.py): the
teacher (extracted and kept for the next stage of the same process), a fresh or trained student, the token
windows and the soft labels' identity, the run's fingerprint and phases. The LM counterpart of inputs.py.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from worker.distill.archives import safe_extract
from worker.distill.errors import (
    ArchiveError,
    ConfigError,
    DatasetError,
    DistillError,
    TeacherError,
)
from worker.distill.lm_config import LMConfig
from worker.distill.lm_generate import (
    GENERATED,
    encode_prompts,
    finished,
    has_prompts,
    read_prompts,
    teacher_context,
)
from worker.distill.lm_students import TeacherLike, build_lm_student, load_lm_student_init
from worker.distill.lm_teachers import LMTeacher, load_lm_teacher
from worker.distill.softlabels import sha256_file
from worker.distill.text_data import TokenData, load_text_dataset
from worker.distill.token_softlabels import KIND, read_manifest
from worker.distill.workfolder import Work, read_json, write_json

if TYPE_CHECKING:
    from transformers import PreTrainedModel


TOKENS, TOKENS_INFO = "tokens.npz", "tokens.json"
LM_CHECKPOINTS = "lm"
STATE, STUDENT, BASELINE = "state.json", "student.pt", "baseline.pt"
REPORT = "report.json"
TARGET_CACHE_BYTES = 2 << 30  # stored targets kept in memory while training (a shuffled batch spans shards)

# Settings that change neither the soft labels nor the trained weights: changing them resumes.
_NOT_IN_FINGERPRINT = (
    "export_formats",
    "generation_prompts",
    "max_new_tokens",
    "checkpoint_every_steps",
    "baseline",
)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- inputs -------------------------------------------------------------------------------------------------


def the_file(w: Work, slot: str) -> Path:
    files = w.input_files(slot)
    if len(files) != 1:
        message = f"expected one {slot} file in {w.inputs(slot)}, found {len(files)}"
        if slot == "teacher":
            raise TeacherError(message, code="teacher_not_found", field="teacher")
        raise DatasetError(message, code="dataset_not_found", field="dataset")
    return files[0]


def _stat_key(path: Path) -> tuple[str, int, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino


@functools.lru_cache(maxsize=8)
def _sha256_of(key: tuple[str, int, int, int]) -> str:
    return sha256_file(Path(key[0]))


def file_sha256(path: Path) -> str:
    """A file's sha256, computed once per process while its size, mtime and inode stay the same."""
    return _sha256_of(_stat_key(path))


# One teacher at most: a process serves one job at a time. Kept across the stages a child runs in turn.
_last_teacher: dict[tuple[Any, ...], LMTeacher] = {}


def job_teacher(w: Work, device: str | torch.device) -> LMTeacher:
    """The job's teacher on `device`, extracted into work/.lm/teacher (afresh: stale copies never load)."""
    path = the_file(w, "teacher")
    key = (_stat_key(path), str(device))
    if key not in _last_teacher:
        _last_teacher.clear()
        folder = Path(w.root) / ".lm" / "teacher"
        shutil.rmtree(folder, ignore_errors=True)
        _last_teacher[key] = load_lm_teacher(path, folder, device=device)
    return _last_teacher[key]


def load_job_teacher(work: Path, device: str | torch.device = "cpu") -> LMTeacher:
    """The job's teacher, loaded as the stages load it and kept for them (benchmarks time the load apart)."""
    return job_teacher(Work(Path(work)), device)


def forget_lm_teacher() -> None:
    """Drop the kept teacher (a long-lived process between jobs; tests)."""
    _last_teacher.clear()


def student_init_path(w: Work) -> Path | None:
    """The user's student folder (extracted into work/.lm/student_init when uploaded as an archive)."""
    files = w.input_files("student_init")
    if not files:
        return None
    source = files[0]
    if source.is_dir():
        folder = source
    else:
        folder = Path(w.root) / ".lm" / "student_init"
        shutil.rmtree(folder, ignore_errors=True)
        try:
            safe_extract(source, folder)
        except ArchiveError as exc:
            raise ConfigError(
                f"student init {source.name}: {exc.message}",
                code="invalid_student_init",
                field="student_init",
            ) from None
    configs = sorted(folder.rglob("config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise ConfigError(
            f"student init {source.name} holds no config.json",
            code="invalid_student_init",
            field="student_init",
        )
    return configs[0].parent


def new_student(
    config: LMConfig, teacher: LMTeacher, init: Path | None
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """The untrained student, seeded: the baseline starts from the very weights KD starts from."""
    torch.manual_seed(config.seed)
    # LMTeacher fits TeacherLike, but mypy wants a settable `config` (LMTeacher has a read-only property).
    like = cast(TeacherLike, teacher)
    if init is not None:
        return load_lm_student_init(init, like)
    return build_lm_student(config.student, like)


def trained_student(config: LMConfig, teacher: LMTeacher, init: Path | None, path: Path) -> PreTrainedModel:
    if not path.is_file():
        raise DistillError(f"{path.name} is missing: run the distill stage first", code="student_missing")
    model, _ = new_student(config, teacher, init)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    module: nn.Module = model  # nn.Module's typing: transformers' decorated methods confuse mypy
    module.eval()
    return model


def check_length(config: LMConfig, teacher: LMTeacher) -> None:
    positions = getattr(teacher.config, "max_position_embeddings", None)
    if isinstance(positions, int) and 0 < positions < config.max_length:
        raise ConfigError(
            f"max_length {config.max_length} is longer than the teacher's context of {positions} tokens",
            field="max_length",
        )


# --- token windows and soft labels --------------------------------------------------------------------------


def tokens_identity(w: Work, config: LMConfig) -> dict[str, Any]:
    """What the windows depend on: the teacher (its tokenizer), the dataset and the data settings. With
    `generate`, the dataset is the generated file (DistillError `soft_labels_missing` until it is complete)
    and the prompts' hash and the generation settings are named too. Jobs without it keep the keys they had
    (stored labels stay reusable)."""
    identity = {
        "teacher_sha256": file_sha256(the_file(w, "teacher")),
        "dataset_sha256": file_sha256(the_file(w, "dataset")),
        "max_length": config.max_length,
        "text_column": config.text_column,
        "pack": config.pack,
        "val_fraction": config.val_fraction,
        "seed": config.seed,
    }
    if config.generate is not None:
        generated = generated_record(w, config)
        if generated is None:
            raise DistillError(
                "the generated dataset is missing or from other inputs: run soft_label first",
                code="soft_labels_missing",
            )
        identity |= {
            "prompts_sha256": identity["dataset_sha256"],
            "generate": config.generate,
            "dataset_sha256": generated["sha256"],
        }
    return identity


def tokenize_dataset(w: Work, config: LMConfig, teacher: LMTeacher) -> TokenData:
    generating = config.generate is not None
    path = w.soft_labels / GENERATED if generating else the_file(w, "dataset")
    try:
        return load_text_dataset(
            path,
            teacher.tokenizer,
            max_length=config.max_length,
            # The generated file has `prompt` and `completion` only: never read as documents.
            text_column="text" if generating else config.text_column,
            pack=config.pack,
            val_fraction=config.val_fraction,
            seed=config.seed,
        )
    except DatasetError as exc:
        if exc.code == "missing_column" and not generating and has_prompts(path):
            raise DatasetError(
                f"{path.name} holds prompts without completions: set `generate` (e.g. "
                "{\"max_new_tokens\": 128}) to have the teacher write them, or add a 'completion' column",
                code="prompts_need_generation",
                field="generate",
            ) from None
        raise


# --- generated completions (prompt-only datasets) -----------------------------------------------------------


def generation_identity(w: Work, config: LMConfig) -> dict[str, Any]:
    return {
        "teacher_sha256": file_sha256(the_file(w, "teacher")),
        "dataset_sha256": file_sha256(the_file(w, "dataset")),
        "generate": config.generate,
    }


def generated_record(w: Work, config: LMConfig) -> dict[str, Any] | None:
    """generated.json if soft_labels/generated.jsonl is complete for these inputs and settings."""
    return finished(w.soft_labels, generation_identity(w, config), digest=file_sha256)


def prompt_sample(w: Work, config: LMConfig, teacher: LMTeacher) -> tuple[Any, Any, dict[str, Any]]:
    """Preflight of a prompt-only dataset: the prompts read and checked against the teacher's context; the
    first prompt as a one-row batch (ids, mask) to run through both models; what the summary says."""
    assert config.generate is not None
    prompts = read_prompts(the_file(w, "dataset"), config.text_column)
    limit = teacher_context(teacher)
    encoded = encode_prompts(teacher.tokenizer, prompts, config.generate["max_new_tokens"], limit)
    ids = torch.tensor([encoded[0][: config.max_length]], dtype=torch.long)
    summary = {"prompts": len(prompts), "prompt_tokens": sum(map(len, encoded)), "generate": config.generate}
    return ids, torch.ones_like(ids, dtype=torch.bool), summary


def stored_tokens(w: Work, identity: dict[str, Any]) -> tuple[TokenData, dict[str, Any]] | None:
    """tokens.npz and tokens.json if they were made from these inputs and settings; else None."""
    info = read_json(w.soft_labels / TOKENS_INFO)
    path = w.soft_labels / TOKENS
    if (
        not info
        or info.get("identity") != identity
        or not path.is_file()
        or sha256_file(path) != info.get("sha256")
    ):
        return None
    return TokenData.load_npz(path), info


def save_tokens(w: Work, identity: dict[str, Any], data: TokenData) -> dict[str, Any]:
    w.soft_labels.mkdir(parents=True, exist_ok=True)
    tmp = w.soft_labels / f".{TOKENS}.tmp"
    data.save_npz(tmp)
    os.replace(tmp, w.soft_labels / TOKENS)
    info = {"identity": identity, "sha256": sha256_file(w.soft_labels / TOKENS), "report": data.report()}
    write_json(w.soft_labels / TOKENS_INFO, info)
    return info


def split_names(data: TokenData) -> list[str]:
    return ["train", "val"] if len(data.split("val")) else ["train"]


def label_temperature(config: LMConfig) -> float:
    return float(config.temperature) if config.soft_label_format == "sampled" else 1.0


def _labels_identity(identity: dict[str, Any], config: LMConfig) -> dict[str, Any]:
    """The manifest's identity (token_softlabels.py) that labels for this job carry."""
    return {
        "kind": KIND,
        "teacher_sha256": identity["teacher_sha256"],
        "dataset_sha256": identity["dataset_sha256"],
        "format": config.soft_label_format,
        "k": config.k,
        "temperature": label_temperature(config),
        "seed": config.seed,
        "max_length": config.max_length,
        "shard_rows": config.shard_rows,
    }


def labels_complete(
    w: Work, config: LMConfig, identity: dict[str, Any], info: dict[str, Any], data: TokenData
) -> dict[str, Any] | None:
    """The manifest, if every split's labels are complete, made of these windows, and their shards intact."""
    manifest = read_manifest(w.soft_labels)
    wanted = _labels_identity(identity, config)
    if manifest is None or any(manifest.get(key) != value for key, value in wanted.items()):
        return None
    labelled = info.get("labelled") or {}
    for split in split_names(data):
        entry = manifest.get("splits", {}).get(split) or {}
        if not entry.get("complete") or entry.get("data_sha256") != labelled.get(split):
            return None
        for shard in entry.get("shards", []):
            path = w.soft_labels / shard["name"]
            if not path.is_file() or sha256_file(path) != shard.get("sha256"):
                return None
    return manifest


def soft_labels_for(w: Work, config: LMConfig) -> tuple[TokenData, dict[str, Any], dict[str, Any]]:
    """Windows, their tokens.json and the complete manifest, or DistillError `soft_labels_missing`."""
    identity = tokens_identity(w, config)
    stored = stored_tokens(w, identity)
    manifest = None if stored is None else labels_complete(w, config, identity, stored[1], stored[0])
    if stored is None or manifest is None:
        raise DistillError(
            "soft labels are missing or from other inputs: run soft_label first", code="soft_labels_missing"
        )
    return stored[0], identity, manifest


# --- the training run ----------------------------------------------------------------------------------


def run_fingerprint(identity: dict[str, Any], config: LMConfig, init: Path | None) -> str:
    """What the trained weights depend on: inputs, windows, soft labels and training settings."""
    settings = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_FINGERPRINT}
    key: list[Any] = [identity, settings]
    if init is not None:
        key.append(sorted((str(p.relative_to(init)), sha256_file(p)) for p in init.rglob("*") if p.is_file()))
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def phases_of(config: LMConfig) -> list[tuple[str, str, str, str]]:
    """(phase, train_lm method, checkpoint folder, weights file) of each run the stage makes, in order."""
    phases = [("distill", config.method, "kd", STUDENT)]
    if config.baseline and config.method != "ce":  # a CE-only "KD" run is its own baseline
        phases.append(("baseline", "ce", "ce", BASELINE))
    return phases


def phase_done(folder: Path, record: dict[str, Any], phase: str) -> bool:
    entry = record.get("phases", {}).get(phase)
    return (
        bool(entry)
        and (folder / entry["weights"]).is_file()
        and sha256_file(folder / entry["weights"]) == entry["sha256"]
    )


def shards_to_cache(manifest: dict[str, Any], split: str) -> int:
    """How many shards the target reader keeps: all of them while they fit TARGET_CACHE_BYTES."""
    shards = manifest["splits"][split]["shards"]
    largest = max((s["bytes"] for s in shards), default=1)
    return max(4, min(len(shards), TARGET_CACHE_BYTES // max(largest, 1)))
