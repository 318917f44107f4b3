"""Token-level losses on sparse targets against dense float64 references written from their formulas."""

import dataclasses
import math

import pytest
import torch
from torch.testing import assert_close

from worker.distill.errors import ConfigError
from worker.distill.lm_losses import (
    LM_METHODS,
    forward_kl_sparse,
    generalized_jsd_sparse,
    reverse_kl_sparse,
    token_kd_loss,
)
from worker.distill.token_targets import sampled_targets, topk_targets

torch.set_num_threads(1)
B, L, V = 2, 5, 9
F64 = torch.float64


def _problem(seed: int = 0, v: int = V):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, L, v, generator=g, dtype=F64) * 2
    teacher = torch.randn(B, L, v, generator=g, dtype=F64) * 3
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, :2] = False  # a prompt: excluded
    mask[1, -1] = False  # padding: excluded
    return student, teacher, mask


# Dense references: every token's full distribution, written from the definitions.
def _dense_fkl(s, t, temp):
    log_p, log_q = torch.log_softmax(t / temp, -1), torch.log_softmax(s / temp, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _dense_rkl(s, t, temp):
    return _dense_fkl(t, s, temp)


def _dense_gjsd(s, t, beta, temp):
    """TRL's generalized_jsd_loss: beta 0 is forward KL, beta 1 reverse KL, else the beta-mixture JSD."""
    if beta == 0:
        return _dense_fkl(s, t, temp)
    if beta == 1:
        return _dense_rkl(s, t, temp)
    p, q = torch.softmax(t / temp, -1), torch.softmax(s / temp, -1)
    m = beta * p + (1 - beta) * q
    return beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)


def _masked_mean(per_token, mask):
    return per_token[mask].mean()


DENSE = {
    "fkl": lambda s, t, temp, beta: _dense_fkl(s, t, temp),
    "rkl": lambda s, t, temp, beta: _dense_rkl(s, t, temp),
    "gkd": lambda s, t, temp, beta: _dense_gjsd(s, t, beta, temp),
}
SPARSE = {
    "fkl": lambda s, tg, m, temp, beta: forward_kl_sparse(s, tg, m, temp),
    "rkl": lambda s, tg, m, temp, beta: reverse_kl_sparse(s, tg, m, temp),
    "gkd": lambda s, tg, m, temp, beta: generalized_jsd_sparse(s, tg, m, beta, temp),
}


@pytest.mark.parametrize(
    "method,beta", [("fkl", 0.5), ("rkl", 0.5), ("gkd", 0.1), ("gkd", 0.5), ("gkd", 0.9)]
)
@pytest.mark.parametrize("stored_temp,temp", [(1.0, 1.0), (2.0, 2.0), (1.0, 2.0), (1.0, 0.5)])
def test_top_k_of_the_whole_vocabulary_equals_the_dense_divergence(method, beta, stored_temp, temp):
    s, t, mask = _problem(seed=int(10 * temp))
    targets = topk_targets(t, V, temperature=stored_temp, value_dtype=F64)
    expected = _masked_mean(DENSE[method](s, t, temp, beta), mask)
    assert_close(SPARSE[method](s, targets, mask, temp, beta), expected, rtol=1e-10, atol=1e-12)


def _coarse_reference(s, t, k, temp, direction):
    """The documented top-k treatment from dense distributions: k ids + one bucket holding everything else."""
    p, q = torch.softmax(t / temp, -1), torch.softmax(s / temp, -1)
    ids = p.topk(k, -1).indices
    p_b = torch.cat([p.gather(-1, ids), 1 - p.gather(-1, ids).sum(-1, keepdim=True)], -1)
    q_b = torch.cat([q.gather(-1, ids), 1 - q.gather(-1, ids).sum(-1, keepdim=True)], -1)
    a, b = (p_b, q_b) if direction == "fkl" else (q_b, p_b)
    return (a * (a / b).log()).sum(-1)


