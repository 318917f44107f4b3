"""The training loop: it learns, keeps the best epoch, and a stopped run resumes to the very same weights."""

import json

import pytest
import torch
from torch import nn

from worker.distill.config import DistillConfig
from worker.distill.errors import ConfigError
from worker.distill.train import Stopped, TensorData, evaluate, train

torch.set_num_threads(1)
C = 4


def _mlp(seed: int = 0, dropout: float = 0.1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(10, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, C))


def _data(n: int, seed: int, unlabelled: int = 0) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    w = torch.randn(10, C, generator=g)
    teacher = (x @ w) * 2
    y = teacher.argmax(-1)
    y[:unlabelled] = -1
    return TensorData(x, y, teacher.half())


def _config(**overrides) -> DistillConfig:
    values = {"temperature": 2.0, "alpha": 0.5, "batch_size": 16, "epochs": 4, "lr": 1e-2, "seed": 3}
    return DistillConfig(**{**values, **overrides})


def _stop_after(epoch: int):
    seen = []
    return (lambda: len(seen) >= epoch), seen.append


@pytest.mark.parametrize("loss_fn", [None, "hinton"])
def test_a_tiny_run_overfits_64_samples(loss_fn):
    data = _data(64, seed=1)
    data.y = torch.randint(0, C, (64,), generator=torch.Generator().manual_seed(9))  # noise: memorise it
    data.teacher_logits = nn.functional.one_hot(data.y, C).float() * 5
    student = _mlp(dropout=0.0)
    config = _config(epochs=60, schedule="constant", alpha=0.5, weight_decay=0.0)
    result = train(student, data, data, loss_fn, config)
    assert result.history[-1]["train_acc"] == 1.0
    assert evaluate(student, data)["val_acc"] == 1.0
    assert result.history[-1]["loss"] < 0.2 * result.history[0]["loss"]


