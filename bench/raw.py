"""Hand-written raw-PyTorch loops: the baselines every benchmark compares the product against.

Nothing here imports the product's training code: these are the loops a user would write by hand, kept to
the same recipe as the product's defaults (AdamW lr 1e-3, weight decay 1e-4, cosine per step, batch 128,
gradient clipping 1.0, the best epoch on validation kept) so that a difference in the tables is the
product's doing, not a different recipe's.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


def hinton_loss(student: Tensor, teacher: Tensor, labels: Tensor, T: float, alpha: float) -> Tensor:
    """`alpha * T^2 * KL(p_t^T || p_s^T) + (1 - alpha) * CE(s, y)` per row; rows labelled -1 get the KD term
    with weight 1. Softmax in fp32."""
    s, t = student.float(), teacher.float()
    kl = F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), log_target=True, reduction="none").sum(1)
    kd = kl * T * T
    labelled = labels >= 0
    ce = F.cross_entropy(s, labels.clamp(min=0), reduction="none")
    per_row = torch.where(labelled, alpha * kd + (1 - alpha) * ce, kd)
    return per_row.mean()


@torch.inference_mode()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 2048) -> float:
    was_training = model.training
    model.eval()
    hits = sum(
        int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch)
    )
    model.train(was_training)
    return hits / max(len(x), 1)


@torch.inference_mode()
def teacher_logits(teacher: nn.Module, x: Tensor, batch: int = 1024) -> Tensor:
    """The teacher once over `x` (N, ...) -> (N, C) float32: what a user caches by hand."""
    teacher.eval()
    return torch.cat([teacher(x[i : i + batch]).float() for i in range(0, len(x), batch)])


def _optimizer(model: nn.Module, steps: int, lr: float, weight_decay: float):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))
    )
    return opt, sched


def _step(model, opt, sched, loss: Tensor, clip: float | None) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip:
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    sched.step()


def fit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    *,
    logits: Tensor | None = None,
    T: float = 1.0,
    alpha: float = 0.0,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    clip: float | None = 1.0,
    seed: int = 0,
    loss: Callable[..., tuple[Tensor, dict]] | None = None,
) -> tuple[nn.Module, float]:
    """Train on tensors held in memory (the fastest loop there is: no DataLoader, no per-row work).

    `logits` None trains on hard labels alone (rows labelled -1 are dropped); otherwise Hinton KD from the
    given cached teacher logits, or `loss` (a `worker.distill.losses` function) in its place. Returns the
    model with its best-on-validation weights and that accuracy.
    """
    torch.manual_seed(seed)
    if logits is None:
        keep = y >= 0
        x, y = x[keep], y[keep]
    steps = epochs * math.ceil(len(x) / batch_size)
    opt, sched = _optimizer(model, steps, lr, weight_decay)
    best, best_acc = copy.deepcopy(model.state_dict()), -1.0
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(batch_size):
            out = model(x[idx])
            if logits is None:
                value = F.cross_entropy(out, y[idx])
            elif loss is None:
                value = hinton_loss(out, logits[idx], y[idx], T, alpha)
            else:
                value, _ = loss(out, logits[idx], y[idx], temperature=T, alpha=alpha)
            _step(model, opt, sched, value, clip)
        acc = accuracy(model, x_val, y_val)
        if acc > best_acc:
            best, best_acc = copy.deepcopy(model.state_dict()), acc
    model.load_state_dict(best)
    return model, best_acc


def fit_online(
    student: nn.Module,
    teacher: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    *,
    T: float,
    alpha: float,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    clip: float | None = 1.0,
    seed: int = 0,
) -> tuple[nn.Module, float]:
    """What a user writes by hand: a DataLoader, and the teacher run on every batch of every epoch."""
    torch.manual_seed(seed)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    opt, sched = _optimizer(student, epochs * len(loader), lr, weight_decay)
    best, best_acc = copy.deepcopy(student.state_dict()), -1.0
    student.train()
    for _ in range(epochs):
        for xb, yb in loader:
            with torch.no_grad():
                t = teacher(xb)
            _step(student, opt, sched, hinton_loss(student(xb), t, yb, T, alpha), clip)
        acc = accuracy(student, x_val, y_val)
        if acc > best_acc:
            best, best_acc = copy.deepcopy(student.state_dict()), acc
    student.load_state_dict(best)
    return student, best_acc