@pytest.mark.parametrize("direction", ["fkl", "rkl"])
def test_top_k_is_the_divergence_over_k_ids_and_a_tail_bucket_and_never_exceeds_the_dense_one(direction):
    s, t, mask = _problem(seed=3)
    targets = topk_targets(t, 3, value_dtype=F64)
    fn = forward_kl_sparse if direction == "fkl" else reverse_kl_sparse
    per_token = fn(s, targets, mask, 1.0, reduction="none")
    reference = _coarse_reference(s, t, 3, 1.0, direction)
    assert_close(per_token, torch.where(mask, reference, 0.0), rtol=1e-10, atol=1e-12)
    dense = _dense_fkl(s, t, 1.0) if direction == "fkl" else _dense_rkl(s, t, 1.0)
    assert (per_token[mask] <= dense[mask] + 1e-12).all()  # data-processing inequality


def test_retempering_top_k_is_exact_when_the_teacher_tail_is_uniform():
    s, t, mask = _problem(seed=14)
    t = torch.cat([t[..., :3].abs() + 1.0, torch.zeros(B, L, V - 3, dtype=F64)], -1)  # a flat tail of 6 ids
    made_at_1, made_at_2 = topk_targets(t, 3, value_dtype=F64), topk_targets(t, 3, 2.0, value_dtype=F64)
    for fn in (forward_kl_sparse, reverse_kl_sparse):
        assert_close(fn(s, made_at_1, mask, 2.0), fn(s, made_at_2, mask, 2.0), rtol=1e-10, atol=1e-12)


def test_fp16_targets_give_nearly_the_float64_loss():
    s, t, mask = _problem(seed=4)
    exact = forward_kl_sparse(s, topk_targets(t, 4, value_dtype=F64), mask)
    stored = forward_kl_sparse(s.float(), topk_targets(t.float(), 4), mask)
    assert stored.dtype == torch.float32
    assert_close(stored.double(), exact, rtol=2e-3, atol=1e-4)


def test_gkd_limits_are_forward_and_reverse_kl():
    s, t, mask = _problem(seed=5)
    targets = topk_targets(t, 4, value_dtype=F64)
    fkl, rkl = forward_kl_sparse(s, targets, mask), reverse_kl_sparse(s, targets, mask)
    assert torch.equal(generalized_jsd_sparse(s, targets, mask, beta=0.0), fkl)
    assert torch.equal(generalized_jsd_sparse(s, targets, mask, beta=1.0), rkl)
    # And the ends are the limits of the scaled JSD, so beta moves continuously from one to the other.
    eps = 1e-7
    assert_close(generalized_jsd_sparse(s, targets, mask, beta=eps) / eps, fkl, rtol=1e-4, atol=0)
    assert_close(generalized_jsd_sparse(s, targets, mask, beta=1 - eps) / eps, rkl, rtol=1e-4, atol=0)


def test_sampled_forward_kl_has_an_unbiased_gradient():
    n, k, v = 4000, 12, 6
    s_row, t_row = (
        torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0, -0.5]),
        torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, -3.0]),
    )
    targets = sampled_targets(t_row.expand(1, n, v), k, torch.Generator().manual_seed(2))
    s = s_row.expand(1, n, v).clone().requires_grad_()
    forward_kl_sparse(s, targets, torch.ones(1, n, dtype=torch.bool), reduction="none").sum().backward()
    # The dense forward-KL gradient in the logits is q - p; each row's sampled gradient is q - count/k.
    expected = torch.softmax(s_row, -1) - torch.softmax(t_row, -1)
    assert_close(s.grad[0].mean(0), expected, rtol=0, atol=0.015)


