"""Data-parallel training on CPU (data_parallel.py: 2 processes over gloo): the one-process run on the same
global batches up to summation order, and a run stopped mid-epoch resumes to the very same weights."""

import json
import shutil

import pytest
import torch
from torch import nn

from worker.distill.config import DistillConfig
from worker.distill.data_parallel import train_data_parallel
from worker.distill.students import build_student
from worker.distill.train import Stopped, TensorData, train

torch.set_num_threads(1)
C = 4
# One process sums each batch's gradient in one pass; two sum half a batch each and gloo adds the halves: the
# same numbers added in another order, a relative difference near float32's epsilon (1e-7) per step. After
# these 28 AdamW steps the weights differed by at most 3e-8 (measured); 1e-5 leaves a wide margin, while a
# step on other rows or a wrongly weighted shard moves them by 1e-3 and more.
WEIGHT_ATOL = 1e-5
LOSS_RTOL = 1e-5
TIMING = {"seconds", "samples_per_s"}  # wall-clock figures


def _data(n: int, seed: int, unlabelled: int) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    teacher = (x @ torch.randn(10, C, generator=g)) * 2
    y = teacher.argmax(-1)
    y[:unlabelled] = -1
    return TensorData(x, y, teacher.half())


# 101 rows in batches of 16: six full batches of 8 + 8 rows a process, then 5 rows split 3 + 2, which only
# the per-shard loss weights make the one-process batch mean.
TRAIN, VAL = _data(101, seed=1, unlabelled=30), _data(40, seed=2, unlabelled=5)
CONFIG = DistillConfig(temperature=2.0, alpha=0.5, batch_size=16, epochs=4, lr=1e-2, seed=3)


def _student(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_student("mlp:hidden=32", (10,), C)  # no BatchNorm, no dropout


def _without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in TIMING} for record in history]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """An uninterrupted run on 2 processes: (student, result, its checkpoint folder)."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    student = _student()
    result = train_data_parallel(2, student, TRAIN, VAL, "hinton", CONFIG, ckpt_dir=folder)
    return student, result, folder


def test_two_processes_train_as_one_on_the_same_global_batches(two_processes):
    one = _student()
    expected = train(one, TRAIN, VAL, "hinton", CONFIG)
    student, result, _ = two_processes

    for (name, a), b in zip(one.state_dict().items(), student.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=WEIGHT_ATOL, msg=name)
    assert len(result.history) == len(expected.history) == CONFIG.epochs
    for got, want in zip(result.history, expected.history, strict=True):
        assert set(got) == set(want)
        # Counts of rows (accuracy, agreement) are exact: the summed counts of both processes' rows.
        for key in ("train_acc", "val_acc", "agreement", "lr"):
            assert got[key] == want[key], (got["epoch"], key)
        # Means over a batch's rows; `ce`, over its labelled rows, is combined by rows too (replicas.py).
        for key in ("loss", "kd"):
            assert got[key] == pytest.approx(want[key], rel=LOSS_RTOL), (got["epoch"], key)
    assert (result.best_epoch, result.metric) == (expected.best_epoch, expected.metric)


def test_a_run_stopped_mid_epoch_resumes_on_two_processes_to_the_same_weights(
    tmp_path, monkeypatch, two_processes
):
    import worker.distill.train as train_module

    whole, expected, _ = two_processes
    monkeypatch.setattr(train_module, "STOP_CHECK_SECONDS", -1.0)  # rank 0 polls at every step
    done: list[dict] = []
    asked_after_epoch_2 = []

    def stop() -> bool:  # no at the end of epoch 2, yes at the second step of epoch 3
        if len(done) < 2:
            return False
        asked_after_epoch_2.append(True)
        return len(asked_after_epoch_2) >= 3

    with pytest.raises(Stopped) as stopped:
        train_data_parallel(
            2, _student(), TRAIN, VAL, "hinton", CONFIG, ckpt_dir=tmp_path, on_epoch=done.append, stop=stop
        )
    assert stopped.value.epoch == 2 and [r["epoch"] for r in done] == [1, 2]  # progress from rank 0 only
    assert json.loads((tmp_path / "latest.json").read_text())["epoch"] == 2  # epoch 3 was cut short

    # One process does not take over a two-process run: it starts over (on a copy of the checkpoints).
    shutil.copytree(tmp_path, tmp_path.parent / "copy")
    alone = train(_student(), TRAIN, VAL, "hinton", CONFIG, ckpt_dir=tmp_path.parent / "copy", epochs=1)
    assert alone.resumed_from is None

    monkeypatch.setattr(train_module, "STOP_CHECK_SECONDS", 5.0)
    torch.manual_seed(12345)  # other RNG state and initial weights: both must come from the checkpoint
    student = _student(seed=7)
    resumed = train_data_parallel(2, student, TRAIN, VAL, "hinton", CONFIG, ckpt_dir=tmp_path)

    assert resumed.resumed_from == 2
    for (name, a), b in zip(whole.state_dict().items(), student.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)  # gloo's sum of two is deterministic
    assert _without_timing(resumed.history) == _without_timing(expected.history)
    assert (resumed.best_epoch, resumed.best_metric) == (expected.best_epoch, expected.best_metric)
