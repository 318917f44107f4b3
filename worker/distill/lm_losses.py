"""Token-level distillation losses for causal LMs: dense student logits against sparse teacher targets.

Shapes: student logits (B, L, V); `SparseTargets` (B, L, k); mask (B, L) bool, the tokens that count (not
prompt, not padding); labels (B, L) int64, -100 for none; position t of each describes the token at t + 1.

Top-k targets: every divergence is taken between two distributions over k + 1 outcomes, the k ids and one
"any other token" bucket, holding the teacher's stored `tail` mass and the student's 1 - sum of its k
probabilities (DistillKit's missing probability). That equals the full-vocabulary divergence when k = V or
when both tails have the same shape (DistillKit's symmetric-uniform case), is never larger otherwise (data
processing inequality) and assumes nothing about the tail. The classification top-k spreads the teacher's
tail uniformly instead: over ~50k tokens that flattens the Zipfian tail an LM should learn, and it needs a
dense teacher. Here nothing (B, L, V) is built but the student's own log-softmax. The student's bucket is
log1mexp(logsumexp of its k log-probs), held one epsilon below 0: past that fp32 cannot resolve it anyway.

Sampled targets (count/k per drawn id) serve forward KL only: -sum_i (count_i / k) log q_i is linear in the
estimate, so value and gradient are unbiased for the cross-entropy -sum_v p_v log q_v; the value shown is
KL(p_hat || q) (plus the estimate's entropy, constant in the student, so it is >= 0). Reverse KL and JSD need
log p where the student has mass, which counts do not estimate (unseen ids: log 0), so they refuse.

Temperature: targets record the T0 they were made at; the teacher is tempered to T by raising probabilities
to r = T0 / T and renormalising, exact among the k ids; the bucket's share takes the tail uniform over the
V - k unseen ids (as the classification top-k does), so it is exact when T = T0 or k = V. Sampled counts
cannot be re-tempered: a mismatch is an error. Softmax runs in fp32 (fp64 for fp64 logits), never bf16.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from worker.distill.errors import ConfigError
from worker.distill.registry import Registry
from worker.distill.token_targets import SparseTargets

IGNORE_INDEX = -100
Reduction = Literal["mean", "none"]
Divergence = Callable[..., Tensor]  # (log_q at T (B, L, V), targets, *, temperature, beta) -> (B, L)
LM_METHODS: Registry[Divergence] = Registry("method")

# A teacher log-prob of -inf (a zero-probability token, an empty tail) becomes exp(-80) ~ 1e-35: no mass, and
# still finite, so reverse KL and every gradient stay finite.
_LOG_FLOOR = -80.0


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and far from it (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _teacher_log_probs(targets: SparseTargets, vocab: int, temperature: float, dtype: torch.dtype) -> Tensor:
    """(B, L, k [+ 1]): the teacher's log-probs at `temperature` on the k ids [and the bucket]."""
    values = targets.values.to(dtype)
    if targets.kind == "sampled":
        if temperature != targets.temperature:
            raise ConfigError(
                f"sampled targets drawn at temperature {targets.temperature} cannot be re-tempered to "
                f"{temperature}; draw them at the training temperature",
                field="temperature",
            )
        # Renormalising removes the fp16 rounding of count/k; padding (value 0) becomes -inf, i.e. no mass.
        return torch.log(values / values.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny))
    ratio = targets.temperature / temperature
    scaled = values.clamp_min(_LOG_FLOOR) * ratio
    if targets.tail is not None and targets.k < vocab:  # top-k short of the vocabulary: a bucket
        unseen = math.log(vocab - targets.k)
        # V - k ids share the tail uniformly, each to the power r: log(V - k) + r * (tail - log(V - k)).
        bucket = unseen + ratio * (targets.tail.to(dtype).clamp_min(_LOG_FLOOR) - unseen)
        scaled = torch.cat([scaled, bucket.unsqueeze(-1)], dim=-1)
    # Renormalise: fp16 values and tail need not sum to 1 exactly, and a divergence needs a distribution.
    return scaled.log_softmax(-1)