def test_sampled_forward_kl_value_is_kl_of_the_estimate():
    s, t, mask = _problem(seed=6)
    targets = sampled_targets(t, 12, torch.Generator().manual_seed(0), value_dtype=F64)
    p_hat = torch.zeros(B, L, V, dtype=F64).scatter_add_(-1, targets.ids.long(), targets.values)
    log_q = torch.log_softmax(s, -1)
    reference = torch.where(p_hat > 0, p_hat * (p_hat.log() - log_q), 0.0).sum(-1)
    assert_close(forward_kl_sparse(s, targets, mask), _masked_mean(reference, mask), rtol=1e-10, atol=1e-12)


def test_padding_slots_with_weight_zero_contribute_nothing():
    s, t, mask = _problem(seed=7, v=40)
    targets = sampled_targets(t, 12, torch.Generator().manual_seed(0))
    padding = targets.values == 0
    assert padding.any()
    moved = dataclasses.replace(targets, ids=targets.ids.long().masked_fill(padding, 7).to(targets.ids.dtype))
    assert torch.equal(forward_kl_sparse(s, moved, mask), forward_kl_sparse(s, targets, mask))


@pytest.mark.parametrize("method", ["fkl", "rkl", "gkd", "fkl-sampled"])
def test_masked_tokens_contribute_nothing_even_with_garbage_there(method):
    s, t, mask = _problem(seed=8)
    kind = "sampled" if method.endswith("sampled") else "topk"
    targets = sampled_targets(t, 4, torch.Generator(), 2.0) if kind == "sampled" else topk_targets(t, 4)
    junk_values = (
        torch.zeros_like(targets.values) if kind == "sampled" else torch.full_like(targets.values, -math.inf)
    )
    junk = dataclasses.replace(
        targets,
        values=torch.where(mask[..., None], targets.values, junk_values),
        tail=None if targets.tail is None else torch.where(mask, targets.tail, -math.inf),
    )
    s2 = torch.where(mask[..., None], s, 1e4 * torch.randn_like(s)).requires_grad_()
    name = method.removesuffix("-sampled")
    loss, _ = token_kd_loss(
        name, s2, junk, torch.zeros(B, L, dtype=torch.long), mask, alpha=1.0, temperature=2.0
    )
    clean, _ = token_kd_loss(
        name, s, targets, torch.zeros(B, L, dtype=torch.long), mask, alpha=1.0, temperature=2.0
    )
    assert_close(loss, clean, rtol=1e-12, atol=0)
    loss.backward()
    assert torch.isfinite(s2.grad).all() and (s2.grad[~mask] == 0).all() and s2.grad[mask].abs().sum() > 0


def _labels(mask, seed=0):
    labels = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))
    labels[0, 3] = -100  # a counted token without a label: KD only
    return labels


def _ce_reference(s, labels, mask):
    labelled = mask & (labels != -100)
    return -torch.log_softmax(s, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0][labelled].mean()


@pytest.mark.parametrize("method,beta", [("fkl", 0.5), ("rkl", 0.5), ("gkd", 0.3)])
@pytest.mark.parametrize("alpha,temp", [(0.3, 2.0), (0.7, 1.0), (0.0, 2.0), (1.0, 2.0), (1.0, 1.0)])
def test_token_kd_loss_mixes_t_squared_kd_and_cross_entropy(method, beta, alpha, temp):
    s, t, mask = _problem(seed=9)
    labels = _labels(mask)
    targets = topk_targets(t, V, value_dtype=F64)
    loss, parts = token_kd_loss(method, s, targets, labels, mask, alpha=alpha, temperature=temp, beta=beta)
    kd = _masked_mean(DENSE[method](s, t, temp, beta), mask)
    ce = _ce_reference(s, labels, mask)
    assert_close(loss, alpha * temp**2 * kd + (1 - alpha) * ce, rtol=1e-10, atol=1e-12)
    assert_close(parts["kd"], temp**2 * kd, rtol=1e-10, atol=1e-12)
    assert_close(parts["ce"], ce, rtol=1e-10, atol=1e-12)
    assert all(not v.requires_grad for v in parts.values())


