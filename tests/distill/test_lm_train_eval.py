"""Held-out LM metrics: perplexity over counted tokens only, agreement and KL against the teacher, speed,
greedy generations side by side."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lm_student_fixtures import Windows, row_loader, teacher, tokenizer

from worker.distill.lm_eval import evaluate_lm, generate_side_by_side, perplexity, tokens_per_second
from worker.distill.token_targets import topk_targets


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return teacher(50, layers=2, hidden=32, heads=2, kv_heads=1).model


def _windows() -> Windows:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(50, (5, 9), generator=g, dtype=torch.int32)
    loss_mask = torch.rand(5, 9, generator=g) > 0.3
    return Windows(ids, torch.ones(5, 9, dtype=torch.bool), loss_mask)


def test_perplexity_counts_only_masked_predictions_of_the_next_token(model: torch.nn.Module) -> None:
    windows = _windows()
    with torch.no_grad():
        logits = model(input_ids=windows.input_ids.long()).logits
    nll, count = 0.0, 0
    for row in range(5):
        for t in range(8):  # position t predicts token t + 1; the last position predicts nothing
            if windows.loss_mask[row, t]:
                nll -= F.log_softmax(logits[row, t].double(), -1)[windows.input_ids[row, t + 1]].item()
                count += 1
    expected = math.exp(nll / count)
    assert perplexity(model, windows, batch_size=2) == pytest.approx(expected, rel=1e-5)
    assert evaluate_lm(model, windows, batch_size=5)["tokens"] == count  # and batch size changes nothing
    assert perplexity(model, windows, batch_size=5) == pytest.approx(expected, rel=1e-5)


def test_a_student_that_is_the_teacher_agrees_fully_with_zero_kl(model: torch.nn.Module) -> None:
    windows = _windows()
    with torch.no_grad():
        logits = model(input_ids=windows.input_ids.long()).logits
    own = row_loader(topk_targets(logits, k=50, value_dtype=torch.float64))  # k = V: exact targets
    metrics = evaluate_lm(model, windows, own, batch_size=2)
    assert metrics["agreement"] == 1.0
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)
    other = teacher(50, layers=2, hidden=32, heads=2, kv_heads=1, seed=1).model
    against_other = evaluate_lm(other, windows, own)
    assert against_other["kl"] > 0.01 and against_other["agreement"] < 1.0
    assert evaluate_lm(model, windows)["agreement"] is None  # no targets, no teacher metrics


def test_tokens_per_second_for_batch_1_and_8(model: torch.nn.Module) -> None:
    speed = tokens_per_second(model, seq_len=16, seconds=0.05)
    assert set(speed) == {"batch_1", "batch_8"} and all(v > 0 for v in speed.values())
    assert model.training is False


def test_greedy_generations_side_by_side() -> None:
    tok = tokenizer(300)
    t, s = (
        teacher(len(tok), layers=2, hidden=32, heads=2),
        teacher(len(tok), layers=1, hidden=32, heads=2, seed=1),
    )
    prompts = ["It is a truth", "Emma Woodhouse"]
    rows = generate_side_by_side(t.model, s.model, tok, prompts, max_new_tokens=5)
    assert [r["prompt"] for r in rows] == prompts
    assert all(isinstance(r["teacher"], str) and isinstance(r["student"], str) for r in rows)
    assert rows[0]["teacher"]  # a random model still writes something
    assert generate_side_by_side(t.model, s.model, tok, prompts, max_new_tokens=5) == rows  # greedy
