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
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from worker.distill.errors import DistillError, MismatchError
from worker.distill.lm_config import LMConfig
from worker.distill.lm_generate import (
    generate_completions,
    read_prompts,
)
from worker.distill.lm_summary import lm_headline
from worker.distill.lm_train import Stopped, train_lm
from worker.distill.progress import Progress, emit
from worker.distill.shard_plan import shard_indices
from worker.distill.softlabels import sha256_file
from worker.distill.token_softlabels import TokenTargetReader, token_soft_label_stage
from worker.distill.token_targets import id_dtype
from worker.distill.workfolder import Work, read_json, save_weights, write_json

if TYPE_CHECKING:
    from worker.distill.lm_teachers import LMTeacher
    from worker.distill.text_data import TokenData

from worker.distill.lm_inputs import (
    LM_CHECKPOINTS,
    STATE,
    TOKENS_INFO,
    check_length,
    default_device,
    file_sha256,
    forget_lm_teacher,
    generated_record,
    generation_identity,
    job_teacher,
    label_temperature,
    labels_complete,
    load_job_teacher,
    new_student,
    phase_done,
    phases_of,
    prompt_sample,
    run_fingerprint,
    save_tokens,
    shards_to_cache,
    soft_labels_for,
    split_names,
    stored_tokens,
    student_init_path,
    the_file,
    tokenize_dataset,
    tokens_identity,
)
from worker.distill.lm_outputs import lm_evaluate, lm_export, lm_partial_student

__all__ = [
    "Stopped",
    "forget_lm_teacher",
    "lm_distill",
    "lm_evaluate",
    "lm_export",
    "lm_generate",
    "lm_headline",
    "lm_partial_student",
    "lm_preflight",
    "lm_soft_label",
    "lm_soft_label_rows",
    "lm_split_rows",
    "load_job_teacher",
]

SOFT_LABEL_BATCH = {"cpu": 8, "cuda": 32}  # windows per teacher forward: (B, L, V) logits exist at a time
GENERATE_BATCH = {"cpu": 8, "cuda": 32}  # prompts per `generate` call (kept for the file's life: resume)
_AUTO_NOTE = "for causal_lm, method 'auto' means fkl at temperature 1 and alpha 1: no search is run"


def lm_generate(work: Path, config: LMConfig, on_progress: Progress | None = None) -> dict[str, Any] | None:
    """With `generate`: the teacher writes the completions of the dataset's prompts into
    soft_labels/generated.jsonl (lm_generate.py), resuming a stopped run at its last whole batch; returns
    generated.json. A finished file is returned without loading the teacher. None without `generate`."""
    if config.generate is None:
        return None
    w = Work(Path(work))
    done = generated_record(w, config)
    if done is not None:
        emit(on_progress, "generate", 1.0, resumed=True)
        return done
    prompts = read_prompts(the_file(w, "dataset"), config.text_column)
    device = default_device()
    teacher = job_teacher(w, device)
    settings = config.generate

    def on_batch(rows: int, total: int, tokens: int) -> None:
        emit(on_progress, "generate", rows / total, rows=rows, tokens=tokens)

    return generate_completions(
        teacher,
        prompts,
        w.soft_labels,
        identity=generation_identity(w, config),
        max_new_tokens=settings["max_new_tokens"],
        do_sample=settings["do_sample"],
        temperature=settings["temperature"],
        top_p=settings["top_p"],
        seed=settings["seed"],
        batch_size=GENERATE_BATCH.get(device.type, 8),
        on_batch=on_batch,
    )


