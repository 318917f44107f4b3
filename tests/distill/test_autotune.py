"""Choosing T and alpha: plain cross-entropy is always a candidate, fixed values are left alone."""

import torch
from torch import nn

from worker.distill.autotune import choose_hyperparameters
from worker.distill.config import DistillConfig
from worker.distill.train import TensorData

torch.set_num_threads(1)
C = 3


def _student() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, C))


def _data(n: int, seed: int, *, unlabelled: int = 0, wrong_teacher: bool = False) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, C, generator=torch.Generator().manual_seed(99))  # one rule for train and val
    y = (x @ w).argmax(-1)
    # A wrong teacher is confidently off by one class on every row: distilling from it can only hurt.
    teacher = nn.functional.one_hot((y + 1) % C, C) * 6.0 if wrong_teacher else (x @ w) * 3
    y[:unlabelled] = -1
    return TensorData(x, y, teacher.half())


def _config(**overrides) -> DistillConfig:
    return DistillConfig(**{"batch_size": 16, "lr": 1e-2, "epochs": 8, **overrides})


def test_fixed_values_pass_through_untouched_without_trials():
    config = _config(temperature=3.0, alpha=0.7)
    chosen = choose_hyperparameters(_student, _data(200, 1), _data(50, 2), "hinton", config, budget_epochs=8)
    assert (chosen["temperature"], chosen["alpha"], chosen["trials"]) == (3.0, 0.7, [])
    assert "set in the config" in chosen["why"]


def test_auto_grid_includes_plain_cross_entropy_and_picks_the_best_trial():
    chosen = choose_hyperparameters(
        _student, _data(300, 1), _data(100, 2), "hinton", _config(), budget_epochs=8
    )
    trials = chosen["trials"]
    # All rows labelled: alpha = 0 is the same run at any T, so it is tried once; 3 x 3 distillation runs.
    assert [t["alpha"] for t in trials].count(0.0) == 1 and len(trials) == 10
    best = max(t["score"] for t in trials)
    pick = next(
        t for t in trials if (t["temperature"], t["alpha"]) == (chosen["temperature"], chosen["alpha"])
    )
    assert pick["score"] == best and chosen["metric"] == "val_acc"
    assert f"T = {chosen['temperature']}, alpha = {chosen['alpha']}" in chosen["why"]


def test_a_wrong_teacher_makes_auto_fall_back_to_hard_labels():
    train_data = _data(400, 1, wrong_teacher=True)
    chosen = choose_hyperparameters(_student, train_data, _data(150, 2), "hinton", _config(), budget_epochs=8)
    plain = next(t for t in chosen["trials"] if t["alpha"] == 0.0)
    assert chosen["alpha"] == 0.0, chosen["trials"]
    assert plain["score"] > max(t["score"] for t in chosen["trials"] if t["alpha"] > 0)
    assert "did not beat their hard labels" in chosen["why"]


def test_unlabelled_rows_keep_every_temperature_in_the_plain_trials():
    chosen = choose_hyperparameters(
        _student, _data(200, 1, unlabelled=150), _data(60, 2), "dkd", _config(), budget_epochs=4
    )
    # alpha = 0 still distils the 150 unlabelled rows, so T matters there: the full 3 x 4 grid runs.
    assert len(chosen["trials"]) == 12
    assert {t["temperature"] for t in chosen["trials"] if t["alpha"] == 0.0} == {1.0, 2.0, 4.0}


def test_all_unlabelled_rows_make_alpha_irrelevant_and_val_without_labels_uses_agreement():
    val = _data(60, 2)
    val.y[:] = -1
    chosen = choose_hyperparameters(
        _student, _data(200, 1, unlabelled=200), val, "soft_target", _config(), budget_epochs=4
    )
    assert chosen["alpha"] == 1.0 and "unlabelled" in chosen["why"]
    assert {t["temperature"] for t in chosen["trials"]} == {0.5, 1.0, 2.0}  # soft_target may sharpen
    assert chosen["metric"] == "agreement"


