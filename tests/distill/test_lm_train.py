"""Token-KD training: KD beats CE-only on a corpus whose teacher knows the answer; resume is exact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lm_student_fixtures import chain_targets, chain_windows, markov_chain, row_loader, teacher
from torch import Tensor

from worker.distill import lm_train
from worker.distill.errors import ConfigError
from worker.distill.lm_eval import evaluate_lm
from worker.distill.lm_students import build_lm_student
from worker.distill.lm_train import Stopped, train_lm

VOCAB = 64
SETTINGS: dict[str, Any] = dict(
    alpha=1.0, temperature=1.0, beta=0.5, batch_size=4, lr=1e-2, weight_decay=0.01, grad_clip=1.0, seed=0
)


@pytest.fixture(scope="module")
def chain() -> dict[str, Any]:
    """A Markov chain over 64 tokens, 4 successors each; its exact transitions are the teacher's targets."""
    probs = markov_chain(VOCAB, successors=4, seed=0)
    train, val = chain_windows(probs, 16, 33, seed=1), chain_windows(probs, 16, 33, seed=2)
    return {
        "train": train,
        "val": val,
        "targets": chain_targets(probs, train, k=16),
        "teacher": teacher(VOCAB),
    }


def _student(chain: dict[str, Any]) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_lm_student("causal_lm:layers=1;hidden=32;heads=2", chain["teacher"])[0]


def test_kd_lowers_held_out_perplexity_more_than_ce_alone(chain: dict[str, Any]) -> None:
    results, perplexities = {}, {}
    for method in ("fkl", "ce"):
        student = _student(chain)
        start = evaluate_lm(student, chain["val"])["perplexity"]
        calls: list[Tensor] = []
        results[method] = train_lm(
            student, chain["train"], chain["val"], row_loader(chain["targets"], calls),
            method=method, epochs=4, ckpt_dir=None, **SETTINGS,
        )  # fmt: skip
        perplexities[method] = evaluate_lm(student, chain["val"])["perplexity"]
        assert perplexities[method] < start / 3  # both learn: ~64 (uniform) at the start
        # The student holds its best epoch's weights, whose perplexity the history recorded.
        history = results[method].history
        best = min(history, key=lambda r: r["val_perplexity"])
        assert results[method].best_epoch == best["epoch"]
        assert perplexities[method] == pytest.approx(best["val_perplexity"], rel=1e-6)
        # Same tokens and steps; CE never reads the teacher's targets, KD reads each row once per epoch.
        assert results[method].steps == 16
        assert len(calls) == (16 if method == "fkl" else 0)
        if calls:
            assert sorted(torch.cat(calls[:4]).tolist()) == list(range(16))
    assert perplexities["fkl"] < 0.85 * perplexities["ce"]
    assert results["ce"].history[-1]["kd"] is None and results["fkl"].history[-1]["kd"] > 0


