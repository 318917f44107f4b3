"""The training loop: one function, read top to bottom. Distillation, hard-label baselines and fine-tuning.

The data is held on the device when it fits and batches are cut from a seeded permutation: no DataLoader,
no worker processes, no per-batch host copies. That is what makes distilling from cached logits as fast as a
hand-written loop. A checkpoint per epoch holds everything the next epoch depends on (weights, optimizer,
schedule, every RNG, the best weights so far, the history), so a run stopped after epoch k and resumed ends
with the same weights, bit for bit on CPU, as a run that was never stopped. Inside an epoch, one process also
checkpoints every `checkpoint_every_steps` steps and whenever `CHECKPOINT_SECONDS` have passed since the
last one, and when it is asked to stop: then the checkpoint adds the epoch's row order, the position in it
and the epoch's running sums, so a crash or a stop mid-epoch on a large dataset loses minutes, not the epoch,
and the resumed run still ends bit for bit where an unbroken one does. (A data-parallel run checkpoints per
epoch only: its processes would have to agree on the step first.)

The same loop runs each process of a data-parallel run (`replicas`, started by data_parallel.py): each
trains on its share of every global batch under DistributedDataParallel, and rank 0 alone writes checkpoints
and reports epochs. One process (the default) communicates nothing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler

from worker.distill.augment import apply_views
from worker.distill.checkpoints import capture_rng, load_latest_checkpoint, restore_rng, save_checkpoint
from worker.distill.config import DistillConfig
from worker.distill.errors import ConfigError
from worker.distill.losses import METHODS, LossFn, hard_label_ce
from worker.distill.replicas import SINGLE, Replicas, StopPoll
from worker.distill.softlabels import SparseLogits
from worker.distill.streams import RowStream, row_batches

STOP_CHECK_SECONDS = 5.0  # how often a running epoch asks `stop()`; the service's hook may query a database
CHECKPOINT_SECONDS = 300.0  # at most this much work is lost to a crash mid-epoch (one process)
EVAL_BATCH = 1024


Targets = Tensor | SparseLogits  # the teacher's logits for some rows: dense (N, C), or top-k as stored


@dataclass
class Views:
    """Augmented views of the training images (augment.py): `params` (V, N, 5) crop box and flip per view and
    row, `logits` the teacher's on each view ((V, N, C), or one Targets per view). Epoch e trains on view
    (e - 1) % V."""

    params: Tensor
    logits: Tensor | list[Targets]

    def __len__(self) -> int:
        return int(self.params.shape[0])

    def subset(self, index: Tensor) -> Views:
        if isinstance(self.logits, Tensor):
            return Views(self.params[:, index], self.logits[:, index])
        return Views(self.params[:, index], [view[index] for view in self.logits])

    def to(self, device: torch.device) -> Views:
        if isinstance(self.logits, Tensor):
            return Views(self.params.to(device), self.logits.to(device))
        return Views(self.params.to(device), [view.to(device) for view in self.logits])

    @property
    def nbytes(self) -> int:
        return _nbytes(self.params) + sum(_nbytes(view) for view in self.logits)


@dataclass
class TensorData:
    """Rows ready for the student. x: preprocessed float32 (N, ...); y: int64 (N,), -1 for an unlabelled row;
    teacher_logits: (N, C) float32 or float16 for the same rows, or None; views: augmented views to train on
    instead of x (and their teacher logits instead of teacher_logits), or None."""

    x: Tensor | RowStream  # a stream: rows read a batch at a time by loader processes (image_stream.py)
    y: Tensor
    teacher_logits: Targets | None = None
    views: Views | None = None

    def __len__(self) -> int:
        return len(self.y)

    @property
    def has_labels(self) -> bool:
        return bool((self.y >= 0).any())

    def subset(self, index: Tensor) -> TensorData:
        t = None if self.teacher_logits is None else self.teacher_logits[index]
        views = None if self.views is None else self.views.subset(index)
        return TensorData(self.x[index], self.y[index], t, views)


@dataclass
class TrainResult:
    history: list[dict[str, Any]]  # one on_epoch record per epoch
    best_epoch: int  # the epoch whose weights the student holds now
    best_metric: float | None
    metric: str  # what "best" means: "val_acc", "agreement", or "last" (nothing to validate on)
    resumed_from: int | None = None  # the checkpoint epoch this call started from
    seconds: float = 0.0


class Stopped(Exception):  # noqa: N818 - reads as "training stopped", raised on request, not a fault
    """`stop()` returned True; the last completed epoch is checkpointed and the run can resume from it."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"training stopped on request after epoch {epoch}")
        self.epoch = epoch


