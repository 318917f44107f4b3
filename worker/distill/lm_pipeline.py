"""The stages of one causal-LM job (`task` "causal_lm") over a local work folder, shaped like pipeline.py's.

    work/inputs/teacher/<file>        a zip/tar of a Hugging Face model folder, or one GGUF file
    work/inputs/dataset/<file>        text: .jsonl / .txt / .csv / .parquet (text_data.py)
    work/inputs/student_init/<file>   optional: a zip/tar of a Hugging Face folder to start the student from
    work/.lm/                         the teacher (and student init) extracted; any stage rebuilds it
    work/soft_labels/generated.jsonl  with `generate`: the teacher's completions of the dataset's prompts
                                      (+ generated.json: lm_generate.py), the dataset the windows are made of
    work/soft_labels/tokens.npz       both splits' token windows (text_data.TokenData), tokenized once
    work/soft_labels/tokens.json      what the windows were made from, and the windows the labels were made of
    work/soft_labels/manifest.json    + {train,val}-*.npz: the teacher's sparse targets (token_softlabels.py)
    work/checkpoints/lm/state.json    the stage's record: fingerprint, hyperparameters, each finished phase
    work/checkpoints/lm/kd/  ce/      train_lm's checkpoints of the KD run and of the CE-only baseline
    work/checkpoints/lm/student.pt    final weights: state dicts, read back with torch.load(weights_only=True)
    work/checkpoints/lm/baseline.pt
    work/out/                         report.json, student_hf.tar.gz (+ student_hf/), model_card.json

Every stage is safe to run twice: it reads what is already there and does only what is missing (a finished
soft_label or distill stage does not even load the teacher). As for classification jobs, only `soft_labels/`
and `checkpoints/` travel between machines, so the windows live beside the soft labels and a later stage in
another process rebuilds the student from the teacher, the spec and `student.pt`; `out/` is rebuilt when
missing. Another teacher, dataset or training setting (a new fingerprint) discards checkpoints/lm and out/.

With `generate` the dataset is prompts alone: the soft_label stage first has the teacher write each
completion (lm_generate.py, resumable by batch), then tokenizes the generated file as any prompt +
completion dataset. Its sha256 stands for the dataset's in everything made from it (tokens.json, the soft
labels' manifest, the training fingerprint, the report), so another generation is other labels; the prompts'
hash and the generation settings are recorded beside it. Living in soft_labels/, it travels with the labels.

Soft labels are made at temperature 1 for top-k (the losses re-temper them, and the report's KL and
agreement are at T = 1) and at the training temperature for sampled targets, which cannot be re-tempered.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
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
    MismatchError,
    TeacherError,
)
from worker.distill.lm_config import LMConfig
from worker.distill.lm_eval import evaluate_lm, generate_side_by_side, tokens_per_second
from worker.distill.lm_export import ARCHIVE, MODEL_CARD, export_hf
from worker.distill.lm_generate import (
    GENERATED,
    encode_prompts,
    finished,
    generate_completions,
    has_prompts,
    read_prompts,
    teacher_context,
)
from worker.distill.lm_students import TeacherLike, build_lm_student, load_lm_student_init
from worker.distill.lm_summary import lm_headline
from worker.distill.lm_teachers import LMTeacher, load_lm_teacher
from worker.distill.lm_train import Stopped, train_lm
from worker.distill.progress import Progress, emit
from worker.distill.softlabels import sha256_file
from worker.distill.text_data import TokenData, load_text_dataset
from worker.distill.token_softlabels import KIND, TokenTargetReader, read_manifest, token_soft_label_stage
from worker.distill.token_targets import id_dtype
from worker.distill.workfolder import Work, read_json, save_weights, write_json

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "Stopped",
    "forget_lm_teacher",
    "lm_distill",
    "lm_evaluate",
    "lm_export",
    "lm_generate",
    "lm_headline",
    "lm_preflight",
    "lm_soft_label",
]

TOKENS, TOKENS_INFO = "tokens.npz", "tokens.json"
LM_CHECKPOINTS = "lm"
STATE, STUDENT, BASELINE = "state.json", "student.pt", "baseline.pt"
REPORT = "report.json"
SOFT_LABEL_BATCH = {"cpu": 8, "cuda": 32}  # windows per teacher forward: (B, L, V) logits exist at a time
GENERATE_BATCH = {"cpu": 8, "cuda": 32}  # prompts per `generate` call (kept for the file's life: resume)
TARGET_CACHE_BYTES = 2 << 30  # stored targets kept in memory while training (a shuffled batch spans shards)
SPEED_SECONDS = 0.5  # per model and batch size, for the report's CPU tokens/s
PROMPTS, PROMPT_TOKENS = 3, 8  # default generation prompts: the first tokens of the first held-out windows
# Settings that change neither the soft labels nor the trained weights: changing them resumes.
_NOT_IN_FINGERPRINT = (
    "export_formats",
    "generation_prompts",
    "max_new_tokens",
    "checkpoint_every_steps",
    "baseline",
)
_AUTO_NOTE = "for causal_lm, method 'auto' means fkl at temperature 1 and alpha 1: no search is run"


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- inputs -------------------------------------------------------------------------------------------------


def _the_file(w: Work, slot: str) -> Path:
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


def _sha256(path: Path) -> str:
    """A file's sha256, computed once per process while its size, mtime and inode stay the same."""
    return _sha256_of(_stat_key(path))


