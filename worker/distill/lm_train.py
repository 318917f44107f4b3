"""Token-level distillation of a causal LM: one function, read top to bottom. KD and the CE-only baseline.

The windows stay on the host and each batch fetches only its own teacher targets (`targets_loader(rows)`),
so the soft-label store never has to fit in memory. A checkpoint holds everything the rest of the run
depends on (weights, optimizer, schedule, every RNG, the epoch's row order and position in it, the best
weights, the history); one is written after every epoch, every `checkpoint_every_steps` steps and when
`stop()` asks, so a run stopped or killed mid-epoch and resumed ends with the same weights, bit for bit on
CPU, as a run that was never stopped. Checkpoints are numbered by optimizer step (`epoch-<step>.pt`), the
only count that grows at each of those points.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.distill.checkpoints import capture_rng, load_latest_checkpoint, restore_rng, save_checkpoint
from worker.distill.errors import ConfigError
from worker.distill.lm_eval import (
    TargetsLoader,
    TokenWindows,
    autocast_for,
    evaluate_lm,
    next_token_targets,
    predict,
    shift_labels,
)
from worker.distill.lm_losses import IGNORE_INDEX, LM_METHODS, token_kd_loss

STOP_CHECK_SECONDS = 5.0  # how often a running epoch asks `stop()`; the service's hook may query a database
WARMUP_FRACTION = 0.05  # of all steps, linear from 0; then cosine to 0
CE_ONLY = "ce"


@dataclass
class LMTrainResult:
    history: list[dict[str, Any]]  # one on_epoch record per epoch
    best_epoch: int  # the epoch whose weights the student holds now
    best_perplexity: float | None  # its held-out perplexity (None without validation windows)
    metric: str  # what "best" means: "val_perplexity", or "last" (nothing to validate on)
    steps: int  # optimizer steps taken in the whole run, resumed ones included
    resumed_from: int | None = None  # the step this call resumed from
    seconds: float = 0.0


class Stopped(Exception):  # noqa: N818 - reads as "training stopped", raised on request, not a fault
    """`stop()` returned True; a checkpoint at this step (given a ckpt_dir) resumes the run exactly."""

    def __init__(self, epoch: int, step: int) -> None:
        super().__init__(f"training stopped on request in epoch {epoch}, after step {step}")
        self.epoch, self.step = epoch, step


def train_lm(
    student: nn.Module,
    train_windows: TokenWindows,
    val_windows: TokenWindows | None,
    targets_loader: TargetsLoader | None,
    *,
    method: str,
    alpha: float,
    temperature: float,
    beta: float,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    grad_clip: float | None,
    seed: int,
    ckpt_dir: Path | None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    stop: Callable[[], bool] | None = None,
    checkpoint_every_steps: int | None = None,
    device: str | torch.device | None = None,
) -> LMTrainResult:
    """Train `student` (a Hugging Face causal LM) in place; it ends holding its best-on-validation weights.

    train_windows / val_windows: `text_data.TokenData`, (N, L) ids with attention and loss masks.
    targets_loader: row indices (B,) int64 of train_windows -> their teacher targets (B, L, k), in that order.
    method: an `lm_losses.LM_METHODS` name (fkl, rkl, gkd), mixed with CE by `alpha` at `temperature`; or
      "ce", the baseline: next-token cross-entropy alone on the same tokens and steps (no targets read).
    ckpt_dir: one folder per run; a valid checkpoint there from the same settings is resumed.
    stop: polled every STOP_CHECK_SECONDS and each epoch; True -> checkpoint, then raise `Stopped`.
    """
    started = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    distilling = method != CE_ONLY
    if distilling:
        LM_METHODS.get(method)  # an unknown method fails here, before any step
        if targets_loader is None:
            raise ConfigError(f"method {method!r} needs the teacher's soft labels", field="method")
    input_ids, attention, loss_mask = (
        train_windows.input_ids,
        train_windows.attention_mask,
        train_windows.loss_mask,
    )
    n, length = input_ids.shape
    if n == 0 or length < 2:
        raise ConfigError(f"no training windows of 2 or more tokens (got {n} x {length})", field="dataset")
    if batch_size < 1 or epochs < 1:
        raise ConfigError("batch_size and epochs must be at least 1", field="batch_size")
    val = val_windows if val_windows is not None and len(val_windows.input_ids) else None

    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = epochs * steps_per_epoch
    warmup = max(1, round(WARMUP_FRACTION * total_steps))
    torch.manual_seed(seed)  # dropout, and anything else random inside a step
    order = torch.Generator().manual_seed(seed)  # the epoch permutations, on CPU for portability
    student.to(device)
    # No weight decay on norms and biases (1-D): decaying a norm's gain towards 0 only fights the data.
    params = [p for p in student.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr, fused=device.type in ("cpu", "cuda"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / total_steps, 1.0))))
    )
    run = {  # all that decides the trajectory: a checkpoint only resumes a run that agrees on all of it
        "method": method,
        "alpha": float(alpha) if distilling else 0.0,
        "temperature": float(temperature) if distilling else 1.0,
        "beta": float(beta) if method == "gkd" else None,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "grad_clip": grad_clip,
        "seed": seed,
        "windows": [n, length],
        "warmup": warmup,
    }

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": 0, "metric": None, "state": None}
    step, start_epoch, resumed_from = 0, 1, None
    resume_at: dict[str, Any] | None = None  # the epoch in progress at the checkpoint, if any
    checkpoint = load_latest_checkpoint(ckpt_dir) if ckpt_dir is not None else None
    if checkpoint is not None and checkpoint.get("run") == run:
        student.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        restore_rng(checkpoint["rng"], order)
        history, best, step = checkpoint["history"], checkpoint["best"], checkpoint["step"]
        resumed_from = step
        start_epoch = checkpoint["epoch"] + 1  # the last completed epoch + 1
        if checkpoint["position"] > 0:
            resume_at = {k: checkpoint[k] for k in ("position", "perm", "sums")}
    # A checkpoint from other settings belongs to another run: start over (and overwrite it as we go).

    def save(epoch_done: int, position: int, perm: Tensor | None, sums: Tensor | None) -> None:
        if ckpt_dir is None:
            return
        state = {
            "format": 1,
            "run": run,
            "step": step,
            "epoch": epoch_done,
            "position": position,  # batches of epoch `epoch_done + 1` already taken, in `perm` order
            "perm": perm,
            "sums": None if sums is None else sums.cpu(),
            "model": student.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": capture_rng(order),
            "best": best,
            "history": history,
            "config": run,
        }
        save_checkpoint(ckpt_dir, step, state)

    autocast = autocast_for(device)
    metric_name = "val_perplexity" if val is not None else "last"
    student.train()
    for epoch in range(start_epoch, epochs + 1):
        epoch_started = last_stop_check = time.perf_counter()
        if resume_at is not None:  # the epoch the checkpoint was taken in: same order, same running sums
            perm, first, sums = resume_at["perm"], resume_at["position"], resume_at["sums"].to(device)
            resume_at = None
        else:
            perm, first = torch.randperm(n, generator=order), 0
            sums = torch.zeros(3, dtype=torch.float64, device=device)
        for position in range(first, steps_per_epoch):
            rows = perm[position * batch_size : (position + 1) * batch_size]
            ids = input_ids[rows].to(device, non_blocking=True)
            labels, mask = shift_labels(ids, loss_mask[rows].to(device, non_blocking=True))
            with autocast:
                logits = predict(student, ids, attention[rows].to(device, non_blocking=True))
            if distilling:
                targets = next_token_targets(targets_loader(rows), length).to(device)  # type: ignore[misc]
                loss, parts = token_kd_loss(
                    method, logits, targets, labels, mask, alpha=alpha, temperature=temperature, beta=beta
                )
                kd = parts["kd"]
            else:
                loss = _causal_ce(logits, labels)
                kd = torch.zeros((), device=device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            # The running sums stay on the device: an .item() per step would stall a GPU.
            ce = parts["ce"] if distilling else loss.detach()
            sums += torch.stack([loss.detach(), kd, ce]).double()

            taken = position + 1
            if taken < steps_per_epoch and checkpoint_every_steps and step % checkpoint_every_steps == 0:
                save(epoch - 1, taken, perm, sums)
            if stop is not None and time.perf_counter() - last_stop_check > STOP_CHECK_SECONDS:
                last_stop_check = time.perf_counter()
                if taken < steps_per_epoch and stop():
                    save(epoch - 1, taken, perm, sums)
                    raise Stopped(epoch, step)

        seconds = time.perf_counter() - epoch_started
        mean = (sums / steps_per_epoch).tolist()
        record: dict[str, Any] = {
            "epoch": epoch,
            "step": step,
            "loss": mean[0],
            "kd": mean[1] if distilling else None,
            "ce": mean[2],
            "val_perplexity": evaluate_lm(student, val)["perplexity"] if val is not None else None,
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": seconds,  # of this call's share of the epoch: a resumed epoch counts from the resume
            "tokens_per_s": (steps_per_epoch - first) * batch_size * length / seconds,
        }
        history.append(record)
        metric = record["val_perplexity"]
        if metric_name == "last" or best["metric"] is None or metric < best["metric"]:
            best = {"epoch": epoch, "metric": metric, "state": _cpu_copy(student.state_dict())}
        save(epoch, 0, None, None)
        if on_epoch is not None:
            on_epoch(dict(record))
        if stop is not None and epoch < epochs and stop():
            raise Stopped(epoch, step)

    if best["state"] is not None:
        student.load_state_dict(best["state"])
    return LMTrainResult(
        history=history,
        best_epoch=best["epoch"],
        best_perplexity=best["metric"],
        metric=metric_name,
        steps=step,
        resumed_from=resumed_from,
        seconds=time.perf_counter() - started,
    )


def _causal_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy in fp32 over labelled positions (0 when none): the CE-only baseline,
    the same quantity as token_kd_loss's CE term."""
    per_token = F.cross_entropy(
        logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return per_token / (labels != IGNORE_INDEX).sum().clamp(min=1)


def _cpu_copy(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