def train(
    student: nn.Module,
    train_data: TensorData,
    val_data: TensorData | None,
    loss_fn: str | LossFn | None,
    config: DistillConfig,
    *,
    teacher_logits: Targets | None = None,
    ckpt_dir: Path | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    device: str | torch.device | None = None,
    stop: Callable[[], bool] | None = None,
    replicas: Replicas = SINGLE,
) -> TrainResult:
    """Train `student` in place and leave it holding its best-on-validation weights.

    loss_fn: a `METHODS` name or function (distillation, needs teacher logits), or None for plain
      cross-entropy on the labelled rows only (the baseline and the fine-tuning epochs).
    config: `temperature`/`alpha` must be resolved numbers when distilling.
    teacher_logits: the train rows' logits, if not in `train_data`. `epochs`/`lr` override the config's.
    ckpt_dir: one folder per run; a valid checkpoint there from the same settings is resumed.
    stop: polled each epoch and every few seconds; True -> raise `Stopped` (last epoch checkpoint kept).
    replicas: this process's place in a data-parallel run (replicas.py); all of them load the checkpoint,
      rank 0 alone writes it. `on_epoch` and `stop` belong to rank 0.
    """
    started = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    epochs = epochs or config.epochs
    lr = lr or config.lr
    method = loss_fn if isinstance(loss_fn, str) else getattr(loss_fn, "__name__", "hard_label_ce")
    distill_loss = METHODS.get(loss_fn) if isinstance(loss_fn, str) else loss_fn
    rows = _rows(train_data, teacher_logits, method, distill_loss is not None, config)
    x, y, targets, views = rows.x, rows.y, rows.targets, rows.views

    # Hold everything on the device when it fits: indexing on-device beats any loader.
    # A stream's rows never are: its loader hands each batch over as it is read.
    on_device = not isinstance(x, RowStream) and _fits_on(device, x, y, targets, views)
    if on_device and isinstance(x, Tensor):
        x, y = x.to(device), y.to(device)
        targets = None if targets is None else targets.to(device)
        views = None if views is None else views.to(device)
    val = _to_device(val_data, device)

    n, batch_size = len(y), config.batch_size
    # A last batch that leaves a process one row would break BatchNorm; it is skipped (different rows each
    # epoch). One process: a last batch of one row.
    steps_per_epoch = max(1, n // batch_size + (1 if n % batch_size >= 2 * replicas.world else 0))
    # Dropout, and anything else random inside a step: a stream per process (rank 0's is one process's).
    torch.manual_seed(config.seed + replicas.rank)
    order = torch.Generator().manual_seed(config.seed)  # the epoch permutations, on CPU for portability
    student.to(device)
    optimizer = _optimizer(student, config, lr)
    scheduler = _scheduler(optimizer, config.schedule, lr, epochs * steps_per_epoch)
    state = _State(student, optimizer, scheduler, order)  # what a checkpoint saves and restores
    params = dict(config.method_params) if distill_loss is not None else {}
    run = _run_identity(method, rows, params, epochs, lr, config, replicas.world)

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": 0, "metric": None, "state": None}
    start_epoch, resumed_from = 0, None
    within: dict[str, Any] | None = None  # the epoch in progress when the checkpoint was taken, if any
    checkpoint = load_latest_checkpoint(ckpt_dir) if ckpt_dir is not None else None
    if checkpoint is not None and checkpoint.get("run") == run:
        state.restore(checkpoint, replicas.rank)
        history, best = checkpoint["history"], checkpoint["best"]
        start_epoch = resumed_from = checkpoint["epoch"]
        within = checkpoint.get("within")
    # A checkpoint from other settings belongs to another run: start over (and overwrite it as we go).
    model = replicas.wrap(student, device)  # after the restore: rank 0's weights are broadcast

    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    metric_name = _metric_name(val)
    polls = StopPoll(stop, replicas, STOP_CHECK_SECONDS)
    # Mid-epoch checkpoints: one process only (see the module docstring).
    every = (config.checkpoint_every_steps or 0) if ckpt_dir is not None and replicas.world == 1 else None
    last_saved = time.perf_counter()
    for epoch in range(start_epoch + 1, epochs + 1):
        epoch_started = time.perf_counter()
        student.train()
        # Running sums and predictions stay on the device, a few ops per step: a .item() per step would
        # stall a GPU, and on CPU each extra small op costs as much as a sizeable share of the loss.
        seen = min(n, steps_per_epoch * batch_size)
        part_names: list[str] = []
        sums = torch.zeros(0)
        first = 0
        if within is not None:  # the checkpoint's epoch: its order, its position, its running sums
            perm, first, part_names = within["perm"], within["position"], within["part_names"]
            predicted, sums = within["predicted"].to(device), within["sums"].to(device)
            epoch_started -= float(within.get("seconds", 0.0))  # the epoch's time before the checkpoint
            within = None
        else:
            perm = torch.randperm(n, generator=order)
            predicted = torch.full((seen,), -2, dtype=torch.long, device=device)  # -2: another process's row
        perm = perm.to(device) if on_device else perm
        streamed = None  # a stream: this epoch's remaining batches, read ahead by the loader's processes
        if isinstance(x, RowStream):
            cut = [perm[s * batch_size : (s + 1) * batch_size] for s in range(first, steps_per_epoch)]
            streamed = x.batches([replicas.shard(batch)[0] for batch in cut], device=device)

        for step in range(first, steps_per_epoch):
            batch = perm[step * batch_size : (step + 1) * batch_size]
            index, share = replicas.shard(batch)  # this process's rows; all of them alone (share 1.0)
            xb = next(streamed) if streamed is not None else x[index]
            assert isinstance(xb, Tensor)
            yb = y[index]
            tb: Targets | None = None if targets is None else targets[index]
            if views is not None:  # this epoch's stored view of each row, and the teacher's logits on it
                view = (epoch - 1) % len(views)
                xb = apply_views(xb, views.params[view][index])
                tb = None if tb is None else views.logits[view][index]
            if isinstance(tb, SparseLogits):  # top-k soft labels become dense a batch at a time
                tb = tb.dense()
            if not on_device:
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                tb = None if tb is None else tb.to(device, non_blocking=True)
            with autocast:
                logits = model(xb)
            if distill_loss is not None:
                loss, parts = distill_loss(
                    logits, tb, yb, temperature=rows.temperature, alpha=rows.alpha, **params
                )
            else:
                loss = hard_label_ce(logits, yb)
                parts = {"ce": loss.detach()}
            optimizer.zero_grad(set_to_none=True)
            (loss if share == 1.0 else loss * share).backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()

            values = torch.stack([loss.detach(), *parts.values()])
            if not part_names:
                part_names, sums = ["loss", *parts], torch.zeros_like(values)
            sums += values if share == 1.0 else values * share
            mine = slice(step * batch_size + replicas.rank, step * batch_size + len(batch), replicas.world)
            predicted[mine] = logits.detach().argmax(-1)
            stopping = polls.after_step()
            taken = step + 1
            if every is not None and taken < steps_per_epoch:
                due = (every and taken % every == 0) or time.perf_counter() - last_saved > CHECKPOINT_SECONDS
                if (due or stopping) and ckpt_dir is not None:
                    snapshot = state.checkpoint(epoch - 1, run, best, history, config, [capture_rng(order)])
                    snapshot["within"] = {
                        "position": taken,  # steps of epoch `epoch` taken, in `perm` order
                        "perm": perm.cpu(),
                        "predicted": predicted.cpu(),
                        "sums": sums.cpu(),
                        "part_names": part_names,
                        "seconds": time.perf_counter() - epoch_started,
                    }
                    save_checkpoint(ckpt_dir, epoch - 1, snapshot)
                    last_saved = time.perf_counter()
            if stopping:
                raise Stopped(epoch - 1)  # the last checkpoint is exact: this epoch's steps so far, or none

        record: dict[str, Any] = {"epoch": epoch}
        means = replicas.total(sums) / (steps_per_epoch * replicas.world)  # of the global batches' losses
        record.update(zip(part_names, means.tolist(), strict=True))
        record["train_acc"] = _accuracy(predicted, y[perm[:seen]].to(device), replicas)
        record.update(
            evaluate(student, val, autocast, replicas)
            if val is not None
            else {"val_acc": None, "agreement": None}
        )
        record["lr"] = optimizer.param_groups[0]["lr"]
        record["seconds"] = time.perf_counter() - epoch_started
        record["samples_per_s"] = seen / record["seconds"]  # exported as distill_samples_per_second
        history.append(record)

        metric = record[metric_name] if metric_name != "last" else None
        if metric_name == "last" or best["metric"] is None or metric > best["metric"]:
            best = {"epoch": epoch, "metric": metric, "state": _cpu_copy(student.state_dict())}
        if ckpt_dir is not None:
            random_states = replicas.gather(capture_rng(order))  # every process's, on rank 0
            if replicas.writes:
                snapshot = state.checkpoint(epoch, run, best, history, config, random_states)
                save_checkpoint(ckpt_dir, epoch, snapshot)
                last_saved = time.perf_counter()
        if on_epoch is not None:
            on_epoch(dict(record))
        if epoch < epochs and polls.now():
            raise Stopped(epoch)

    if best["state"] is not None:
        student.load_state_dict(best["state"])
    return TrainResult(
        history=history,
        best_epoch=best["epoch"],
        best_metric=best["metric"],
        metric=metric_name,
        resumed_from=resumed_from,
        seconds=time.perf_counter() - started,
    )


@dataclass(frozen=True)
class _Rows:
    """What one run trains on: all rows with the teacher's logits, or only the labelled rows without."""

    x: Tensor | RowStream
    y: Tensor
    targets: Targets | None  # the teacher's logits for these rows; None when training on labels alone
    temperature: float | None
    alpha: float | None
    views: Views | None = None


def _rows(
    data: TensorData, teacher_logits: Targets | None, method: str, distilling: bool, config: DistillConfig
) -> _Rows:
    targets = teacher_logits if teacher_logits is not None else data.teacher_logits
    if distilling:
        temperature, alpha = _resolved(config)
        if targets is None:
            raise ConfigError(f"method {method!r} needs teacher logits for the training rows", field="method")
        return _Rows(data.x, data.y, targets, temperature, alpha, data.views)
    # Training alone means the labelled rows only: an unlabelled row would be a wasted forward pass.
    labelled = (data.y >= 0).nonzero().squeeze(1)
    if len(labelled) == 0:
        raise ConfigError("no labelled training rows to train on with hard labels", field="dataset")
    views = None if data.views is None else data.views.subset(labelled)
    return _Rows(data.x[labelled], data.y[labelled], None, None, None, views)


@dataclass
class _State:
    """What a checkpoint captures besides the history: weights, optimizer, schedule, and (via capture_rng)
    every random state, so a resumed run continues bit for bit."""

    student: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    order: torch.Generator  # the epoch permutations

    def checkpoint(
        self,
        epoch: int,
        run: dict[str, Any],
        best: dict[str, Any],
        history: list[dict[str, Any]],
        config: DistillConfig,
        random_states: list[dict[str, Any]],
    ) -> dict[str, Any]:
        """random_states: capture_rng of each process, rank 0 first (one entry for a run of one process)."""
        checkpoint = {
            "format": 1,
            "epoch": epoch,
            "run": run,
            "model": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": random_states[0],
            "best": best,
            "history": history,
            "config": config.to_dict(),
        }
        if len(random_states) > 1:  # data-parallel: ranks 1..N-1 resume their own dropout streams
            checkpoint["replica_rng"] = random_states[1:]
        return checkpoint

    def restore(self, checkpoint: dict[str, Any], rank: int = 0) -> None:
        """Every process loads the same weights and optimizer state (replicas stay identical), and its own
        random state."""
        self.student.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        restore_rng(checkpoint["rng"] if rank == 0 else checkpoint["replica_rng"][rank - 1], self.order)


def _metric_name(val: TensorData | None) -> str:
    """What "best epoch" means: validation accuracy, else agreement with the teacher, else the last epoch."""
    if val is not None and val.has_labels:
        return "val_acc"
    return "agreement" if val is not None and val.teacher_logits is not None else "last"


def _accuracy(predicted: Tensor, labels: Tensor, replicas: Replicas = SINGLE) -> float | None:
    """Training accuracy of one epoch's predictions over its labelled rows (label -1: unlabelled). Each
    process predicted its own rows (-2 elsewhere, never a label); `labels` are all of them."""
    n_labelled = int((labels >= 0).sum())
    return int(replicas.total((predicted == labels).sum())) / n_labelled if n_labelled else None


@torch.inference_mode()
def evaluate(
    student: nn.Module, data: TensorData, autocast: Any = None, replicas: Replicas = SINGLE
) -> dict[str, float | None]:
    """Accuracy on the labelled rows and top-1 agreement with the teacher (None where not measurable).
    Across processes each evaluates every N-th row and the counts are summed."""
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    mine = slice(replicas.rank, None, replicas.world)
    x, labels = data.x[mine], data.y[mine]
    teacher = None if data.teacher_logits is None else data.teacher_logits[mine]
    correct = agree = n_labelled = 0
    start = 0
    for xb in row_batches(x, len(labels), EVAL_BATCH, device):
        rows = slice(start, start + len(xb))
        start += len(xb)
        with autocast or contextlib.nullcontext():
            predicted = student(xb.to(device)).argmax(-1).cpu()
        y = labels[rows].cpu()
        correct += int(((predicted == y) & (y >= 0)).sum())
        n_labelled += int((y >= 0).sum())
        if teacher is not None:
            agree += int((predicted == teacher[rows].argmax(-1).cpu()).sum())
    student.train(was_training)
    if replicas.parallel:
        correct, agree, n_labelled = replicas.total(torch.tensor([correct, agree, n_labelled])).tolist()
    return {
        "val_acc": correct / n_labelled if n_labelled else None,
        "agreement": agree / len(data) if data.teacher_logits is not None and len(data) else None,
    }


# The config fields that change the trajectory, besides those _run_identity names itself.
_TRAJECTORY_FIELDS = ("batch_size", "optimizer", "schedule", "weight_decay", "grad_clip", "seed")


def _run_identity(
    method: str,
    rows: _Rows,
    params: dict[str, float],
    epochs: int,
    lr: float,
    config: DistillConfig,
    processes: int = 1,
) -> dict[str, Any]:
    """All that decides a run's trajectory: a checkpoint only resumes a run that agrees on all of it."""
    run = {
        "method": method,
        "temperature": rows.temperature,
        "alpha": rows.alpha,
        "params": params,
        "epochs": epochs,
        "lr": lr,
        "rows": len(rows.y),
        **{k: getattr(config, k) for k in _TRAJECTORY_FIELDS},
    }
    # Data-parallel runs differ from one process in BatchNorm statistics, dropout streams and the last batch
    # (replicas.py), and keep a random state per process: theirs resume only on as many processes.
    if processes > 1:
        run["processes"] = processes
    if config.augment is not None:  # named only when set: runs without keep the identity they had
        run["augment"], run["views"] = config.augment, config.views
    return run


def _resolved(config: DistillConfig) -> tuple[float, float]:
    if config.temperature == "auto" or config.alpha == "auto":
        raise ConfigError(
            "temperature and alpha must be chosen (autotune) before training", field="temperature"
        )
    return float(config.temperature), float(config.alpha)


def _optimizer(student: nn.Module, config: DistillConfig, lr: float) -> torch.optim.Optimizer:
    # fused: one kernel per step instead of ~10 per parameter group; on small students (an MLP on CPU)
    # that dispatch overhead is a sizeable part of the step.
    decay = config.weight_decay
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            student.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=decay, fused=True
        )
    if config.optimizer == "adamw":
        return torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=decay, fused=True)
    raise ConfigError(f"unknown optimizer {config.optimizer!r}; known: adamw, sgd", field="optimizer")