def _student_log_probs(log_q: Tensor, targets: SparseTargets) -> Tensor:
    """(B, L, k [+ 1]): the student's log-probs on the k ids [and the bucket], from log_q (B, L, V)."""
    at_ids = log_q.gather(-1, targets.ids.to(device=log_q.device, dtype=torch.int64))
    if targets.tail is None or targets.k >= log_q.shape[-1]:
        return at_ids
    covered = at_ids.logsumexp(-1, keepdim=True).clamp(max=-torch.finfo(log_q.dtype).eps)
    return torch.cat([at_ids, _log1mexp(covered)], dim=-1)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """sum_j a_j (log a_j - log b_j) over the last dim, with 0 log 0 = 0: zero mass adds nothing, not NaN."""
    a = log_a.exp()
    return (a * (log_a.masked_fill(a == 0, 0.0) - log_b)).sum(-1)


def _pair(log_q: Tensor, targets: SparseTargets, temperature: float, method: str) -> tuple[Tensor, Tensor]:
    """The teacher's and the student's log-probs (B, L, k [+ 1]) on the k ids [and the bucket]."""
    if targets.kind != "topk" and method != "fkl":
        raise ConfigError(
            f"method {method!r} needs the teacher's log-probs, which sampled soft labels do not estimate; "
            "use method 'fkl' or soft_label_format 'topk'",
            field="method",
        )
    log_p = _teacher_log_probs(targets, log_q.shape[-1], temperature, log_q.dtype)
    return log_p, _student_log_probs(log_q, targets)


@LM_METHODS.register("fkl")
def _forward_kl(log_q: Tensor, targets: SparseTargets, *, temperature: float, beta: float = 0.5) -> Tensor:
    """KL(teacher || student) per token (B, L); `beta` is ignored."""
    log_p, log_s = _pair(log_q, targets, temperature, "fkl")
    return _kl(log_p, log_s)


@LM_METHODS.register("rkl")
def _reverse_kl(log_q: Tensor, targets: SparseTargets, *, temperature: float, beta: float = 0.5) -> Tensor:
    """KL(student || teacher) per token (B, L); `beta` is ignored."""
    log_p, log_s = _pair(log_q, targets, temperature, "rkl")
    return _kl(log_s, log_p)


@LM_METHODS.register("gkd")
def _gkd(log_q: Tensor, targets: SparseTargets, *, temperature: float, beta: float = 0.5) -> Tensor:
    """Generalized JSD (Agarwal et al., ICLR 2024, GKD) per token (B, L), with TRL's convention:

        JSD_beta = beta * KL(p || m) + (1 - beta) * KL(q || m),   m = beta * p + (1 - beta) * q,

    p the teacher, q the student. JSD_beta -> 0 at both ends, but JSD_beta / beta -> KL(p || q) as beta -> 0
    and JSD_beta / (1 - beta) -> KL(q || p) as beta -> 1; as in TRL's `generalized_jsd_loss`, beta = 0 is
    forward KL and beta = 1 reverse KL exactly.
    """
    if beta == 0.0:
        return _forward_kl(log_q, targets, temperature=temperature)
    if beta == 1.0:
        return _reverse_kl(log_q, targets, temperature=temperature)
    log_p, log_s = _pair(log_q, targets, temperature, "gkd")
    log_m = torch.logaddexp(log_p + math.log(beta), log_s + math.log1p(-beta))
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_s, log_m)


def _prepare(logits: Tensor, targets: SparseTargets, mask: Tensor, temperature: float, beta: float) -> Tensor:
    """Checks the arguments; returns the student's log-probs at `temperature` (B, L, V), fp32 or fp64."""
    if logits.shape[:-1] != targets.ids.shape[:-1] or mask.shape != logits.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(logits.shape)}, targets {tuple(targets.ids.shape)} and mask "
            f"{tuple(mask.shape)} must agree on (B, L)"
        )
    if not temperature > 0:
        raise ConfigError(f"temperature must be positive, got {temperature}", field="temperature")
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"beta must lie in [0, 1], got {beta}", field="method_params.beta")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return F.log_softmax(logits.to(dtype) / temperature, dim=-1)


