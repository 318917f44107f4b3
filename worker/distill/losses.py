"""Distillation losses: one function per method, all with the same signature, in the `METHODS` registry.

    fn(student_logits (B, C), teacher_logits (B, C), labels (B,) int64, *, temperature, alpha, **params)
        -> (loss: scalar Tensor, parts: dict[str, Tensor])

`labels` is -1 for an unlabelled row. Every method mixes its distillation term KD_i with cross-entropy the
same way, so the methods differ only in KD_i:

    loss = mean_i( w_i * KD_i + (1 - alpha) * [y_i >= 0] * CE_i ),   w_i = alpha if y_i >= 0 else 1

An unlabelled row has nothing to learn but the teacher, so its KD term keeps full weight whatever alpha is.
`parts` holds detached scalars for logging: `kd` (mean KD_i over all rows) and `ce` (mean CE_i over labelled
rows, 0 when there are none). Softmax and log-softmax always run in fp32, whatever dtype the logits arrive in
(bf16 under autocast, fp16 soft labels): bf16 keeps about 3 significant digits, too few for the small
probabilities of the non-target classes that distillation learns from.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from worker.distill.registry import Registry

LossFn = Callable[..., tuple[Tensor, dict[str, Tensor]]]
METHODS: Registry[LossFn] = Registry("method")

# Stands in for -inf when a class is masked out: softmax gives it exactly 0, and unlike -inf it never turns a
# 0 * (-inf) into NaN in the KL sum or its gradient.
_MASKED = -1e9


def hard_label_ce(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over labelled rows (label -1 is ignored); 0 when no row is labelled."""
    labelled = labels >= 0
    ce_rows = F.cross_entropy(student_logits.float(), labels.clamp(min=0), reduction="none") * labelled
    # Divide by the count rather than test for "no labelled rows": the test would sync a GPU every step.
    return ce_rows.sum() / labelled.sum().clamp(min=1)


