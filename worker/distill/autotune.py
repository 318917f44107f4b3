"""Choose the method, temperature and alpha for "auto" by short trial runs, judged on validation.

Plain cross-entropy (alpha = 0) is always one of the trials, so "auto" can only pick distillation where it did
better than training on the labels alone. That matters: on Fashion-MNIST with all labels, the textbook T=4,
alpha=0.9 makes an MLP-32 student worse than training alone, while with few labels distillation gains points.
Rows without labels are distilled at full weight whatever alpha is (see losses.py), so alpha = 0 still
learns from the teacher there, and the temperature still matters for it.

Method "auto" (the default) adds the method to the grid: `AUTO_METHODS`, Hinton KD first so that it wins a
tie. DIST (Huang et al. 2022) is the other candidate because it is the one that measurably beats Hinton KD
on Fashion-MNIST in the default budget: +1.3 to +3.5 points over training alone on 3% of the labels where
Hinton KD gains +0.6 to +1.5, and on all the labels +0.74 / +0.22 (MLP-32 / MLP-128) where Hinton KD gained
+0.31 / +0.00. With a recipe that gives both arms far more steps, its lead over Hinton KD goes (both gain
about a point; bench/README.md). It matches the teacher's relations between classes and between rows (Pearson
correlations, blind to the scale and shift of the probabilities) rather than the exact distribution: the
relaxation its authors propose for a teacher much stronger than its student, which is the usual case here.

The search is sized against the run it tunes: each trial runs a quarter of its epochs on a seeded subset
small enough that all trials together cost at most `max_cost` times that run. A small training set (a full
run of at most `SMALL_RUN_SAMPLES` row-passes, e.g. 1,620 labelled rows x 10 epochs) gets full-length trials
on every row instead: a full run costs seconds there, and a quarter of one (26 optimizer steps) is too short
to rank the grid: few labels is exactly where distillation gains most, and where the choice matters.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from worker.distill.config import DistillConfig
from worker.distill.errors import ConfigError
from worker.distill.losses import METHODS, uses_temperature
from worker.distill.train import TensorData, train

TEMPERATURES = (1.0, 2.0, 4.0)
# soft_target tempers the teacher only: below 1 sharpens it, above 1 smooths it.
TEMPERATURES_BY_METHOD = {"soft_target": (0.5, 1.0, 2.0)}
# 0.0 first: on a tie, the run without distillation of labelled rows wins. 1.0 (teacher only) is the best
# fixed setting measured on 3% of Fashion-MNIST's labels (bench/README.md).
ALPHAS = (0.0, 0.5, 0.9, 1.0)
AUTO_METHODS = ("hinton", "dist")  # the candidates of method "auto", in tie-break order
SMALL_RUN_SAMPLES = 50_000
MIN_TRIAL_ROWS = 2048
HOLDOUT_FRACTION = 0.1


def choose_hyperparameters(
    student_factory: Callable[[], nn.Module],
    train_data: TensorData,
    val_data: TensorData | None,
    method: str,
    config: DistillConfig,
    *,
    budget_epochs: int,
    max_cost: float = 1.25,
    device: str | torch.device | None = None,
    stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """-> {"method", "temperature", "alpha", "why", "trials": [...], "metric"}; fixed values pass through.

    method: a `METHODS` name, or "auto" to choose among `AUTO_METHODS` as well.
    student_factory: builds a fresh, untrained student (called once per trial, under the same seed).
    budget_epochs: the epochs of the run being tuned; each trial runs max(1, budget_epochs // 4) of them,
    or all of them on a small training set (see the module docstring).
    max_cost: the whole search costs at most this many times a full run of budget_epochs epochs.
    stop: handed to every trial's train(): True raises `train.Stopped` (a cancel or a timeout during the
    search stops it within seconds; trials keep no checkpoint, a resumed stage searches again).
    """
    methods = AUTO_METHODS if method == "auto" else (method,)
    for name in methods:
        METHODS.get(name)  # an unknown method fails here, with the list of known ones
    auto_t, auto_a = config.temperature == "auto", config.alpha == "auto"
    labelled = train_data.y >= 0
    grid, notes = _grid(methods, config, any_labelled=bool(labelled.any()), all_labelled=bool(labelled.all()))
    if len(grid) <= 1:
        m, t, a = grid[0]
        return {
            "method": m,
            "temperature": config.temperature if not auto_t else t,
            "alpha": config.alpha if not auto_a else a,
            "why": "; ".join(notes) or "nothing to choose",
            "trials": [],
            "metric": None,
        }
    if train_data.teacher_logits is None:
        raise ConfigError("choosing temperature/alpha needs the teacher's logits for the training rows")

    trial_train, trial_val = _trial_split(train_data, val_data, config.seed)
    trial_epochs, trial_rows = _trial_size(
        len(trial_train), len(train_data), len(grid), budget_epochs, max_cost
    )
    order = torch.randperm(len(trial_train), generator=torch.Generator().manual_seed(config.seed))
    trial_train = trial_train.subset(order[:trial_rows])

    trials: list[dict[str, Any]] = []
    metric = "val_acc"
    for m, t, a in grid:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # every trial starts from the same initial weights
            student = student_factory()
        trial_config = dataclasses.replace(config, temperature=t, alpha=a)
        started = time.perf_counter()
        result = train(
            student, trial_train, trial_val, m, trial_config,
            epochs=trial_epochs, device=device, stop=stop,
        )  # fmt: skip
        metric = result.metric
        best = result.history[result.best_epoch - 1]
        trials.append(
            {
                "method": m,
                "temperature": t,
                "alpha": a,
                "score": result.best_metric,
                "val_acc": best["val_acc"],
                "agreement": best["agreement"],
                "seconds": time.perf_counter() - started,
            }
        )

    chosen = max(trials, key=lambda r: r["score"] if r["score"] is not None else -math.inf)  # first of ties
    plain = next((r for r in trials if r["alpha"] == 0.0), None)
    notes.insert(0, _explain(chosen, plain, trials, metric, trial_epochs, trial_rows, len(train_data)))
    return {
        "method": chosen["method"],
        "temperature": config.temperature if not auto_t else chosen["temperature"],
        "alpha": config.alpha if not auto_a else chosen["alpha"],
        "why": "; ".join(notes),
        "trials": trials,
        "metric": metric,
        "trial_epochs": trial_epochs,
        "trial_rows": trial_rows,
    }


def _grid(
    methods: tuple[str, ...], config: DistillConfig, *, any_labelled: bool, all_labelled: bool
) -> tuple[list[tuple[str, float, float]], list[str]]:
    """The trials, (method, T, alpha) each, and notes on what was fixed and why (for the report's "why")."""
    auto_t, auto_a = config.temperature == "auto", config.alpha == "auto"
    notes: list[str] = []
    alphas: tuple[float, ...] = ALPHAS if auto_a else (float(config.alpha),)
    if auto_a and not any_labelled:
        alphas = (1.0,)
        notes.append(
            "every training row is unlabelled, so alpha has no effect (each row is distilled at full "
            "weight); alpha = 1.0"
        )
    for name in methods:
        if auto_t and not uses_temperature(name):
            notes.append(f"{name} does not use a temperature (T = 1.0 is recorded)")
    if not auto_t:
        notes.append(f"T = {config.temperature} was set in the config")
    if not auto_a:
        notes.append(f"alpha = {config.alpha} was set in the config")

    def temperatures(name: str) -> tuple[float, ...]:
        if not auto_t:
            return (float(config.temperature),)
        return TEMPERATURES_BY_METHOD.get(name, TEMPERATURES) if uses_temperature(name) else (1.0,)

    grid = [(m, t, a) for m in methods for a in alphas for t in temperatures(m)]
    if all_labelled:
        # With every row labelled, alpha = 0 is plain cross-entropy whatever the method and T: one trial.
        plain = next((g for g in grid if g[2] == 0.0), None)
        grid = [g for g in grid if g[2] != 0.0 or g is plain]
    return grid, notes


def _trial_size(
    available: int, train_rows: int, trials: int, budget_epochs: int, max_cost: float
) -> tuple[int, int]:
    """Epochs and rows of each trial, from `available` trial rows (sizing: the module docstring)."""
    if available * budget_epochs <= SMALL_RUN_SAMPLES:
        return budget_epochs, available
    epochs = max(1, budget_epochs // 4)
    rows_in_budget = max_cost * budget_epochs * train_rows / (trials * epochs)
    return epochs, min(available, max(MIN_TRIAL_ROWS, int(rows_in_budget)))


def _trial_split(
    train_data: TensorData, val_data: TensorData | None, seed: int
) -> tuple[TensorData, TensorData]:
    """Trials need something to be judged on: the validation split, or else a seeded holdout of train."""
    if (
        val_data is not None
        and len(val_data)
        and (val_data.has_labels or val_data.teacher_logits is not None)
    ):
        return train_data, val_data
    order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(seed + 1))
    n_val = max(1, int(len(train_data) * HOLDOUT_FRACTION))
    return train_data.subset(order[n_val:]), train_data.subset(order[:n_val])


def _explain(
    chosen: dict[str, Any],
    plain: dict[str, Any] | None,
    trials: list[dict[str, Any]],
    metric: str,
    epochs: int,
    rows: int,
    total: int,
) -> str:
    label = {"val_acc": "validation accuracy", "agreement": "agreement with the teacher on validation"}
    what = label.get(metric, metric)
    methods = list(dict.fromkeys(r["method"] for r in trials))
    temps = sorted({r["temperature"] for r in trials})
    alphas = sorted({r["alpha"] for r in trials})
    over = f"method in {methods} x " if len(methods) > 1 else ""
    pick = f"method {chosen['method']}, " if len(methods) > 1 else ""
    text = (
        f"{len(trials)} trial runs ({epochs} epoch(s) on {rows} of {total} training rows) over "
        f"{over}T in {temps} x alpha in {alphas}: {pick}T = {chosen['temperature']}, "
        f"alpha = {chosen['alpha']} had the best {what} ({chosen['score']:.4f})"
    )
    if plain is not None and plain is not chosen:
        text += f"; hard labels alone (alpha = 0) reached {plain['score']:.4f}"
    elif plain is chosen:
        text += "; distilling the labelled rows did not beat their hard labels, so alpha = 0"
    return text