def _divergence(
    name: str, logits: Tensor, targets: SparseTargets, mask: Tensor, temperature: float, beta: float
) -> Tensor:
    log_q = _prepare(logits, targets, mask, temperature, beta)
    return LM_METHODS.get(name)(log_q, targets, temperature=temperature, beta=beta)


def _reduce(per_token: Tensor, mask: Tensor, reduction: Reduction) -> Tensor:
    # where, not a product: whatever sits at a masked position (even inf) cannot leak into the sum.
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    if reduction == "none":
        return per_token
    # Divide by the count rather than test for "no token counts": the test would sync a GPU every step.
    return per_token.sum() / mask.sum().clamp(min=1)


def forward_kl_sparse(
    student_logits: Tensor,
    targets: SparseTargets,
    mask: Tensor,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """KL(teacher || student) at `temperature`: the mean over counted tokens, or (B, L) for 'none'."""
    per_token = _divergence("fkl", student_logits, targets, mask, temperature, 0.5)
    return _reduce(per_token, mask.bool(), reduction)


def reverse_kl_sparse(
    student_logits: Tensor,
    targets: SparseTargets,
    mask: Tensor,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """KL(student || teacher) at `temperature` (top-k targets): the mean over counted tokens, or (B, L)."""
    per_token = _divergence("rkl", student_logits, targets, mask, temperature, 0.5)
    return _reduce(per_token, mask.bool(), reduction)


def generalized_jsd_sparse(
    student_logits: Tensor,
    targets: SparseTargets,
    mask: Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """GKD's generalized JSD (see `_gkd`): the mean over counted tokens, or (B, L)."""
    per_token = _divergence("gkd", student_logits, targets, mask, temperature, beta)
    return _reduce(per_token, mask.bool(), reduction)


def token_kd_loss(
    method: str,
    student_logits: Tensor,
    targets: SparseTargets,
    labels: Tensor,
    mask: Tensor,
    *,
    alpha: float,
    temperature: float = 1.0,
    beta: float = 0.5,
) -> tuple[Tensor, dict[str, Tensor]]:
    """alpha * T^2 * KD + (1 - alpha) * CE -> (loss, {"kd": T^2 * KD, "ce": CE} detached).

    KD is the mean of `method`'s divergence over counted tokens (mask); CE the mean next-token cross-entropy
    at T = 1 over counted tokens with a label (not -100). T^2 keeps the KD gradient's size roughly
    independent of T (Hinton et al. 2015). `beta` is GKD's; fkl and rkl ignore it.
    """
    divergence = LM_METHODS.get(method)
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must lie in [0, 1], got {alpha}", field="alpha")
    log_q = _prepare(student_logits, targets, mask, temperature, beta)
    mask, grad = mask.bool(), torch.is_grad_enabled()
    # A term with weight 0 is still computed for the log, without a graph: no (B, L, V) kept for backward.
    with torch.set_grad_enabled(grad and alpha > 0):
        kd = _reduce(divergence(log_q, targets, temperature=temperature, beta=beta), mask, "mean")
    with torch.set_grad_enabled(grad and alpha < 1):
        # At T = 1 cross-entropy reuses the KD log-softmax; only another T costs a second (B, L, V) pass.
        log_q1 = log_q if temperature == 1.0 else F.log_softmax(student_logits.to(log_q.dtype), dim=-1)
        labelled = mask & (labels != IGNORE_INDEX)
        ce_tokens = -log_q1.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        ce = _reduce(ce_tokens, labelled, "mean")
    scale = temperature * temperature
    loss = alpha * scale * kd + (1.0 - alpha) * ce
    return loss, {"kd": (scale * kd).detach(), "ce": ce.detach()}