def _mix(
    kd_rows: Tensor, student_logits: Tensor, labels: Tensor, alpha: float, scale: float = 1.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss from per-row KD terms (B,), with KD_i = scale * kd_rows_i, as in the module docstring."""
    labelled = labels >= 0
    ce_sum = F.cross_entropy(student_logits.float(), labels, ignore_index=-1, reduction="sum")
    # The row weights carry alpha and the scale (T^2) at once: one dot product instead of a chain of small
    # ops, which matters because this runs every step and the tensors are tiny.
    kd_weight = torch.where(labelled, alpha * scale, scale)
    loss = torch.add(kd_rows @ kd_weight, ce_sum, alpha=1.0 - alpha) / len(labels)
    with torch.no_grad():
        parts = {"kd": kd_rows.mean() * scale, "ce": ce_sum / labelled.sum().clamp(min=1)}
    return loss, parts


@METHODS.register("hinton")
def hinton(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, temperature: float, alpha: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network".

    KD_i = T^2 * KL( softmax(t_i / T) || softmax(s_i / T) ).
    The T^2 factor keeps the gradient's size roughly independent of T (the soft gradients scale as 1/T^2).
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl_rows = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(-1)
    return _mix(kl_rows, student_logits, labels, alpha, scale=t * t)


@METHODS.register("soft_target")
def soft_target(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, temperature: float, alpha: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy of the student against the teacher's tempered distribution ("temperature adjustment").

    KD_i = -sum_c softmax(t_i / T)_c * log softmax(s_i)_c.
    Only the target is tempered: the student is read at T=1, so T < 1 sharpens the teacher towards its top
    class and T > 1 smooths it. There is no T^2 factor, since the student's logits are not divided by T and
    the gradient's size does not shrink with T. (Hinton et al. 2015 soft targets; the tempered-target variant
    is the "teacher temperature" of e.g. DINO, Caron et al. 2021.)
    """
    p_teacher = F.softmax(teacher_logits.float() / temperature, dim=-1)
    log_p_student = F.log_softmax(student_logits.float(), dim=-1)
    kd_rows = -(p_teacher * log_p_student).sum(-1)
    return _mix(kd_rows, student_logits, labels, alpha)


@METHODS.register("mse_logits")
def mse_logits(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, temperature: float, alpha: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Ba & Caruana 2014, "Do Deep Nets Really Need to be Deep?": regress the teacher's logits.

    KD_i = mean_c (s_ic - t_ic)^2. `temperature` is accepted for a uniform signature and ignored.
    """
    kd_rows = (student_logits.float() - teacher_logits.float()).pow(2).mean(-1)
    return _mix(kd_rows, student_logits, labels, alpha)


@METHODS.register("dkd")
def dkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    temperature: float,
    alpha: float,
    beta: float = 8.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Zhao et al. CVPR 2022, "Decoupled Knowledge Distillation".

    With g the target class (the label, or the teacher's argmax for an unlabelled row) and p = softmax(./T):
      TCKD_i = KL( [p^t_g, 1 - p^t_g] || [p^s_g, 1 - p^s_g] )             (binary: target vs the rest)
      NCKD_i = KL( softmax over c != g of t_i/T || same of s_i/T )         (among the non-target classes)
      KD_i   = T^2 * (TCKD_i + beta * NCKD_i)
    """
    t = temperature
    s = student_logits.float() / t
    z = teacher_logits.float() / t
    target = torch.where(labels >= 0, labels, z.argmax(-1))
    is_target = F.one_hot(target, s.shape[-1]).bool()

    def binary_log_probs(logits: Tensor) -> Tensor:
        # log p_g and log(1 - p_g) from log-sum-exps, stable where p_g is within rounding of 0 or 1.
        log_all = logits.logsumexp(-1)
        log_target = logits.gather(-1, target[:, None]).squeeze(-1) - log_all
        log_rest = logits.masked_fill(is_target, _MASKED).logsumexp(-1) - log_all
        return torch.stack([log_target, log_rest], -1)

    log_b_s, log_b_t = binary_log_probs(s), binary_log_probs(z)
    tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(-1)
    log_n_s = F.log_softmax(s.masked_fill(is_target, _MASKED), dim=-1)
    log_n_t = F.log_softmax(z.masked_fill(is_target, _MASKED), dim=-1)
    nckd = (log_n_t.exp() * (log_n_t - log_n_s)).sum(-1)
    loss, parts = _mix(tckd + beta * nckd, student_logits, labels, alpha, scale=t * t)
    parts["tckd"], parts["nckd"] = tckd.mean().detach(), nckd.mean().detach()
    return loss, parts


def _pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    correlation: Tensor = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)
    return correlation


@METHODS.register("dist")
def dist(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    temperature: float,
    alpha: float,
    beta: float = 1.0,
    gamma: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Huang et al. NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher" (DIST).

    With P^s = softmax(S/T), P^t = softmax(Z/T) over the batch (B, C) and rho the Pearson correlation:
      inter_i = 1 - rho(P^s_i,:, P^t_i,:)                  (per row: the ranking of classes for one sample)
      intra   = mean_c (1 - rho(P^s_:,c, P^t_:,c))          (per column: how one class varies over the batch)
      KD_i    = T^2 * (beta * inter_i + gamma * intra)
    `intra` is a batch-level term shared by every row, so it takes the same per-row weights as `inter_i`.
    """
    t = temperature
    p_s = F.softmax(student_logits.float() / t, dim=-1)
    p_t = F.softmax(teacher_logits.float() / t, dim=-1)
    inter = 1.0 - _pearson_rows(p_s, p_t)
    intra = (1.0 - _pearson_rows(p_s.T, p_t.T)).mean()
    loss, parts = _mix(beta * inter + gamma * intra, student_logits, labels, alpha, scale=t * t)
    parts["inter"], parts["intra"] = inter.mean().detach(), intra.detach()
    return loss, parts


def uses_temperature(method: str) -> bool:
    """Whether `temperature` changes what `method` computes (autotune skips searching it otherwise)."""
    return method != "mse_logits"