def lm_preflight(work: Path, config: LMConfig) -> dict[str, Any]:
    """Load teacher and dataset, tokenize, build the student once and run two windows through both."""
    w = Work(Path(work))
    teacher = job_teacher(w, "cpu")
    check_length(config, teacher)
    if config.generate is None:
        data = tokenize_dataset(w, config, teacher)
        sample = data.split("train")
        ids, mask, dataset = sample.input_ids[:2].long(), sample.attention_mask[:2], data.report()
    else:  # the windows are made once the teacher has written the completions
        ids, mask, dataset = prompt_sample(w, config, teacher)
    student, resolved = new_student(config, teacher, student_init_path(w))
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
        "teacher": {**teacher.describe(), "sha256": file_sha256(the_file(w, "teacher"))},
        "dataset": {**dataset, "sha256": file_sha256(the_file(w, "dataset"))},
        "student": {k_: v for k_, v in resolved.items() if k_ != "config"},
        "soft_labels": {
            "format": config.soft_label_format,
            "k": config.k,
            "temperature": label_temperature(config),
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
    if config.generate is not None and generated_record(w, config) is None:
        lm_generate(work, config, on_progress)
    identity = tokens_identity(w, config)
    stored = stored_tokens(w, identity)
    if stored is not None:
        manifest = labels_complete(w, config, identity, stored[1], stored[0])
        if manifest is not None:
            emit(on_progress, "soft_label", 1.0, resumed=True)
            return manifest
    device = default_device()
    teacher, data, info = _teacher_and_windows(w, config, identity, stored, device)
    splits = split_names(data)
    rows = {split: len(data.split(split)) for split in splits}
    total, done = sum(rows.values()), 0
    manifest = {}
    for split in splits:
        manifest = token_soft_label_stage(
            teacher,
            data,
            w.soft_labels,
            split=split,
            on_progress=functools.partial(_split_progress, on_progress, done, rows[split], total),
            **_stage_settings(config, identity, device),
        )
        done += rows[split]
    # The windows these labels were made of: distill and a rerun check the manifest against them.
    info["labelled"] = {split: manifest["splits"][split]["data_sha256"] for split in splits}
    write_json(w.soft_labels / TOKENS_INFO, info)
    return manifest


def lm_split_rows(work: Path, config: LMConfig) -> dict[str, int] | None:
    """How many windows the soft-label stage labels per split, for splitting it over workers; None when
    the stage is not split: a dataset of prompts (`generate`: the completions are written first, in one
    task) or labels already complete. Tokenizes (once: tokens.npz) with the teacher's tokenizer."""
    w = Work(Path(work))
    if config.generate is not None:
        return None
    identity = tokens_identity(w, config)
    stored = stored_tokens(w, identity)
    if stored is not None and labels_complete(w, config, identity, stored[1], stored[0]) is not None:
        return None
    _, data, _ = _teacher_and_windows(w, config, identity, stored, default_device())
    return {split: len(data.split(split)) for split in split_names(data)}


def lm_soft_label_rows(
    work: Path,
    config: LMConfig,
    split: str,
    start: int,
    end: int,
    on_progress: Progress | None = None,
) -> dict[str, Any]:
    """One task of a soft-label stage split over workers: the shards covering windows [start, end) of
    `split` (whole shards, as `shard_plan.task_ranges` cut them), vouched for by their part file, which is
    returned. The same shard files, byte for byte, as `lm_soft_label` writes for those windows."""
    w = Work(Path(work))
    identity = tokens_identity(w, config)
    device = default_device()
    teacher, data, _ = _teacher_and_windows(w, config, identity, stored_tokens(w, identity), device)
    if split not in split_names(data):
        raise DistillError(f"this dataset has no {split!r} split to label", code="bad_shard_range")
    try:
        shards = shard_indices(start, end, config.shard_rows)
    except ValueError as exc:
        raise DistillError(str(exc), code="bad_shard_range") from None
    return token_soft_label_stage(
        teacher,
        data,
        w.soft_labels,
        split=split,
        shards=shards,
        on_progress=functools.partial(_split_progress, on_progress, 0, 1, 1),
        **_stage_settings(config, identity, device),
    )


def _teacher_and_windows(
    w: Work,
    config: LMConfig,
    identity: dict[str, Any],
    stored: tuple[TokenData, dict[str, Any]] | None,
    device: torch.device,
) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], TokenData, dict[str, Any]]:
    """The teacher's logits function, and the windows with their tokens.json: stored ones (the teacher then
    loads on the first batch it labels, so a stage whose shards are all vouched for, resumed or assembled
    from a split stage's tasks, never loads it), or tokenized now with the teacher's tokenizer, and saved."""
    if stored is not None:
        return _LazyTeacher(w, config, device), stored[0], stored[1]
    teacher = job_teacher(w, device)
    check_length(config, teacher)
    data = tokenize_dataset(w, config, teacher)
    return teacher.logits, data, save_tokens(w, identity, data)


class _LazyTeacher:
    def __init__(self, w: Work, config: LMConfig, device: torch.device) -> None:
        self.w, self.config, self.device = w, config, device
        self.teacher: LMTeacher | None = None

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.teacher is None:
            self.teacher = job_teacher(self.w, self.device)
            check_length(self.config, self.teacher)
        return self.teacher.logits(input_ids, attention_mask)


def _stage_settings(config: LMConfig, identity: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        "fmt": config.soft_label_format,
        "k": config.k,
        "temperature": label_temperature(config),
        "shard_rows": config.shard_rows,
        "batch_size": SOFT_LABEL_BATCH.get(device.type, 8),
        "seed": config.seed,
        "teacher_sha256": identity["teacher_sha256"],
        "dataset_sha256": identity["dataset_sha256"],
    }


def _split_progress(
    on_progress: Progress | None, offset: int, rows: int, total: int, event: dict[str, Any]
) -> None:
    """A shard event of one split, as progress over all windows (the splits run one after another)."""
    emit(on_progress, "soft_label", (offset + event["progress"] * rows) / total, **event["metrics"])


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
    hp["lr"] = config.lr
    if config.baseline:
        hp["baseline_lr"] = config.lr if config.baseline_lr is None else config.baseline_lr
    return hp


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
    data, identity, manifest = soft_labels_for(w, config)
    init = student_init_path(w)
    folder = w.checkpoints / LM_CHECKPOINTS
    key = run_fingerprint(identity, config, init)
    record = read_json(folder / STATE)
    if record is None or record.get("fingerprint") != key:
        # Other inputs or settings: these checkpoints would resume a different run, and out/ describes it.
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(w.out, ignore_errors=True)
        record = {"fingerprint": key, "hyperparameters": _hyperparameters(config), "phases": {}}
        write_json(folder / STATE, record)
    phases = phases_of(config)
    if all(phase_done(folder, record, name) for name, *_ in phases):
        return _result(record)

    teacher = job_teacher(w, "cpu")  # its config (and for teacher_layers its weights) make the student
    train, val = data.split("train"), data.split("val")
    reader = TokenTargetReader(w.soft_labels, "train", cache_shards=shards_to_cache(manifest, "train"))
    for index, (name, method, subfolder, weights) in enumerate(phases):
        if phase_done(folder, record, name):
            continue
        if stop is not None and stop():  # train_lm asks only once it runs: do not start a run to stop it
            raise Stopped(0, 0)
        student, resolved = new_student(config, teacher, init)
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
            lr=config.lr if name != "baseline" or config.baseline_lr is None else config.baseline_lr,
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