# One teacher at most: a process serves one job at a time. Kept across the stages a child runs in turn.
_last_teacher: dict[tuple[Any, ...], LMTeacher] = {}


def _teacher(w: Work, device: str | torch.device) -> LMTeacher:
    """The job's teacher on `device`, extracted into work/.lm/teacher (afresh: stale copies never load)."""
    path = _the_file(w, "teacher")
    key = (_stat_key(path), str(device))
    if key not in _last_teacher:
        _last_teacher.clear()
        folder = Path(w.root) / ".lm" / "teacher"
        shutil.rmtree(folder, ignore_errors=True)
        _last_teacher[key] = load_lm_teacher(path, folder, device=device)
    return _last_teacher[key]


def load_job_teacher(work: Path, device: str | torch.device = "cpu") -> LMTeacher:
    """The job's teacher, loaded as the stages load it and kept for them (benchmarks time the load apart)."""
    return _teacher(Work(Path(work)), device)


def forget_lm_teacher() -> None:
    """Drop the kept teacher (a long-lived process between jobs; tests)."""
    _last_teacher.clear()


def _student_init(w: Work) -> Path | None:
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


def _new_student(
    config: LMConfig, teacher: LMTeacher, init: Path | None
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """The untrained student, seeded: the baseline starts from the very weights KD starts from."""
    torch.manual_seed(config.seed)
    # LMTeacher fits TeacherLike, but mypy wants a settable `config` (LMTeacher has a read-only property).
    like = cast(TeacherLike, teacher)
    if init is not None:
        return load_lm_student_init(init, like)
    return build_lm_student(config.student, like)


def _trained(config: LMConfig, teacher: LMTeacher, init: Path | None, path: Path) -> PreTrainedModel:
    if not path.is_file():
        raise DistillError(f"{path.name} is missing: run the distill stage first", code="student_missing")
    model, _ = _new_student(config, teacher, init)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    module: nn.Module = model  # nn.Module's typing: transformers' decorated methods confuse mypy
    module.eval()
    return model


def _check_length(config: LMConfig, teacher: LMTeacher) -> None:
    positions = getattr(teacher.config, "max_position_embeddings", None)
    if isinstance(positions, int) and 0 < positions < config.max_length:
        raise ConfigError(
            f"max_length {config.max_length} is longer than the teacher's context of {positions} tokens",
            field="max_length",
        )


# --- token windows and soft labels --------------------------------------------------------------------------


def _tokens_identity(w: Work, config: LMConfig) -> dict[str, Any]:
    """What the windows depend on: the teacher (its tokenizer), the dataset and the data settings. With
    `generate`, the dataset is the generated file (DistillError `soft_labels_missing` until it is complete)
    and the prompts' hash and the generation settings are named too. Jobs without it keep the keys they had
    (stored labels stay reusable)."""
    identity = {
        "teacher_sha256": _sha256(_the_file(w, "teacher")),
        "dataset_sha256": _sha256(_the_file(w, "dataset")),
        "max_length": config.max_length,
        "text_column": config.text_column,
        "pack": config.pack,
        "val_fraction": config.val_fraction,
        "seed": config.seed,
    }
    if config.generate is not None:
        generated = _generated(w, config)
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


def _tokenize(w: Work, config: LMConfig, teacher: LMTeacher) -> TokenData:
    generating = config.generate is not None
    path = w.soft_labels / GENERATED if generating else _the_file(w, "dataset")
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


def _generation_identity(w: Work, config: LMConfig) -> dict[str, Any]:
    return {
        "teacher_sha256": _sha256(_the_file(w, "teacher")),
        "dataset_sha256": _sha256(_the_file(w, "dataset")),
        "generate": config.generate,
    }


def _generated(w: Work, config: LMConfig) -> dict[str, Any] | None:
    """generated.json if soft_labels/generated.jsonl is complete for these inputs and settings."""
    return finished(w.soft_labels, _generation_identity(w, config), digest=_sha256)


def lm_generate(work: Path, config: LMConfig, on_progress: Progress | None = None) -> dict[str, Any] | None:
    """With `generate`: the teacher writes the completions of the dataset's prompts into
    soft_labels/generated.jsonl (lm_generate.py), resuming a stopped run at its last whole batch; returns
    generated.json. A finished file is returned without loading the teacher. None without `generate`."""
    if config.generate is None:
        return None
    w = Work(Path(work))
    done = _generated(w, config)
    if done is not None:
        emit(on_progress, "generate", 1.0, resumed=True)
        return done
    prompts = read_prompts(_the_file(w, "dataset"), config.text_column)
    device = _device()
    teacher = _teacher(w, device)
    settings = config.generate

    def on_batch(rows: int, total: int, tokens: int) -> None:
        emit(on_progress, "generate", rows / total, rows=rows, tokens=tokens)

    return generate_completions(
        teacher,
        prompts,
        w.soft_labels,
        identity=_generation_identity(w, config),
        max_new_tokens=settings["max_new_tokens"],
        do_sample=settings["do_sample"],
        temperature=settings["temperature"],
        top_p=settings["top_p"],
        seed=settings["seed"],
        batch_size=GENERATE_BATCH.get(device.type, 8),
        on_batch=on_batch,
    )


def _prompt_sample(w: Work, config: LMConfig, teacher: LMTeacher) -> tuple[Any, Any, dict[str, Any]]:
    """Preflight of a prompt-only dataset: the prompts read and checked against the teacher's context; the
    first prompt as a one-row batch (ids, mask) to run through both models; what the summary says."""
    assert config.generate is not None
    prompts = read_prompts(_the_file(w, "dataset"), config.text_column)
    limit = teacher_context(teacher)
    encoded = encode_prompts(teacher.tokenizer, prompts, config.generate["max_new_tokens"], limit)
    ids = torch.tensor([encoded[0][: config.max_length]], dtype=torch.long)
    summary = {"prompts": len(prompts), "prompt_tokens": sum(map(len, encoded)), "generate": config.generate}
    return ids, torch.ones_like(ids, dtype=torch.bool), summary


def _stored_tokens(w: Work, identity: dict[str, Any]) -> tuple[TokenData, dict[str, Any]] | None:
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


def _save_tokens(w: Work, identity: dict[str, Any], data: TokenData) -> dict[str, Any]:
    w.soft_labels.mkdir(parents=True, exist_ok=True)
    tmp = w.soft_labels / f".{TOKENS}.tmp"
    data.save_npz(tmp)
    os.replace(tmp, w.soft_labels / TOKENS)
    info = {"identity": identity, "sha256": sha256_file(w.soft_labels / TOKENS), "report": data.report()}
    write_json(w.soft_labels / TOKENS_INFO, info)
    return info


def _splits(data: TokenData) -> list[str]:
    return ["train", "val"] if len(data.split("val")) else ["train"]


def _label_temperature(config: LMConfig) -> float:
    return float(config.temperature) if config.soft_label_format == "sampled" else 1.0


def _labels_identity(identity: dict[str, Any], config: LMConfig) -> dict[str, Any]:
    """The manifest's identity (token_softlabels.py) that labels for this job carry."""
    return {
        "kind": KIND,
        "teacher_sha256": identity["teacher_sha256"],
        "dataset_sha256": identity["dataset_sha256"],
        "format": config.soft_label_format,
        "k": config.k,
        "temperature": _label_temperature(config),
        "seed": config.seed,
        "max_length": config.max_length,
        "shard_rows": config.shard_rows,
    }


def _labels_complete(
    w: Work, config: LMConfig, identity: dict[str, Any], info: dict[str, Any], data: TokenData
) -> dict[str, Any] | None:
    """The manifest, if every split's labels are complete, made of these windows, and their shards intact."""
    manifest = read_manifest(w.soft_labels)
    wanted = _labels_identity(identity, config)
    if manifest is None or any(manifest.get(key) != value for key, value in wanted.items()):
        return None
    labelled = info.get("labelled") or {}
    for split in _splits(data):
        entry = manifest.get("splits", {}).get(split) or {}
        if not entry.get("complete") or entry.get("data_sha256") != labelled.get(split):
            return None
        for shard in entry.get("shards", []):
            path = w.soft_labels / shard["name"]
            if not path.is_file() or sha256_file(path) != shard.get("sha256"):
                return None
    return manifest


def _soft_labels_for(w: Work, config: LMConfig) -> tuple[TokenData, dict[str, Any], dict[str, Any]]:
    """Windows, their tokens.json and the complete manifest, or DistillError `soft_labels_missing`."""
    identity = _tokens_identity(w, config)
    stored = _stored_tokens(w, identity)
    manifest = None if stored is None else _labels_complete(w, config, identity, stored[1], stored[0])
    if stored is None or manifest is None:
        raise DistillError(
            "soft labels are missing or from other inputs: run soft_label first", code="soft_labels_missing"
        )
    return stored[0], identity, manifest


# --- stages -------------------------------------------------------------------------------------------------


def lm_preflight(work: Path, config: LMConfig) -> dict[str, Any]:
    """Load teacher and dataset, tokenize, build the student once and run two windows through both."""
    w = Work(Path(work))
    teacher = _teacher(w, "cpu")
    _check_length(config, teacher)
    if config.generate is None:
        data = _tokenize(w, config, teacher)
        sample = data.split("train")
        ids, mask, dataset = sample.input_ids[:2].long(), sample.attention_mask[:2], data.report()
    else:  # the windows are made once the teacher has written the completions
        ids, mask, dataset = _prompt_sample(w, config, teacher)
    student, resolved = _new_student(config, teacher, _student_init(w))
    with torch.inference_mode():
        student_vocab = int(student(input_ids=ids, attention_mask=mask.long()).logits.shape[-1])
        teacher_vocab = int(teacher.logits(ids, mask).shape[-1])
    if student_vocab != teacher_vocab:
        raise MismatchError(
            f"the student predicts {student_vocab} tokens, the teacher {teacher_vocab}", field="student"
        )
    k = min(config.k, teacher_vocab)
    bytes_per_token = k * (torch.empty(0, dtype=id_dtype(teacher_vocab)).element_size() + 2)
    return {
        "task": config.task,
        "teacher": {**teacher.describe(), "sha256": _sha256(_the_file(w, "teacher"))},
        "dataset": {**dataset, "sha256": _sha256(_the_file(w, "dataset"))},
        "student": {k_: v for k_, v in resolved.items() if k_ != "config"},
        "soft_labels": {
            "format": config.soft_label_format,
            "k": config.k,
            "temperature": _label_temperature(config),
            "bytes_per_token": bytes_per_token + (2 if config.soft_label_format == "topk" else 0),
        },
        "config": config.to_dict(),
    }


def lm_soft_label(work: Path, config: LMConfig, on_progress: Progress | None = None) -> dict[str, Any]:
    """With `generate`, have the teacher write the completions first (lm_generate; the job's own step runs
    it before this one). Tokenize once (soft_labels/tokens.npz), then run the teacher over train and
    held-out windows.

    Resumes at shard granularity; a finished stage returns the manifest without loading the teacher.
    """
    w = Work(Path(work))
    if config.generate is not None and _generated(w, config) is None:
        lm_generate(work, config, on_progress)
    identity = _tokens_identity(w, config)
    stored = _stored_tokens(w, identity)
    if stored is not None:
        manifest = _labels_complete(w, config, identity, stored[1], stored[0])
        if manifest is not None:
            emit(on_progress, "soft_label", 1.0, resumed=True)
            return manifest
    device = _device()
    teacher = _teacher(w, device)
    _check_length(config, teacher)
    if stored is None:
        data = _tokenize(w, config, teacher)
        info = _save_tokens(w, identity, data)
    else:
        data, info = stored
    splits = _splits(data)
    rows = {split: len(data.split(split)) for split in splits}
    total, done = sum(rows.values()), 0
    manifest = {}
    for split in splits:
        manifest = token_soft_label_stage(
            teacher.logits,
            data,
            w.soft_labels,
            split=split,
            fmt=config.soft_label_format,
            k=config.k,
            temperature=_label_temperature(config),
            shard_rows=config.shard_rows,
            batch_size=SOFT_LABEL_BATCH.get(device.type, 8),
            seed=config.seed,
            teacher_sha256=identity["teacher_sha256"],
            dataset_sha256=identity["dataset_sha256"],
            on_progress=functools.partial(_split_progress, on_progress, done, rows[split], total),
        )
        done += rows[split]
    # The windows these labels were made of: distill and a rerun check the manifest against them.
    info["labelled"] = {split: manifest["splits"][split]["data_sha256"] for split in splits}
    write_json(w.soft_labels / TOKENS_INFO, info)
    return manifest


def _split_progress(
    on_progress: Progress | None, offset: int, rows: int, total: int, event: dict[str, Any]
) -> None:
    """A shard event of one split, as progress over all windows (the splits run one after another)."""
    emit(on_progress, "soft_label", (offset + event["progress"] * rows) / total, **event["metrics"])


def _fingerprint(identity: dict[str, Any], config: LMConfig, init: Path | None) -> str:
    """What the trained weights depend on: inputs, windows, soft labels and training settings."""
    settings = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_FINGERPRINT}
    key: list[Any] = [identity, settings]
    if init is not None:
        key.append(sorted((str(p.relative_to(init)), sha256_file(p)) for p in init.rglob("*") if p.is_file()))
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _hyperparameters(config: LMConfig) -> dict[str, Any]:
    hp: dict[str, Any] = {
        "method": config.method,
        "temperature": float(config.temperature),
        "alpha": float(config.alpha),
        "source": "given",
        "note": _AUTO_NOTE,
    }
    if config.method == "gkd":
        hp["beta"] = config.beta
    return hp


