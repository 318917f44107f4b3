"""Each method against a float64 reference written from its formula, and the limits that must hold."""

import math

import pytest
import torch
from torch.testing import assert_close

from worker.distill.errors import ConfigError
from worker.distill.losses import METHODS, hard_label_ce

torch.set_num_threads(1)
B, C = 12, 7


def _batch(seed: int = 0, unlabelled: int = 3):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, C, generator=g) * 3
    t = torch.randn(B, C, generator=g) * 3
    y = torch.randint(0, C, (B,), generator=g)
    y[:unlabelled] = -1
    return s, t, y


def _softmax(row: list[float], temp: float = 1.0) -> list[float]:
    m = max(row)
    e = [math.exp((v - m) / temp) for v in row]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def _pearson(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def _kd_rows(method: str, s, t, y, temp: float, **p) -> list[float]:
    s, t = s.double().tolist(), t.double().tolist()
    rows = []
    for i in range(B):
        if method == "hinton":
            rows.append(temp**2 * _kl(_softmax(t[i], temp), _softmax(s[i], temp)))
        elif method == "soft_target":
            pt, ps = _softmax(t[i], temp), _softmax(s[i])
            rows.append(-sum(a * math.log(b) for a, b in zip(pt, ps, strict=True)))
        elif method == "mse_logits":
            rows.append(sum((a - b) ** 2 for a, b in zip(s[i], t[i], strict=True)) / C)
        elif method == "dkd":
            g = int(y[i]) if y[i] >= 0 else max(range(C), key=lambda c: t[i][c])
            ps, pt = _softmax(s[i], temp), _softmax(t[i], temp)
            tckd = _kl([pt[g], 1 - pt[g]], [ps[g], 1 - ps[g]])
            others = [c for c in range(C) if c != g]
            nckd = _kl(_softmax([t[i][c] for c in others], temp), _softmax([s[i][c] for c in others], temp))
            rows.append(temp**2 * (tckd + p.get("beta", 8.0) * nckd))
        elif method == "dist":
            ps = [_softmax(r, temp) for r in s]
            pt = [_softmax(r, temp) for r in t]
            intra = sum(1 - _pearson([r[c] for r in ps], [r[c] for r in pt]) for c in range(C)) / C
            inter = 1 - _pearson(ps[i], pt[i])
            rows.append(temp**2 * (p.get("beta", 1.0) * inter + p.get("gamma", 1.0) * intra))
    return rows


def _reference(method: str, s, t, y, temp: float, alpha: float, **p) -> float:
    kd = _kd_rows(method, s, t, y, temp, **p)
    total = 0.0
    for i in range(B):
        if y[i] < 0:
            total += kd[i]
        else:
            ce = -math.log(_softmax(s[i].double().tolist())[int(y[i])])
            total += alpha * kd[i] + (1 - alpha) * ce
    return total / B


CASES = [
    ("hinton", {}),
    ("soft_target", {}),
    ("mse_logits", {}),
    ("dkd", {}),
    ("dkd", {"beta": 2.0}),
    ("dist", {}),
    ("dist", {"beta": 2.0, "gamma": 0.5}),
]


@pytest.mark.parametrize("method,params", CASES)
@pytest.mark.parametrize("temp,alpha", [(1.0, 0.5), (4.0, 0.9), (0.5, 0.3)])
def test_loss_matches_float64_reference(method, params, temp, alpha):
    s, t, y = _batch(seed=int(temp * 10))
    loss, parts = METHODS.get(method)(s, t, y, temperature=temp, alpha=alpha, **params)
    expected = _reference(method, s, t, y, temp, alpha, **params)
    assert_close(loss.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-5)
    assert all(not v.requires_grad and v.dim() == 0 for v in parts.values())


@pytest.mark.parametrize("method", METHODS.names())
def test_alpha_zero_is_cross_entropy_and_alpha_one_is_pure_kd(method):
    s, t, y = _batch(unlabelled=0)
    fn = METHODS.get(method)
    at_zero, _ = fn(s, t, y, temperature=2.0, alpha=0.0)
    assert_close(at_zero, torch.nn.functional.cross_entropy(s, y))
    at_one, parts = fn(s, t, y, temperature=2.0, alpha=1.0)
    expected = sum(_kd_rows(method, s, t, y, 2.0)) / B
    assert_close(at_one.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-5)
    assert_close(parts["kd"], at_one)


@pytest.mark.parametrize("method", METHODS.names())
def test_unlabelled_rows_learn_from_the_teacher_only(method):
    s, t, y = _batch(unlabelled=B)
    fn = METHODS.get(method)
    # Whatever alpha says, a row with no label is all KD: alpha 0 must not silence it.
    for alpha in (0.0, 0.5, 1.0):
        loss, parts = fn(s, t, y, temperature=2.0, alpha=alpha)
        assert_close(loss, parts["kd"])
        assert parts["ce"].item() == 0.0
    s = s.clone().requires_grad_()
    fn(s, t, y, temperature=2.0, alpha=0.0)[0].backward()
    assert s.grad.abs().sum() > 0


def test_hinton_gradient_size_roughly_independent_of_temperature():
    g = torch.Generator().manual_seed(1)
    s0 = torch.randn(256, 10, generator=g)
    t = torch.randn(256, 10, generator=g)
    y = torch.full((256,), -1)
    norms = []
    for temp in (2.0, 4.0, 8.0):
        s = s0.clone().requires_grad_()
        METHODS.get("hinton")(s, t, y, temperature=temp, alpha=1.0)[0].backward()
        norms.append(s.grad.norm().item())
    # Without T^2 the gradient shrinks ~T^2 = 16x from T=2 to T=8; with it, within a factor ~1.5.
    assert max(norms) / min(norms) < 1.5


def test_losses_are_computed_in_fp32_from_half_precision_inputs():
    s, t, y = _batch()
    loss32, _ = METHODS.get("hinton")(s, t, y, temperature=4.0, alpha=0.9)
    loss16, _ = METHODS.get("hinton")(s.bfloat16(), t.half(), y, temperature=4.0, alpha=0.9)
    assert loss16.dtype == torch.float32
    assert_close(loss16, loss32, rtol=3e-2, atol=1e-3)


def test_hard_label_ce_ignores_unlabelled_rows():
    s, _, y = _batch(unlabelled=4)
    assert_close(hard_label_ce(s, y), torch.nn.functional.cross_entropy(s[4:], y[4:]))
    assert hard_label_ce(s, torch.full((B,), -1)).item() == 0.0


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ConfigError, match="dist, dkd, hinton, mse_logits, soft_target"):
        METHODS.get("fitnets")