def test_only_the_auto_setting_is_searched():
    chosen = choose_hyperparameters(
        _student,
        _data(200, 1),
        _data(60, 2),
        "mse_logits",
        _config(temperature="auto", alpha=0.25),
        budget_epochs=4,
    )
    # mse_logits has no temperature and alpha is fixed: nothing to search.
    assert chosen["alpha"] == 0.25 and chosen["temperature"] == 1.0 and chosen["trials"] == []
    chosen = choose_hyperparameters(
        _student, _data(200, 1), _data(60, 2), "hinton", _config(temperature=2.0), budget_epochs=4
    )
    assert chosen["temperature"] == 2.0 and {t["temperature"] for t in chosen["trials"]} == {2.0}
    assert sorted(t["alpha"] for t in chosen["trials"]) == [0.0, 0.5, 0.9, 1.0]


def test_search_cost_stays_within_its_budget_and_works_without_a_validation_split():
    n, budget = 15_000, 4  # 60,000 row-passes: past the small-run exception
    chosen = choose_hyperparameters(
        _student, _data(n, 1), None, "hinton", _config(batch_size=256), budget_epochs=budget, max_cost=1.5
    )
    assert chosen["trial_rows"] < n  # a seeded subset, sized to the budget
    cost = chosen["trial_rows"] * chosen["trial_epochs"] * len(chosen["trials"])
    assert cost <= 1.5 * budget * n
    assert chosen["metric"] == "val_acc"  # judged on a holdout carved from train


def test_a_stop_during_the_search_ends_it_at_once():
    """A cancel or timeout while T/alpha are being searched stops the trial under way (no grace-time kill)."""
    import pytest

    from worker.distill.train import Stopped

    asked = []

    def stop() -> bool:
        asked.append(1)
        return True

    with pytest.raises(Stopped):
        choose_hyperparameters(
            _student, _data(400, 1), _data(100, 2), "hinton", _config(), budget_epochs=8, stop=stop
        )
    assert len(asked) == 1  # the first trial asked after its first epoch, and nothing ran after


def test_a_small_training_set_gets_full_length_trials_on_every_row():
    chosen = choose_hyperparameters(
        _student, _data(300, 1), _data(100, 2), "hinton", _config(), budget_epochs=8
    )  # 2,400 row-passes: a full run costs little, and a quarter of one is too short to rank the grid
    assert (chosen["trial_epochs"], chosen["trial_rows"]) == (8, 300)
    assert "8 epoch(s) on 300 of 300 training rows" in chosen["why"]


def test_method_auto_searches_hinton_and_dist_and_trains_with_the_best():
    chosen = choose_hyperparameters(
        _student, _data(300, 1), _data(100, 2), "auto", _config(), budget_epochs=8
    )
    methods = [t["method"] for t in chosen["trials"]]
    trials = chosen["trials"]
    # One plain cross-entropy trial (every row labelled), then T x alpha > 0 for each method.
    assert methods.count("hinton") == 10 and methods.count("dist") == 9
    best = max(trials, key=lambda t: t["score"])  # the first of ties, Hinton KD's trials coming first
    assert (chosen["method"], chosen["temperature"], chosen["alpha"]) == (
        best["method"], best["temperature"], best["alpha"],
    )  # fmt: skip
    assert "method in ['hinton', 'dist']" in chosen["why"] and f"method {best['method']}," in chosen["why"]


def test_method_auto_with_fixed_temperature_and_alpha_still_chooses_the_method():
    chosen = choose_hyperparameters(
        _student, _data(300, 1), _data(100, 2), "auto", _config(temperature=2.0, alpha=0.5), budget_epochs=4
    )
    assert [(t["method"], t["temperature"], t["alpha"]) for t in chosen["trials"]] == [
        ("hinton", 2.0, 0.5),
        ("dist", 2.0, 0.5),
    ]
    assert chosen["method"] in ("hinton", "dist") and (chosen["temperature"], chosen["alpha"]) == (2.0, 0.5)


def test_a_named_method_is_the_only_one_tried():
    chosen = choose_hyperparameters(
        _student, _data(300, 1), _data(100, 2), "dist", _config(), budget_epochs=4
    )
    assert {t["method"] for t in chosen["trials"]} == {"dist"} and chosen["method"] == "dist"
    assert "method in" not in chosen["why"]
