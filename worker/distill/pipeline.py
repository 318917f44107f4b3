"""The stages of one job over a local work folder (layout in docs/architecture.md), and `run_all`.

    work/inputs/{teacher,dataset,validation,student_init}/<file>
    work/soft_labels/     manifest.json + shards (softlabels.py)
    work/checkpoints/     the main run's epoch-*.pt + latest.json; finetune/ and baseline/ runs;
                          state.json (chosen T/alpha, why, histories), student.pt, baseline.pt (state dicts)
    work/out/             student.pt student.onnx student.safetensors model_card.json report.json

Every stage is safe to run twice: it reads what is already there and does only what is missing. Only
`soft_labels/` and `checkpoints/` travel between machines (the service mirrors them), so everything a later
stage needs from `distill` lives in `checkpoints/`; `out/` is rebuilt when it is missing. A change of teacher,
data or settings (a different fingerprint in state.json) discards the checkpoints instead of resuming them.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.distill.config import DistillConfig
from worker.distill.errors import DistillError
from worker.distill.evaluate import build_report, bytes_on_disk, count_parameters, cpu_latency_ms, predict
from worker.distill.export import FILENAMES, export_student, exportable, write_model_card
from worker.distill.softlabels import read_manifest, sha256_file, soft_label_stage
from worker.distill.summary import headline
from worker.distill.train import TensorData, train
from worker.distill.workfolder import (
    Loaded,
    Work,
    fingerprint,
    load_inputs,
    load_weights,
    new_student,
    prepare_inputs,
    read_json,
    save_weights,
    stored_soft_labels,
    teacher_parameters,
    write_json,
)

__all__ = ["distill", "evaluate", "export", "prepare_inputs", "preflight", "run_all", "soft_label"]

Progress = Callable[[dict[str, Any]], None]
SOFT_LABEL_BATCH = 1024
FINETUNE_LR_FACTOR = 0.1  # hard-label epochs refine the distilled weights, they must not undo them
STATE, STUDENT, BASELINE = "state.json", "student.pt", "baseline.pt"


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _emit(
    on_progress: Progress | None,
    stage: str,
    progress: float,
    epoch: int | None = None,
    *,
    phase: str | None = None,
    **metrics: Any,
):
    """One progress event. The distill stage trains up to three models in turn ("distill", "finetune",
    "baseline"; "autotune" before them) and each counts its epochs from 1, so `phase` says whose epoch it
    is: on the event and in its metrics (what the job row keeps), on every event, resumed runs included."""
    if on_progress is None:
        return
    if phase is not None:
        metrics = {"phase": phase, **metrics}
    event = {"stage": stage, "phase": phase, "progress": min(1.0, progress), "epoch": epoch}
    on_progress({**event, "metrics": metrics})


def preflight(work: Path, config: DistillConfig) -> dict[str, Any]:
    """Load teacher and data, validate them, run two samples through teacher and student; fail fast."""
    loaded, student = load_inputs(Work(Path(work)), config)
    return loaded.summary(student)


def soft_label(work: Path, config: DistillConfig, on_progress: Progress | None = None) -> dict[str, Any]:
    """Run the teacher once over train and validation rows; resumes at shard granularity."""
    w = Work(Path(work))
    loaded, _ = load_inputs(w, config)
    device = _device()
    teacher = loaded.teacher.to(device)
    splits = [("train", loaded.x, loaded.y)] + (
        [("val", loaded.x_val, loaded.y_val)] if loaded.has_val else []
    )
    total, done = sum(len(x) for _, x, _ in splits), 0
    manifest: dict[str, Any] = {}
    for split, x, y in splits:

        def progress(event: dict[str, Any], rows: int = len(x), offset: int = done) -> None:
            _emit(on_progress, "soft_label", (offset + event["progress"] * rows) / total, **event["metrics"])

        manifest = soft_label_stage(
            teacher,
            x,
            w.soft_labels,
            split=split,
            fmt=config.soft_label_format,
            k=config.topk,
            shard_size=config.shard_size,
            batch_size=SOFT_LABEL_BATCH,
            device=device,
            y=y,
            teacher_sha256=loaded.teacher_sha256,
            dataset_sha256=loaded.dataset_sha256,
            on_progress=progress,
        )
        done += len(x)
    teacher.to("cpu")
    return manifest


def _choose(
    train_data: TensorData,
    val_data: TensorData | None,
    loaded: Loaded,
    config: DistillConfig,
    on_progress: Progress | None,
    stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Method, temperature and alpha: as given, or from autotune's short runs where any is "auto"."""
    if "auto" not in (config.method, config.temperature, config.alpha):
        return {
            "method": config.method,
            "temperature": float(config.temperature),
            "alpha": float(config.alpha),
            "source": "given",
            "why": "set in the config",
        }
    from worker.distill.autotune import choose_hyperparameters

    _emit(on_progress, "distill", 0.0, None, phase="autotune")
    chosen = choose_hyperparameters(
        lambda: new_student(loaded, config), train_data, val_data, config.method, config,
        budget_epochs=config.epochs, stop=stop,
    )  # fmt: skip
    return {"source": "auto", **chosen}