def _phases(config: LMConfig) -> list[tuple[str, str, str, str]]:
    """(phase, train_lm method, checkpoint folder, weights file) of each run the stage makes, in order."""
    phases = [("distill", config.method, "kd", STUDENT)]
    if config.baseline and config.method != "ce":  # a CE-only "KD" run is its own baseline
        phases.append(("baseline", "ce", "ce", BASELINE))
    return phases


def _phase_done(folder: Path, record: dict[str, Any], phase: str) -> bool:
    entry = record.get("phases", {}).get(phase)
    return (
        bool(entry)
        and (folder / entry["weights"]).is_file()
        and sha256_file(folder / entry["weights"]) == entry["sha256"]
    )


def lm_distill(
    work: Path,
    config: LMConfig,
    on_progress: Progress | None = None,
    stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Train the student on the stored targets (checkpoints/lm/kd), then, with `baseline`, the same student on
    CE alone with the same windows and steps (checkpoints/lm/ce). Each run resumes from its checkpoints, each
    finished one is recorded in checkpoints/lm/state.json; a finished stage returns that record without
    loading the teacher. `stop` is train_lm's: True checkpoints and raises `lm_train.Stopped` (re-exported
    here as `Stopped`), which the caller turns into a clean exit as for classification jobs.
    """
    w = Work(Path(work))
    data, identity, manifest = _soft_labels_for(w, config)
    init = _student_init(w)
    folder = w.checkpoints / LM_CHECKPOINTS
    key = _fingerprint(identity, config, init)
    record = read_json(folder / STATE)
    if record is None or record.get("fingerprint") != key:
        # Other inputs or settings: these checkpoints would resume a different run, and out/ describes it.
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(w.out, ignore_errors=True)
        record = {"fingerprint": key, "hyperparameters": _hyperparameters(config), "phases": {}}
        write_json(folder / STATE, record)
    phases = _phases(config)
    if all(_phase_done(folder, record, name) for name, *_ in phases):
        return _result(record)

    teacher = _teacher(w, "cpu")  # its config (and for teacher_layers its weights) make the student
    train, val = data.split("train"), data.split("val")
    reader = TokenTargetReader(w.soft_labels, "train", cache_shards=_cache_shards(manifest, "train"))
    for index, (name, method, subfolder, weights) in enumerate(phases):
        if _phase_done(folder, record, name):
            continue
        if stop is not None and stop():  # train_lm asks only once it runs: do not start a run to stop it
            raise Stopped(0, 0)
        student, resolved = _new_student(config, teacher, init)
        on_epoch = functools.partial(
            _epoch_done, on_progress, name, index * config.epochs, len(phases) * config.epochs
        )
        result = train_lm(
            student,
            train,
            val if len(val) else None,
            reader.take,
            method=method,
            alpha=config.alpha,
            temperature=config.temperature,
            beta=config.beta,
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            weight_decay=config.weight_decay,
            grad_clip=config.grad_clip,
            seed=config.seed,
            ckpt_dir=folder / subfolder,
            on_epoch=on_epoch,
            stop=stop,
            checkpoint_every_steps=config.checkpoint_every_steps,
        )
        save_weights(student, folder / weights)
        record["student"] = {k: v for k, v in resolved.items() if k != "config"}
        record["phases"][name] = {
            "method": method,
            "epochs": len(result.history),
            "best_epoch": result.best_epoch,
            "best_perplexity": result.best_perplexity,
            "metric": result.metric,
            "steps": result.steps,
            "resumed_from": result.resumed_from,
            "seconds": result.seconds,
            "history": result.history,
            "weights": weights,
            "sha256": sha256_file(folder / weights),
        }
        write_json(folder / STATE, record)
    return _result(record)


def _cache_shards(manifest: dict[str, Any], split: str) -> int:
    """How many shards the target reader keeps: all of them while they fit TARGET_CACHE_BYTES."""
    shards = manifest["splits"][split]["shards"]
    largest = max((s["bytes"] for s in shards), default=1)
    return max(4, min(len(shards), TARGET_CACHE_BYTES // max(largest, 1)))


def _epoch_done(
    on_progress: Progress | None, phase: str, first_epoch: int, total_epochs: int, record: dict[str, Any]
) -> None:
    metrics = {k: v for k, v in record.items() if k != "epoch"}
    emit(
        on_progress,
        "distill",
        (first_epoch + record["epoch"]) / total_epochs,
        record["epoch"],
        phase=phase,
        **metrics,
    )


def _result(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "hyperparameters": record["hyperparameters"],
        "student": record.get("student"),
        "phases": record["phases"],
    }


def _finished_record(w: Work, config: LMConfig) -> dict[str, Any]:
    """checkpoints/lm/state.json of a distill stage that ran to the end for these inputs and settings."""
    folder = w.checkpoints / LM_CHECKPOINTS
    record = read_json(folder / STATE)
    key = _fingerprint(_tokens_identity(w, config), config, _student_init(w))
    if (
        record is None
        or record.get("fingerprint") != key
        or not all(_phase_done(folder, record, name) for name, *_ in _phases(config))
    ):
        raise DistillError(
            "the student is not trained yet: run the distill stage first", code="stage_not_done"
        )
    return record


def _stored_report(w: Work, record: dict[str, Any]) -> dict[str, Any] | None:
    """out/report.json if it describes the trained student and baseline and holds the headline; else None."""
    try:
        report = read_json(w.out / REPORT)
        if not report:
            return None
        baseline = record["phases"].get("baseline")
        if report.get("student_sha256") != record["phases"]["distill"]["sha256"] or report.get(
            "baseline_sha256"
        ) != (baseline or {}).get("sha256"):
            return None
        lm_headline(report)
    except (ValueError, KeyError, TypeError, AttributeError):  # torn or hand-edited: measure again
        return None
    return report


def lm_evaluate(work: Path, config: LMConfig) -> dict[str, Any]:
    """Held-out perplexity of teacher (from the soft-label manifest), student and baseline; the students'
    top-1 agreement with and KL from the teacher's stored targets; tokens/s of teacher and student on CPU;
    greedy generations side by side. Written to out/report.json, measured once per trained student."""
    w = Work(Path(work))
    record = _finished_record(w, config)
    report = _stored_report(w, record)
    if report is None:
        report = _measure(w, config, record)
        write_json(w.out / REPORT, report)
    return report


def _measure(w: Work, config: LMConfig, record: dict[str, Any]) -> dict[str, Any]:
    data, identity, manifest = _soft_labels_for(w, config)
    split = _splits(data)[-1]  # the held-out windows; the training ones when nothing was held out
    windows = data.split(split)
    teacher = _teacher(w, "cpu")
    init = _student_init(w)
    folder = w.checkpoints / LM_CHECKPOINTS
    student = _trained(config, teacher, init, folder / STUDENT)
    baseline = _trained(config, teacher, init, folder / BASELINE) if "baseline" in record["phases"] else None
    # KL and agreement are at T = 1: sampled targets drawn at another temperature cannot be read at 1.
    loader = None
    if _label_temperature(config) == 1.0:
        loader = TokenTargetReader(w.soft_labels, split, cache_shards=_cache_shards(manifest, split)).take
    labels = manifest["splits"][split]
    speed_len = config.max_length

    def measured(model: PreTrainedModel | None, name: str) -> dict[str, Any] | None:
        if model is None:
            return None
        metrics = evaluate_lm(model, windows, loader)
        phase = record["phases"][name]
        return {
            "perplexity": metrics["perplexity"],
            "nll": metrics["nll"],
            "agreement": metrics["agreement"],
            "kl": metrics["kl"],
            "tokens": metrics["tokens"],
            "parameters": sum(p.numel() for p in model.parameters()),
            "tokens_per_s": tokens_per_second(model, speed_len, seconds=SPEED_SECONDS),
            "best_epoch": phase["best_epoch"],
            "steps": phase["steps"],
            "curve": [r["val_perplexity"] for r in phase["history"]],
        }

    student_metrics, baseline_metrics = measured(student, "distill"), measured(baseline, "baseline")
    assert student_metrics is not None
    student_metrics["spec"] = config.student if init is None else "student_init"
    student_metrics["resolved"] = record.get("student")
    teacher_info = teacher.describe()
    teacher_speed = tokens_per_second(teacher.model, speed_len, seconds=SPEED_SECONDS)
    prompts = config.generation_prompts or _default_prompts(windows, teacher.tokenizer)
    generations = generate_side_by_side(
        teacher.model, student, teacher.tokenizer, prompts, config.max_new_tokens
    )
    s_ppl, b_ppl = student_metrics["perplexity"], (baseline_metrics or {}).get("perplexity")
    return {
        "task": config.task,
        "evaluated_on": split,
        "teacher_sha256": identity["teacher_sha256"],
        "dataset_sha256": identity["dataset_sha256"],
        "student_sha256": record["phases"]["distill"]["sha256"],
        "baseline_sha256": (record["phases"].get("baseline") or {}).get("sha256"),
        "tokens": data.report(),
        "teacher": {
            **teacher_info,
            "perplexity": labels["teacher_perplexity"],
            "nll": labels["teacher_nll"],
            "accuracy": labels["teacher_accuracy"],
            "tokens_per_s": teacher_speed,
        },
        "student": student_metrics,
        "baseline": baseline_metrics,
        # The share of the CE-only student's perplexity that KD removes (> 0: KD helped).
        "kd_gain": 1.0 - s_ppl / b_ppl if b_ppl and math.isfinite(b_ppl) and math.isfinite(s_ppl) else None,
        "compression": teacher_info["parameters"] / student_metrics["parameters"],
        "speedup": student_metrics["tokens_per_s"]["batch_8"] / teacher_speed["batch_8"],
        "soft_labels": {
            "format": manifest["format"],
            "k": manifest["k"],
            "temperature": manifest["temperature"],
            "vocab_size": manifest["vocab_size"],
            "bytes_per_token": labels["bytes_per_token"],
            "stored_bytes": sum(s["stored_bytes"] for s in manifest["splits"].values()),
            "covered_mass": labels["covered_mass"],
        },
        "kl_at": None if loader is None else 1.0,
        "hyperparameters": record["hyperparameters"],
        "generations": generations,
        "generated_dataset": _generation_report(w, config, identity),
        "phases": {n: {k: v for k, v in p.items() if k != "history"} for n, p in record["phases"].items()},
    }


def _generation_report(w: Work, config: LMConfig, identity: dict[str, Any]) -> dict[str, Any] | None:
    """What the teacher wrote for a prompt-only dataset (None without `generate`)."""
    info = _generated(w, config) if config.generate is not None else None
    if info is None:
        return None
    seconds = info["seconds"]
    return {
        "file": GENERATED,
        "rows": info["rows"],
        "tokens": info["tokens"],
        "empty_completions": info["empty_completions"],
        "seconds": seconds,
        "tokens_per_s": info["tokens"] / seconds if seconds > 0 else None,
        "resumed_from": info["resumed_from"],
        "settings": config.generate,
        "prompts_sha256": identity["prompts_sha256"],
        "sha256": info["sha256"],
    }


def _default_prompts(windows: Any, tokenizer: Any) -> list[str]:
    """The first few tokens of the first windows (what the student was asked to continue, held out)."""
    prompts = []
    for ids, attention in zip(windows.input_ids, windows.attention_mask, strict=True):
        text = tokenizer.decode(ids[attention][:PROMPT_TOKENS].tolist(), skip_special_tokens=True).strip()
        if text:
            prompts.append(text)
        if len(prompts) == PROMPTS:
            break
    return prompts


def lm_export(work: Path, config: LMConfig) -> list[Path]:
    """out/student_hf.tar.gz (export_hf: a folder from_pretrained loads), out/model_card.json with the
    resolved config (enough to run the job again) and the headline, and out/report.json. A second call with
    the same student returns the files as they are."""
    w = Work(Path(work))
    report = lm_evaluate(work, config)  # measured here only when out/ was lost or names another student
    card_path, report_file, archive = w.out / MODEL_CARD, w.out / REPORT, w.out / ARCHIVE
    files = [archive] if "hf" in config.export_formats else []
    card = read_json(card_path)
    if (
        card
        and card.get("student_sha256") == report["student_sha256"]
        and card.get("formats") == config.export_formats
        and all(p.is_file() and sha256_file(p) == (card.get("files_sha256") or {}).get(p.name) for p in files)
    ):
        return [*files, card_path, report_file]

    fields = {
        "task": config.task,
        "student_sha256": report["student_sha256"],
        "teacher_sha256": report["teacher_sha256"],
        "dataset_sha256": report["dataset_sha256"],
        "config": config.to_dict(),
        "seed": config.seed,
        "formats": config.export_formats,
        "metrics": {**lm_headline(report), "hyperparameters": report["hyperparameters"]},
    }
    if files:
        teacher = _teacher(w, "cpu")  # its tokenizer goes into the folder
        student = _trained(config, teacher, _student_init(w), w.checkpoints / LM_CHECKPOINTS / STUDENT)
        export_hf(student, teacher.tokenizer, w.out, resolved=report["student"]["resolved"], card=fields)
        card = read_json(card_path) or {}
    else:
        card = {"resolved_config": report["student"]["resolved"], **fields}
    card["files_sha256"] = {p.name: sha256_file(p) for p in files}
    report["student"]["files"] = {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files
    }
    write_json(report_file, report)
    write_json(card_path, card)
    return [*files, card_path, report_file]


PARTIAL_ARCHIVE = "partial_student_hf.tar.gz"


def lm_partial_student(work: Path, config: LMConfig) -> Path | None:
    """work/partial/partial_student_hf.tar.gz from the newest verified weights (the finished student, else
    the distillation run's latest checkpoint), a folder `from_pretrained` loads; None when no epoch or
    checkpoint ever finished. What a cancel with keep_partial, or a run past max_runtime_s, leaves."""
    from worker.distill.checkpoints import load_latest_checkpoint

    w = Work(Path(work))
    folder = w.checkpoints / LM_CHECKPOINTS
    if (folder / STUDENT).is_file():
        state = torch.load(folder / STUDENT, map_location="cpu", weights_only=True)
    else:
        checkpoint = load_latest_checkpoint(folder / "kd")
        if checkpoint is None:
            return None
        state = checkpoint["model"]
    teacher = _teacher(w, "cpu")  # the student's family and its tokenizer
    student, resolved = _new_student(config, teacher, _student_init(w))
    student.load_state_dict(state)
    out = Path(work) / "partial"
    shutil.rmtree(out, ignore_errors=True)
    archive = export_hf(student, teacher.tokenizer, out, resolved=resolved, card={"partial": True})
    return archive.replace(out / PARTIAL_ARCHIVE)