def _constant(step: int) -> float:
    return 1.0


def _scheduler(optimizer: torch.optim.Optimizer, schedule: str, lr: float, total_steps: int) -> LRScheduler:
    """Stepped once per batch, so short runs still anneal smoothly."""
    sched = torch.optim.lr_scheduler
    if schedule == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=total_steps)
    if schedule == "onecycle":
        return sched.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps)
    if schedule == "constant":
        return sched.LambdaLR(optimizer, _constant)
    raise ConfigError(f"unknown schedule {schedule!r}; known: constant, cosine, onecycle", field="schedule")


def _nbytes(t: Tensor | SparseLogits | Views | None) -> int:
    if t is None:
        return 0
    return t.numel() * t.element_size() if isinstance(t, Tensor) else t.nbytes


def _fits_on(device: torch.device, *tensors: Tensor | SparseLogits | Views | None) -> bool:
    if device.type != "cuda":
        return True
    needed = sum(_nbytes(t) for t in tensors)
    free, _ = torch.cuda.mem_get_info(device)
    return needed < free // 2  # leave half for activations, weights and the optimizer


def _to_device(data: TensorData | None, device: torch.device) -> TensorData | None:
    if data is None or len(data) == 0:
        return None
    if isinstance(data.x, RowStream) or not _fits_on(device, data.x):
        return data  # evaluate() moves each batch
    t = None if data.teacher_logits is None else data.teacher_logits.to(device)
    return TensorData(data.x.to(device), data.y.to(device), t)


def _cpu_copy(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