def distill(
    work: Path,
    config: DistillConfig,
    on_progress: Progress | None = None,
    stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Choose T/alpha, train the student on the stored logits, fine-tune it, train the baseline.

    Each part is checkpointed and recorded in checkpoints/state.json as it finishes; a second call resumes
    the unfinished part (train() resumes mid-run from its epoch checkpoints) or returns the recorded result.
    `stop` is handed to every train() call: True raises `train.Stopped` with the last epoch checkpointed.
    """
    w = Work(Path(work))
    loaded, student = load_inputs(w, config)
    ckpt = w.checkpoints
    # Soft labels first: without them nothing below may touch the checkpoints.
    train_data = TensorData(loaded.x, loaded.y, stored_soft_labels(w, loaded, config, "train"))
    val_data = None
    if loaded.has_val:
        val_data = TensorData(loaded.x_val, loaded.y_val, stored_soft_labels(w, loaded, config, "val"))
    key = fingerprint(loaded, config)
    state = read_json(ckpt / STATE) or {}
    if state.get("fingerprint") != key:
        # Other inputs or settings: these checkpoints would resume a different run.
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(w.out, ignore_errors=True)
        state = {"fingerprint": key, "phases": {}}
    if state.get("done"):
        return _distill_result(state)

    labelled = train_data.has_labels
    finetune = config.finetune_epochs if labelled else 0
    baseline = config.epochs + finetune if config.baseline and labelled else 0
    total = config.epochs + finetune + baseline

    if "hyperparameters" not in state:
        state["hyperparameters"] = _choose(train_data, val_data, loaded, config, on_progress, stop)
        write_json(ckpt / STATE, state)
    hp = state["hyperparameters"]
    resolved = dataclasses.replace(
        config, method=hp.get("method", config.method), temperature=hp["temperature"], alpha=hp["alpha"]
    )

    def run(phase: str, model: nn.Module, offset: int, loss: str | None, folder: Path, **kw: Any) -> None:
        def on_epoch(record: dict[str, Any]) -> None:
            metrics = {k: v for k, v in record.items() if k != "epoch"}
            _emit(
                on_progress,
                "distill",
                (offset + record["epoch"]) / total,
                record["epoch"],
                phase=phase,
                **metrics,
            )

        result = train(
            model, train_data, val_data, loss, resolved, ckpt_dir=folder, on_epoch=on_epoch, stop=stop, **kw
        )
        state["phases"][phase] = {
            "epochs": len(result.history),
            "best_epoch": result.best_epoch,
            "best_metric": result.best_metric,
            "metric": result.metric,
            "history": result.history,
        }

    run("distill", student, 0, resolved.method, ckpt)
    if finetune:
        before = {k: v.clone() for k, v in student.state_dict().items()}
        run(
            "finetune",
            student,
            config.epochs,
            None,
            ckpt / "finetune",
            epochs=finetune,
            lr=config.finetune_lr or config.lr * FINETUNE_LR_FACTOR,
        )
        kept = _better(state["phases"]["finetune"], state["phases"]["distill"])
        if not kept:  # fine-tuning made validation worse: keep the distilled weights
            student.load_state_dict(before)
        state["phases"]["finetune"]["kept"] = kept
    save_weights(student, ckpt / STUDENT)
    write_json(ckpt / STATE, state)
    if baseline:
        model = new_student(loaded, config)
        run("baseline", model, config.epochs + finetune, None, ckpt / "baseline", epochs=baseline)
        save_weights(model, ckpt / BASELINE)
    state["done"] = True
    write_json(ckpt / STATE, state)
    return _distill_result(state)


def _better(new: dict[str, Any], old: dict[str, Any]) -> bool:
    if new["metric"] != old["metric"] or new["best_metric"] is None or old["best_metric"] is None:
        return True
    return new["best_metric"] >= old["best_metric"]


def _distill_result(state: dict[str, Any]) -> dict[str, Any]:
    return {"hyperparameters": state["hyperparameters"], "phases": state["phases"]}


def _report_path(w: Work) -> Path:
    return w.out / "report.json"


def evaluate(work: Path, config: DistillConfig) -> dict[str, Any]:
    """Accuracy, agreement, sizes and CPU latency of teacher, student and baseline; writes out/report.json."""
    w = Work(Path(work))
    state = read_json(w.checkpoints / STATE)
    if not state or not state.get("done"):
        raise DistillError(
            "the student is not trained yet: run the distill stage first", code="stage_not_done"
        )
    student_sha = sha256_file(w.checkpoints / STUDENT)
    report = read_json(_report_path(w))
    if report and report.get("student_sha256") == student_sha:
        return report

    loaded, _ = load_inputs(w, config)
    split = "val" if loaded.has_val else "train"
    x, y = (loaded.x_val, loaded.y_val) if loaded.has_val else (loaded.x, loaded.y)
    teacher_logits = stored_soft_labels(w, loaded, config, split)
    student = load_weights(loaded, config, w.checkpoints / STUDENT)
    baseline = (
        load_weights(loaded, config, w.checkpoints / BASELINE)
        if (w.checkpoints / BASELINE).is_file()
        else None
    )
    teacher = loaded.teacher.to("cpu")
    pre = loaded.preprocess
    exported = [w.out / name for name in FILENAMES.values() if (w.out / name).is_file()]
    report = build_report(
        y_val=y,
        teacher_logits=teacher_logits,
        student_logits=predict(student, x),
        baseline_logits=None if baseline is None else predict(baseline, x),
        teacher={
            "parameters": teacher_parameters(teacher, loaded.teacher_paths),
            "bytes": bytes_on_disk(loaded.teacher_paths),
            "latency_ms": cpu_latency_ms(lambda raw: teacher.logits(pre(raw)), loaded.raw_sample),
        },
        student={
            "spec": config.student if loaded.student_init is None else f"init:{loaded.student_init.name}",
            "parameters": count_parameters(student),
            "bytes": bytes_on_disk(exported) if exported else None,
            "latency_ms": cpu_latency_ms(exportable(student, pre), loaded.raw_sample),
        },
        hyperparameters={"method": config.method, **state["hyperparameters"]},
    )
    manifest = read_manifest(w.soft_labels) or {}
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
            },
            "phases": {
                name: {k: v for k, v in p.items() if k != "history"} for name, p in state["phases"].items()
            },
        }
    )
    write_json(_report_path(w), report)
    return report


def export(work: Path, config: DistillConfig) -> list[Path]:
    """Write the student in `config.export_formats`, `model_card.json`, and the sizes into report.json."""
    w = Work(Path(work))
    report = evaluate(work, config)
    files = [w.out / FILENAMES[fmt] for fmt in config.export_formats]
    card_path, report_path = w.out / "model_card.json", _report_path(w)
    card = read_json(card_path)
    if (
        card
        and card.get("student_sha256") == report["student_sha256"]
        and card.get("formats") == config.export_formats
        and all(p.is_file() for p in files)
    ):
        return [*files, card_path, report_path]

    loaded, _ = load_inputs(w, config)
    student = load_weights(loaded, config, w.checkpoints / STUDENT)
    metadata = {
        "arch": report["student"]["spec"],
        "input_shape": list(loaded.input_shape),
        "num_classes": loaded.num_classes,
        "class_names": loaded.class_names,
        "preprocess": dataclasses.asdict(config.preprocess),
    }
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
    write_json(report_path, report)
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
    return [*files, card_path, report_path]


def run_all(work: Path, config: DistillConfig, on_progress: Progress | None = None) -> dict[str, Any]:
    """Every stage in order; each skips what an earlier call already finished. Returns the report."""
    _emit(on_progress, "preflight", 0.0)
    preflight(work, config)
    _emit(on_progress, "preflight", 1.0)
    soft_label(work, config, on_progress)
    distill(work, config, on_progress)
    _emit(on_progress, "evaluate", 0.0)
    evaluate(work, config)
    _emit(on_progress, "evaluate", 1.0)
    _emit(on_progress, "export", 0.0)
    paths = export(work, config)
    _emit(on_progress, "export", 1.0, files=len(paths))
    return read_json(_report_path(Work(Path(work)))) or {}