def test_alpha_zero_learns_from_labels_only():
    s, t, mask = _problem(seed=10)
    labels = _labels(mask)
    grads = []
    for seed in (1, 2):  # two different teachers
        x = s.clone().requires_grad_()
        targets = topk_targets(_problem(seed=seed)[1], 4, value_dtype=F64)
        token_kd_loss("fkl", x, targets, labels, mask, alpha=0.0, temperature=2.0)[0].backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("method", LM_METHODS.names())
@pytest.mark.parametrize("k", [3, V])
def test_gradients_match_finite_differences(method, k):
    s, t, mask = _problem(seed=11)
    targets = topk_targets(t, k, value_dtype=F64)
    labels = _labels(mask)

    def loss(x):
        return token_kd_loss(method, x, targets, labels, mask, alpha=0.6, temperature=1.5, beta=0.4)[0]

    assert torch.autograd.gradcheck(loss, (s.clone().requires_grad_(),))


@pytest.mark.parametrize(
    "method,kind", [("fkl", "topk"), ("rkl", "topk"), ("gkd", "topk"), ("fkl", "sampled")]
)
def test_a_few_sgd_steps_move_the_student_toward_the_teacher(method, kind):
    _, t, mask = _problem(seed=12, v=16)
    t = t.float()
    targets = (
        topk_targets(t, 4) if kind == "topk" else sampled_targets(t, 64, torch.Generator().manual_seed(0))
    )
    student = torch.zeros(B, L, 16, requires_grad=True)
    opt = torch.optim.SGD([student], lr=2.0)
    before = _masked_mean(_dense_fkl(student.detach(), t, 1.0), mask)
    for _ in range(60):
        opt.zero_grad()
        token_kd_loss(method, student, targets, torch.zeros(B, L, dtype=torch.long), mask, alpha=1.0)[
            0
        ].backward()
        opt.step()
    after = _masked_mean(_dense_fkl(student.detach(), t, 1.0), mask)
    assert after < 0.5 * before


def test_logits_in_bf16_are_scored_in_fp32():
    s, t, mask = _problem(seed=13)
    loss, _ = token_kd_loss("fkl", s.bfloat16(), topk_targets(t, 4), _labels(mask), mask, alpha=0.5)
    assert loss.dtype == torch.float32


def test_unknown_method_names_the_known_ones():
    s, t, mask = _problem()
    with pytest.raises(ConfigError, match="known: fkl, gkd, rkl"):
        token_kd_loss("hinton", s, topk_targets(t, 4), _labels(mask), mask, alpha=0.5)


@pytest.mark.parametrize("method", ["rkl", "gkd"])
def test_sampled_targets_refuse_divergences_that_need_teacher_log_probs(method):
    s, t, mask = _problem()
    targets = sampled_targets(t, 4, torch.Generator())
    with pytest.raises(ConfigError, match="fkl"):
        token_kd_loss(method, s, targets, _labels(mask), mask, alpha=0.5)


def test_sampled_targets_refuse_another_temperature():
    s, t, mask = _problem()
    with pytest.raises(ConfigError, match="re-tempered"):
        forward_kl_sparse(s, sampled_targets(t, 4, torch.Generator()), mask, temperature=2.0)


@pytest.mark.parametrize(
    "kwargs", [{"alpha": 1.5}, {"alpha": 0.5, "temperature": 0.0}, {"alpha": 0.5, "beta": -0.1}]
)
def test_out_of_range_settings_are_config_errors(kwargs):
    s, t, mask = _problem()
    with pytest.raises(ConfigError):
        token_kd_loss("gkd", s, topk_targets(t, 4), _labels(mask), mask, **kwargs)


def test_misaligned_targets_are_refused():
    s, t, mask = _problem()
    with pytest.raises(ValueError, match="must agree"):
        forward_kl_sparse(s[:, 1:], topk_targets(t, 4), mask[:, 1:])