@pytest.mark.parametrize("optimizer,schedule", [("adamw", "cosine"), ("sgd", "onecycle")])
def test_stopped_and_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path, optimizer, schedule):
    train_data, val_data = _data(100, seed=1, unlabelled=30), _data(40, seed=2)
    config = _config(optimizer=optimizer, schedule=schedule)

    whole = _mlp()
    expected = train(whole, train_data, val_data, "hinton", config)

    stop, on_epoch = _stop_after(2)
    with pytest.raises(Stopped) as stopped:
        train(_mlp(), train_data, val_data, "hinton", config, ckpt_dir=tmp_path, stop=stop, on_epoch=on_epoch)
    assert stopped.value.epoch == 2
    assert json.loads((tmp_path / "latest.json").read_text())["epoch"] == 2

    torch.manual_seed(12345)  # the resumed process starts from some other RNG state
    resumed_student = _mlp(seed=7)  # and other initial weights: both must come from the checkpoint
    resumed = train(resumed_student, train_data, val_data, "hinton", config, ckpt_dir=tmp_path)

    assert resumed.resumed_from == 2
    for (name, a), b in zip(whole.state_dict().items(), resumed_student.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    timing = {"seconds", "samples_per_s"}  # wall-clock figures; everything else must match exactly
    drop_time = [{k: v for k, v in r.items() if k not in timing} for r in expected.history]
    assert drop_time == [{k: v for k, v in r.items() if k not in timing} for r in resumed.history]
    assert (resumed.best_epoch, resumed.best_metric) == (expected.best_epoch, expected.best_metric)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    train_data, val_data = _data(100, seed=1), _data(40, seed=2)
    config = _config()
    whole = _mlp()
    train(whole, train_data, val_data, "dkd", config)

    stop, on_epoch = _stop_after(3)
    with pytest.raises(Stopped):
        train(_mlp(), train_data, val_data, "dkd", config, ckpt_dir=tmp_path, stop=stop, on_epoch=on_epoch)
    newest = tmp_path / "epoch-0003.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))

    student = _mlp(seed=5)
    result = train(student, train_data, val_data, "dkd", config, ckpt_dir=tmp_path)
    assert result.resumed_from == 2
    for a, b in zip(whole.state_dict().values(), student.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_checkpoint_is_a_plain_dict_with_checksum_and_a_finished_run_is_not_repeated(tmp_path):
    train_data, val_data = _data(60, seed=1), _data(20, seed=2)
    config = _config(epochs=2)
    first = train(_mlp(), train_data, val_data, "soft_target", config, ckpt_dir=tmp_path)
    latest = json.loads((tmp_path / "latest.json").read_text())
    path = tmp_path / latest["file"]
    assert (tmp_path / f"{latest['file']}.sha256").read_text().split()[0] == latest["sha256"]
    checkpoint = torch.load(path, weights_only=True)
    assert {"model", "optimizer", "scheduler", "rng", "epoch", "best", "history", "config"} <= set(checkpoint)
    assert checkpoint["config"]["temperature"] == 2.0 and checkpoint["epoch"] == 2

    again_epochs = []
    again = train(
        _mlp(seed=4),
        train_data,
        val_data,
        "soft_target",
        config,
        ckpt_dir=tmp_path,
        on_epoch=again_epochs.append,
    )
    assert again.resumed_from == 2 and again_epochs == []
    assert again.history == first.history


def test_a_checkpoint_from_other_settings_is_not_resumed(tmp_path):
    train_data, val_data = _data(60, seed=1), _data(20, seed=2)
    train(_mlp(), train_data, val_data, "hinton", _config(epochs=2), ckpt_dir=tmp_path)
    result = train(_mlp(), train_data, val_data, "hinton", _config(epochs=2, lr=5e-3), ckpt_dir=tmp_path)
    assert result.resumed_from is None and len(result.history) == 2


def test_student_keeps_its_best_validation_epoch():
    train_data = _data(200, seed=1)
    # Validation labels are deliberately wrong: the better the student learns, the worse it scores there.
    val_data = TensorData(train_data.x[:50], (train_data.y[:50] + 1) % C)
    student = _mlp()
    result = train(student, train_data, val_data, None, _config(epochs=5))
    accs = [r["val_acc"] for r in result.history]
    assert result.metric == "val_acc" and result.best_epoch == accs.index(max(accs)) + 1 < 5
    assert evaluate(student, val_data)["val_acc"] == max(accs)


def test_unlabelled_validation_chooses_by_agreement_and_reports_every_field():
    train_data = _data(80, seed=1, unlabelled=80)
    val_data = _data(30, seed=2)
    val_data.y[:] = -1
    records = []
    result = train(
        _mlp(), train_data, val_data, "dist", _config(epochs=2, alpha=1.0), on_epoch=records.append
    )
    assert result.metric == "agreement"
    assert set(records[0]) >= {
        "epoch",
        "loss",
        "kd",
        "ce",
        "train_acc",
        "val_acc",
        "agreement",
        "lr",
        "seconds",
    }
    assert records[0]["train_acc"] is None and records[0]["val_acc"] is None
    assert 0.0 <= records[1]["agreement"] <= 1.0


def test_baseline_trains_on_labelled_rows_and_auto_settings_are_refused():
    train_data = _data(80, seed=1, unlabelled=70)
    result = train(_mlp(), train_data, None, None, _config(epochs=1, batch_size=4))
    assert result.history[0]["train_acc"] is not None and result.metric == "last"
    with pytest.raises(ConfigError, match="autotune"):
        train(_mlp(), train_data, None, "hinton", _config(temperature="auto"))
    with pytest.raises(ConfigError, match="teacher logits"):
        train(_mlp(), TensorData(train_data.x, train_data.y), None, "hinton", _config())


def test_a_stop_inside_an_epoch_discards_only_that_epoch(tmp_path, monkeypatch):
    import worker.distill.train as train_module

    train_data, val_data = _data(100, seed=1), _data(40, seed=2)
    config = _config(epochs=3)
    whole = _mlp()
    train(whole, train_data, val_data, "hinton", config)

    stop, on_epoch = _stop_after(1)
    with pytest.raises(Stopped):  # finish epoch 1, then ask to stop at the epoch boundary
        train(_mlp(), train_data, val_data, "hinton", config, ckpt_dir=tmp_path, stop=stop, on_epoch=on_epoch)
    monkeypatch.setattr(train_module, "STOP_CHECK_SECONDS", -1.0)  # poll on every step
    with pytest.raises(Stopped) as stopped:
        train(_mlp(), train_data, val_data, "hinton", config, ckpt_dir=tmp_path, stop=lambda: True)
    assert stopped.value.epoch == 1  # epoch 2 was cut short and is not checkpointed
    assert json.loads((tmp_path / "latest.json").read_text())["epoch"] == 1

    monkeypatch.setattr(train_module, "STOP_CHECK_SECONDS", 5.0)
    student = _mlp(seed=8)
    assert train(student, train_data, val_data, "hinton", config, ckpt_dir=tmp_path).resumed_from == 1
    for a, b in zip(whole.state_dict().values(), student.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_crash_mid_epoch_resumes_at_its_last_step_checkpoint_to_the_same_weights(tmp_path):
    """`checkpoint_every_steps`: a run killed inside epoch 2 resumes at the step of its last checkpoint (its
    row order, position, running sums and random state) and ends bit for bit as a run never interrupted."""
    from worker.distill.checkpoints import load_latest_checkpoint

    data, val = _data(200, seed=1), _data(50, seed=2)  # 13 steps of 16 rows per epoch (a last one of 8)
    config = _config(epochs=2, checkpoint_every_steps=4)
    whole = _mlp()
    done = train(whole, data, val, "hinton", config, ckpt_dir=tmp_path / "whole")

    crashing, calls = _mlp(), []

    def crash(*_):
        calls.append(1)
        if len(calls) == 13 + 7:  # the 7th training step of epoch 2 (no validation pass in between)
            raise RuntimeError("killed")

    crashing.register_forward_hook(lambda *a: crash() if crashing.training else None)
    with pytest.raises(RuntimeError, match="killed"):
        train(crashing, data, val, "hinton", config, ckpt_dir=tmp_path / "crashed")
    within = load_latest_checkpoint(tmp_path / "crashed")["within"]
    assert within["position"] == 4 and within["perm"].shape == (200,)

    resumed = _mlp(seed=5)  # other initial weights: all of them come from the checkpoint
    result = train(resumed, data, val, "hinton", config, ckpt_dir=tmp_path / "crashed")
    assert result.resumed_from == 1
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    last, again = done.history[-1], result.history[-1]
    keys = ("loss", "train_acc", "val_acc")
    assert [last[k] for k in keys] == [again[k] for k in keys]
