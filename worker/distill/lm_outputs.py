"""The evaluate and export stages of a causal-LM job, and the partial student a stopped one leaves: held-out
perplexity of teacher, student and CE-only baseline, agreement and KL against the stored targets, CPU
tokens/s, generations side by side (out/report.json, measured once per trained student); the student as a
Hugging Face folder (student_hf.tar.gz) and model_card.json. The LM counterpart of outputs.py.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from worker.distill.errors import (
    DistillError,
)
from worker.distill.lm_config import LMConfig
from worker.distill.lm_eval import evaluate_lm, generate_side_by_side, tokens_per_second
from worker.distill.lm_export import ARCHIVE, MODEL_CARD, export_hf
from worker.distill.lm_generate import (
    GENERATED,
)
from worker.distill.lm_summary import lm_headline
from worker.distill.softlabels import sha256_file
from worker.distill.token_softlabels import TokenTargetReader
from worker.distill.workfolder import Work, read_json, write_json

if TYPE_CHECKING:
    from transformers import PreTrainedModel

from worker.distill.lm_inputs import (
    BASELINE,
    LM_CHECKPOINTS,
    REPORT,
    STATE,
    STUDENT,
    generated_record,
    job_teacher,
    label_temperature,
    new_student,
    phase_done,
    phases_of,
    run_fingerprint,
    shards_to_cache,
    soft_labels_for,
    split_names,
    student_init_path,
    tokens_identity,
    trained_student,
)

SPEED_SECONDS = 0.5  # per model and batch size, for the report's CPU tokens/s
PROMPTS, PROMPT_TOKENS = 3, 8  # default generation prompts: the first tokens of the first held-out windows


def _finished_record(w: Work, config: LMConfig) -> dict[str, Any]:
    """checkpoints/lm/state.json of a distill stage that ran to the end for these inputs and settings."""
    folder = w.checkpoints / LM_CHECKPOINTS
    record = read_json(folder / STATE)
    key = run_fingerprint(tokens_identity(w, config), config, student_init_path(w))
    if (
        record is None
        or record.get("fingerprint") != key
        or not all(phase_done(folder, record, name) for name, *_ in phases_of(config))
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
    data, identity, manifest = soft_labels_for(w, config)
    split = split_names(data)[-1]  # the held-out windows; the training ones when nothing was held out
    windows = data.split(split)
    teacher = job_teacher(w, "cpu")
    init = student_init_path(w)
    folder = w.checkpoints / LM_CHECKPOINTS
    student = trained_student(config, teacher, init, folder / STUDENT)
    baseline = (
        trained_student(config, teacher, init, folder / BASELINE) if "baseline" in record["phases"] else None
    )
    # KL and agreement are at T = 1: sampled targets drawn at another temperature cannot be read at 1.
    loader = None
    if label_temperature(config) == 1.0:
        loader = TokenTargetReader(w.soft_labels, split, cache_shards=shards_to_cache(manifest, split)).take
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
    info = generated_record(w, config) if config.generate is not None else None
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
        teacher = job_teacher(w, "cpu")  # its tokenizer goes into the folder
        weights = w.checkpoints / LM_CHECKPOINTS / STUDENT
        student = trained_student(config, teacher, student_init_path(w), weights)
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
    teacher = job_teacher(w, "cpu")  # the student's family and its tokenizer
    student, resolved = new_student(config, teacher, student_init_path(w))
    student.load_state_dict(state)
    out = Path(work) / "partial"
    shutil.rmtree(out, ignore_errors=True)
    archive = export_hf(student, teacher.tokenizer, out, resolved=resolved, card={"partial": True})
    return archive.replace(out / PARTIAL_ARCHIVE)