def _strip_timing(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s")} for r in history]


def _assert_same_run(a: torch.nn.Module, b: torch.nn.Module, ra: Any, rb: Any) -> None:
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert _strip_timing(ra.history) == _strip_timing(rb.history)
    assert (ra.best_epoch, ra.steps) == (rb.best_epoch, rb.steps)


def test_a_run_killed_mid_epoch_resumes_bit_identical(chain: dict[str, Any], tmp_path: Path) -> None:
    settings = {**SETTINGS, "method": "gkd", "alpha": 0.5, "temperature": 2.0, "epochs": 2}
    train, val = chain_windows(markov_chain(VOCAB, 4, 0), 12, 17, seed=3), chain["val"]
    targets = chain_targets(markov_chain(VOCAB, 4, 0), train, k=8)  # 3 steps an epoch, 6 in all

    reference = _student(chain)
    expected = train_lm(reference, train, val, row_loader(targets), ckpt_dir=None, **settings)

    crashing_calls: list[Tensor] = []
    load = row_loader(targets, crashing_calls)

    def crash_at_step_5(rows: Tensor) -> Any:
        if len(crashing_calls) == 4:
            raise RuntimeError("worker killed")
        return load(rows)

    with pytest.raises(RuntimeError, match="worker killed"):
        train_lm(_student(chain), train, val, crash_at_step_5, ckpt_dir=tmp_path, checkpoint_every_steps=2,
                 **settings)  # fmt: skip
    resumed_calls: list[Tensor] = []
    student = _student(chain)
    result = train_lm(student, train, val, row_loader(targets, resumed_calls), ckpt_dir=tmp_path,
                      checkpoint_every_steps=2, **settings)  # fmt: skip
    assert result.resumed_from == 4  # epoch 2, one batch in: the last checkpoint before the crash
    assert len(resumed_calls) == 2  # only the two steps after it ran again
    _assert_same_run(student, reference, result, expected)


def test_a_stopped_run_resumes_bit_identical_and_other_settings_start_over(
    chain: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = {**SETTINGS, "method": "ce", "epochs": 2}
    train, val = chain_windows(markov_chain(VOCAB, 4, 0), 12, 17, seed=3), chain["val"]
    reference = _student(chain)
    expected = train_lm(reference, train, val, None, ckpt_dir=None, **settings)

    monkeypatch.setattr(lm_train, "STOP_CHECK_SECONDS", -1.0)  # ask at every step
    with pytest.raises(Stopped) as info:
        train_lm(_student(chain), train, val, None, ckpt_dir=tmp_path, stop=lambda: True, **settings)
    assert (info.value.epoch, info.value.step) == (1, 1)
    student = _student(chain)
    result = train_lm(student, train, val, None, ckpt_dir=tmp_path, **settings)
    assert result.resumed_from == 1
    _assert_same_run(student, reference, result, expected)

    # Another learning rate is another run: the checkpoint is not resumed.
    other = train_lm(_student(chain), train, val, None, ckpt_dir=tmp_path, **{**settings, "lr": 5e-3})
    assert other.resumed_from is None and other.steps == 6


def test_kd_without_targets_is_a_config_error(chain: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="soft labels"):
        train_lm(
            _student(chain), chain["train"], None, None, method="fkl", epochs=1, ckpt_dir=None, **SETTINGS
        )
    with pytest.raises(ConfigError, match="unknown method 'kl'"):
        train_lm(
            _student(chain), chain["train"], None, None, method="kl", epochs=1, ckpt_dir=None, **SETTINGS
        )


def test_trains_on_text_data_and_stored_token_soft_labels(tmp_path: Path) -> None:
    """The shapes the other LM stages hand over: TokenData's splits and the soft-label stage's shards."""
    import json

    from lm_student_fixtures import TEXTS, tokenizer

    from worker.distill.lm_eval import shift_labels
    from worker.distill.text_data import load_text_dataset, next_token_labels
    from worker.distill.token_softlabels import load_token_targets, token_soft_label_stage

    tok = tokenizer(300)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"prompt": t[:20], "completion": t[20:]}) + "\n" for t in TEXTS))
    data = load_text_dataset(corpus, tok, max_length=24, pack=False, val_fraction=0.25, seed=0)
    train, val = data.split("train"), data.split("val")
    labels, mask = shift_labels(train.input_ids, train.loss_mask)
    assert torch.equal(labels, next_token_labels(data.input_ids, data.loss_mask)[:, :-1])

    tiny = teacher(len(tok), layers=2, hidden=32, heads=2)
    with torch.no_grad():
        token_soft_label_stage(lambda i, a: tiny.model(input_ids=i, attention_mask=a.long()).logits, data,
                               tmp_path / "labels", k=8, shard_rows=4)  # fmt: skip
    stored = load_token_targets(tmp_path / "labels", "train")
    student = build_lm_student("causal_lm:layers=1", tiny)[0]
    start = evaluate_lm(student, val)["perplexity"]
    result = train_lm(student, train, val, row_loader(stored), method="fkl", epochs=2, ckpt_dir=None,
                      **{**SETTINGS, "batch_size": 2})  # fmt: skip
    assert result.history[-1]["kd"] > 0 and result.best_perplexity < start
