"""The evaluate and export stages: everything in out/ (report.json, the exported student, model_card.json).

The report is measured once per trained student and written to out/report.json; export reads it back (and
adds the exported files' sizes). out/ is not mirrored between machines, so a stage that finds no report for
the current student.pt measures it again from checkpoints/ alone.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.distill.augment import view_params_name, view_split
from worker.distill.config import DistillConfig
from worker.distill.distill_record import BASELINE, STUDENT, DistillRecord, finished_record
from worker.distill.errors import ConfigError
from worker.distill.evaluate import (
    build_report,
    bytes_on_disk,
    count_parameters,
    cpu_latency_ms,
    predict,
    text_latency_ms,
)
from worker.distill.export import FILENAMES, export_safetensors, export_student, exportable, write_model_card
from worker.distill.inputs import Loaded, load_inputs, load_weights, stored_soft_labels, teacher_parameters
from worker.distill.softlabels import read_manifest, sha256_file
from worker.distill.summary import headline
from worker.distill.text_export import HF_ARCHIVE, export_text_hf, export_text_onnx
from worker.distill.text_teachers import encode_texts
from worker.distill.workfolder import Work, read_json, write_json

# What export copies from the report into the model card, besides headline()'s figures and the student's spec.
_EXPORT_READS = ("teacher_sha256", "dataset_sha256", "hyperparameters")


def report_path(w: Work) -> Path:
    return w.out / "report.json"


def _stored_report(w: Work, student_sha: str) -> dict[str, Any] | None:
    """out/report.json if it describes this student and holds what export reads; None if it needs redoing."""
    try:
        report = read_json(report_path(w))
        if not report or report.get("student_sha256") != student_sha:
            return None
        headline(report)  # the figures the job and the model card show: KeyError/TypeError if one is missing
        if "spec" not in report["student"] or not all(key in report for key in _EXPORT_READS):
            return None
    except (ValueError, KeyError, TypeError, AttributeError):  # a torn or hand-edited file: measure again
        return None
    return report


def evaluate(work: Path, config: DistillConfig) -> dict[str, Any]:
    """Accuracy, agreement, sizes and CPU latency of teacher, student and baseline; writes out/report.json.

    Measured once per trained student: while out/report.json names this student.pt, it is returned as is.
    """
    return _evaluated(Work(Path(work)), config)


def _evaluated(w: Work, config: DistillConfig) -> dict[str, Any]:
    record = finished_record(w)
    student_sha = sha256_file(w.checkpoints / STUDENT)
    report = _stored_report(w, student_sha)
    if report is None:
        report = _measure(w, config, record, student_sha)
        write_json(report_path(w), report)
    return report


def _measure(w: Work, config: DistillConfig, record: DistillRecord, student_sha: str) -> dict[str, Any]:
    loaded, _ = load_inputs(w, config)
    split = "val" if loaded.has_val else "train"
    x, y = loaded.x, loaded.y
    if loaded.x_val is not None and loaded.y_val is not None:
        x, y = loaded.x_val, loaded.y_val
    teacher_logits = stored_soft_labels(w, loaded, config, split)
    student = load_weights(loaded, config, w.checkpoints / STUDENT)
    baseline = (
        load_weights(loaded, config, w.checkpoints / BASELINE)
        if (w.checkpoints / BASELINE).is_file()
        else None
    )
    teacher = loaded.teacher.to("cpu")
    pre = loaded.preprocess
    exported = [w.out / name for name in _filenames(loaded).values() if (w.out / name).is_file()]
    if loaded.text is not None:  # per text, one at a time, tokenization included
        encode, texts = _text_encoder(loaded, config), loaded.text.sample_texts
        teacher_ms = text_latency_ms(teacher.logits, encode, texts)
        student_ms = text_latency_ms(student, encode, texts)
    else:  # a batch of evaluate.LATENCY_BATCH rows, preprocessing included
        teacher_ms = cpu_latency_ms(lambda raw: teacher.logits(pre(raw)), loaded.raw_sample)
        student_ms = cpu_latency_ms(exportable(student, pre), loaded.raw_sample)
    report = build_report(
        y_val=y,
        teacher_logits=teacher_logits,
        student_logits=predict(student, x),
        baseline_logits=None if baseline is None else predict(baseline, x),
        teacher={
            "parameters": teacher_parameters(teacher, loaded.teacher_paths),
            "bytes": bytes_on_disk(loaded.teacher_paths),
            "latency_ms": teacher_ms,
        },
        student={
            "spec": config.student if loaded.student_init is None else f"init:{loaded.student_init.name}",
            "parameters": count_parameters(student),
            "bytes": bytes_on_disk(exported) if exported else None,
            "latency_ms": student_ms,
        },
        hyperparameters={"method": config.method, **(record.hyperparameters or {})},
    )
    manifest = read_manifest(w.soft_labels) or {}
    if loaded.text is not None:
        report["text"] = loaded.text.stats.as_dict() | {"latency": "ms per text, tokenization included"}
    report.update(
        {
            "evaluated_on": split,
            "student_sha256": student_sha,
            "teacher_sha256": loaded.teacher_sha256,
            "dataset_sha256": loaded.dataset_sha256,
            "soft_labels": {
                "format": manifest.get("format"),
                "k": manifest.get("k"),
                "teacher_accuracy": {s: v.get("teacher_accuracy") for s, v in manifest["splits"].items()},
                **_views_summary(w, config, manifest, len(loaded.y)),
            },
            "phases": {
                name: {k: v for k, v in p.items() if k != "history"} for name, p in record.phases.items()
            },
        }
    )
    return report


def _views_summary(w: Work, config: DistillConfig, manifest: dict[str, Any], rows: int) -> dict[str, Any]:
    """With `augment`: the stored views, the teacher's accuracy on them, and what a training image costs on
    disk (its logits on every view and the views' parameters, beside its plain soft labels)."""
    if config.augment is None:
        return {}
    names = [view_split(v) for v in range(config.views)]
    accuracy = [manifest["splits"].get(name, {}).get("teacher_accuracy") for name in names]
    files = [w.soft_labels / view_params_name(v) for v in range(config.views)]
    splits = [manifest["splits"].get(name, {}) for name in names]
    files += [w.soft_labels / entry["name"] for split in splits for entry in split.get("shards", [])]
    stored = sum(f.stat().st_size for f in files if f.is_file())
    known = [a for a in accuracy if a is not None]
    return {
        "views": {
            "count": config.views,
            "augment": config.augment,
            "teacher_accuracy": sum(known) / len(known) if known else None,
            "bytes_per_image": stored / max(rows, 1),
        }
    }


def export(work: Path, config: DistillConfig) -> list[Path]:
    """Write the student in `config.export_formats`, `model_card.json`, and the sizes into report.json."""
    w = Work(Path(work))
    # The evaluate stage's report, read back; measured here only when out/ was lost (it is not mirrored
    # between machines, and export must work from checkpoints/ alone) or names another student.
    report = _evaluated(w, config)
    loaded, _ = load_inputs(w, config)
    names = _filenames(loaded)
    files = [w.out / names[fmt] for fmt in config.export_formats]
    card_path, report_file = w.out / "model_card.json", report_path(w)
    card = read_json(card_path)
    if (
        card
        and card.get("student_sha256") == report["student_sha256"]
        and card.get("formats") == config.export_formats
        and all(p.is_file() for p in files)
    ):
        return [*files, *_beside(loaded, files), card_path, report_file]

    student = load_weights(loaded, config, w.checkpoints / STUDENT)
    metadata = {
        "arch": report["student"]["spec"],
        "input_shape": list(loaded.input_shape),
        "num_classes": loaded.num_classes,
        "class_names": loaded.class_names,
        "preprocess": dataclasses.asdict(config.preprocess),
    }
    if loaded.text is not None:
        metadata |= {"input": "token ids (tokenizer.json)", "text": report["text"]}
        files = _export_text(student, loaded, w.out, config.export_formats, metadata)
    else:
        files = export_student(
            student,
            loaded.preprocess,
            w.out,
            sample=loaded.raw_sample,
            formats=config.export_formats,
            metadata=metadata,
        )
    report["student"]["bytes"] = bytes_on_disk(files)
    report["student"]["files"] = {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files
    }
    write_json(report_file, report)
    hp = report["hyperparameters"]
    write_model_card(
        card_path,
        {
            "student_sha256": report["student_sha256"],
            "teacher_sha256": report["teacher_sha256"],
            "dataset_sha256": report["dataset_sha256"],
            "config": config.to_dict()
            | {"method": hp["method"], "temperature": hp["temperature"], "alpha": hp["alpha"]},
            "seed": config.seed,
            "formats": config.export_formats,
            "files": report["student"]["files"],
            "student": metadata,
            "metrics": {**headline(report), "hyperparameters": hp},
        },
    )
    return [*files, *_beside(loaded, files), card_path, report_file]


def _filenames(loaded: Loaded) -> dict[str, str]:
    return FILENAMES if loaded.text is None else {**FILENAMES, "hf": HF_ARCHIVE}


def _beside(loaded: Loaded, files: list[Path]) -> list[Path]:
    """tokenizer.json travels with a text student's ONNX file (its input is the tokenizer's ids)."""
    if loaded.text is None or not any(p.name == FILENAMES["onnx"] for p in files):
        return []
    return [p.parent / "tokenizer.json" for p in files if p.name == FILENAMES["onnx"]]


def _text_encoder(loaded: Loaded, config: DistillConfig) -> Any:
    assert loaded.text is not None
    tokenizer, pad = loaded.text.teacher.tokenizer, loaded.text.teacher.pad_id

    def encode(text: str) -> torch.Tensor:
        return torch.from_numpy(encode_texts(tokenizer, [text], config.max_length, pad)[0])

    return encode


def _export_text(
    student: nn.Module, loaded: Loaded, out: Path, formats: list[str], metadata: dict[str, Any]
) -> list[Path]:
    """A text student as a Hugging Face folder (tar.gz), ONNX (input_ids + attention_mask -> logits, with
    tokenizer.json beside) and safetensors; the formats were checked against the student at submission."""
    assert loaded.text is not None
    tokenizer = loaded.text.teacher.tokenizer
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        if fmt == "hf":
            written.append(export_text_hf(student, tokenizer, out))
        elif fmt == "onnx":
            written.append(export_text_onnx(student, tokenizer, out, loaded.raw_sample[:8]))
        elif fmt == "safetensors":
            path = out / FILENAMES["safetensors"]
            tmp = path.with_name(path.name + ".partial")
            export_safetensors(student, tmp, metadata)
            tmp.replace(path)
            written.append(path)
        else:
            raise ConfigError(f"a text student cannot be exported as {fmt}", field="export_formats")
    return written
