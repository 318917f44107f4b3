"""The distill stage: choose T/alpha, distil the student, fine-tune it, train the baseline; all resumable.

Each training run is a `_Phase`; `_Runs.run` trains one and returns its entry for state.json, so the stage
reads top to bottom as a sequence of phases whose records flow back by return value. With `procs` > 1 each
phase trains data-parallel on that many processes (data_parallel.py); autotune's trials run before, on one.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from worker.distill.config import DistillConfig
from worker.distill.data_parallel import train_data_parallel
from worker.distill.distill_record import BASELINE, STATE, STUDENT, DistillRecord
from worker.distill.inputs import (
    Loaded,
    fingerprint,
    load_inputs,
    new_student,
    stored_targets,
    stored_views,
)
from worker.distill.progress import Progress, emit
from worker.distill.train import TensorData, train
from worker.distill.workfolder import Work, save_weights

FINETUNE_LR_FACTOR = 0.1  # hard-label epochs refine the distilled weights, they must not undo them


@dataclass(frozen=True)
class _Phase:
    """One training run of the distill stage; progress counts epochs across all of the stage's runs."""

    name: str  # "distill", "finetune" or "baseline": its name in progress events and state.json
    first_epoch: int  # epochs of the runs before it
    loss: str | None  # a METHODS name, or None for cross-entropy on the labelled rows
    folder: Path  # its epoch checkpoints, which train() resumes from
    epochs: int | None = None  # None: the config's
    lr: float | None = None


@dataclass(frozen=True)
class _Runs:
    """What the distill stage's training runs share: data, resolved settings, where progress goes."""

    train_data: TensorData
    val_data: TensorData | None
    config: DistillConfig  # with the chosen method, temperature and alpha
    total_epochs: int
    on_progress: Progress | None
    stop: Callable[[], bool] | None
    procs: int = 1  # processes each run trains on; 1: train() in this process, nothing spawned

    def run(self, phase: _Phase, model: nn.Module) -> dict[str, Any]:
        """Train `model` in place (resuming from the phase's checkpoints); the phase's state.json entry."""
        trainer = train if self.procs == 1 else functools.partial(train_data_parallel, self.procs)
        result = trainer(
            model,
            self.train_data,
            self.val_data,
            phase.loss,
            self.config,
            ckpt_dir=phase.folder,
            on_epoch=functools.partial(self._epoch_done, phase),
            stop=self.stop,
            epochs=phase.epochs,
            lr=phase.lr,
        )
        return {
            "epochs": len(result.history),
            "best_epoch": result.best_epoch,
            "best_metric": result.best_metric,
            "metric": result.metric,
            "history": result.history,
        }

    def _epoch_done(self, phase: _Phase, record: dict[str, Any]) -> None:
        metrics = {k: v for k, v in record.items() if k != "epoch"}
        progress = (phase.first_epoch + record["epoch"]) / self.total_epochs
        emit(self.on_progress, "distill", progress, record["epoch"], phase=phase.name, **metrics)


def distill(
    work: Path,
    config: DistillConfig,
    on_progress: Progress | None = None,
    stop: Callable[[], bool] | None = None,
    procs: int = 1,
) -> dict[str, Any]:
    """Choose T/alpha, train the student on the stored logits, fine-tune it, train the baseline.

    Each part is checkpointed and recorded in checkpoints/state.json as it finishes; a second call resumes
    the unfinished part (train() resumes mid-run from its epoch checkpoints) or returns the recorded result.
    `stop` is handed to every train() call: True raises `train.Stopped` with the last epoch checkpointed.
    `procs`: processes each training run uses, data-parallel (autotune always runs on one).
    """
    w = Work(Path(work))
    loaded, student = load_inputs(w, config)
    ckpt = w.checkpoints
    # Soft labels first: without them nothing below may touch the checkpoints.
    train_data = TensorData(
        loaded.x, loaded.y, stored_targets(w, loaded, config, "train"), stored_views(w, loaded, config)
    )
    val_data = None
    if loaded.x_val is not None and loaded.y_val is not None:
        val_data = TensorData(loaded.x_val, loaded.y_val, stored_targets(w, loaded, config, "val"))
    record = _record_for(w, fingerprint(loaded, config))
    if record.done:
        return record.result()

    labelled = train_data.has_labels
    finetune = config.finetune_epochs if labelled else 0
    baseline = config.epochs + finetune if config.baseline and labelled else 0
    hp = record.hyperparameters
    if hp is None:
        hp = _choose(train_data, val_data, loaded, config, on_progress, stop)
        record = dataclasses.replace(record, hyperparameters=hp)
        record.write(ckpt / STATE)
    resolved = dataclasses.replace(
        config, method=hp.get("method", config.method), temperature=hp["temperature"], alpha=hp["alpha"]
    )
    total = config.epochs + finetune + baseline
    runs = _Runs(train_data, val_data, resolved, total, on_progress, stop, procs)

    # Every phase runs again on a resumed call: a finished one only reloads its last checkpoint.
    phases = dict(record.phases)
    phases["distill"] = runs.run(_Phase("distill", 0, resolved.method, ckpt), student)
    if finetune:
        distilled = {k: v.clone() for k, v in student.state_dict().items()}
        lr = config.finetune_lr or config.lr * FINETUNE_LR_FACTOR
        tuning = _Phase("finetune", config.epochs, None, ckpt / "finetune", epochs=finetune, lr=lr)
        tuned = runs.run(tuning, student)
        kept = _better(tuned, phases["distill"])
        if not kept:  # fine-tuning made validation worse: keep the distilled weights
            student.load_state_dict(distilled)
        phases["finetune"] = {**tuned, "kept": kept}
    save_weights(student, ckpt / STUDENT)
    record = dataclasses.replace(record, phases=dict(phases))
    record.write(ckpt / STATE)
    if baseline:
        model = new_student(loaded, config)
        same_budget = _Phase("baseline", config.epochs + finetune, None, ckpt / "baseline", epochs=baseline)
        phases["baseline"] = runs.run(same_budget, model)
        save_weights(model, ckpt / BASELINE)
    record = dataclasses.replace(record, phases=phases, done=True)
    record.write(ckpt / STATE)
    return record.result()


def _record_for(w: Work, key: str) -> DistillRecord:
    """The distill stage's record for these inputs and settings (`key`); another run's outputs are removed."""
    record = DistillRecord.read(w.checkpoints / STATE)
    if record is not None and record.fingerprint == key:
        return record
    # Other inputs or settings: these checkpoints would resume a different run.
    shutil.rmtree(w.checkpoints, ignore_errors=True)
    shutil.rmtree(w.out, ignore_errors=True)
    return DistillRecord(fingerprint=key)


def _better(new: dict[str, Any], old: dict[str, Any]) -> bool:
    if new["metric"] != old["metric"] or new["best_metric"] is None or old["best_metric"] is None:
        return True
    return bool(new["best_metric"] >= old["best_metric"])


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

    emit(on_progress, "distill", 0.0, None, phase="autotune")
    chosen = choose_hyperparameters(
        lambda: new_student(loaded, config), train_data, val_data, config.method, config,
        budget_epochs=config.epochs, stop=stop,
    )  # fmt: skip
    return {"source": "auto", **chosen}
