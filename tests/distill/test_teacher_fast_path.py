"""A TorchScript teacher on CPU runs frozen and optimized for inference, only where that gives its logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from worker.distill.config import DistillConfig
from worker.distill.teachers import load_teacher

torch.set_num_threads(1)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(16, 5),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.view(-1, 1, 12, 12))


@pytest.fixture
def teacher_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = SmallCNN()
    with torch.no_grad():  # batch-norm statistics that are not the identity, so fusing them matters
        for bn in (model.body[1], model.body[5]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "cnn.pt"
    torch.jit.save(torch.jit.script(model.eval()), path)
    return path


def test_the_optimized_teacher_is_used_and_gives_the_plain_modules_logits(teacher_file: Path) -> None:
    teacher = load_teacher([teacher_file], DistillConfig())
    x = torch.randn(64, 144)
    assert teacher.num_classes in (None, 5)
    zero = teacher.logits(torch.zeros(2, 144))  # a zero probe decides nothing
    assert zero.shape == (2, 5) and teacher.fast is None
    got = teacher.logits(x)
    assert teacher.fast is not None  # decided on the first real batch
    want = torch.jit.load(str(teacher_file)).eval()(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_teacher_that_cannot_be_frozen_runs_as_it_is(teacher_file: Path, monkeypatch) -> None:
    def refuse(module):  # type: ignore[no-untyped-def]
        raise RuntimeError("cannot freeze this module")

    monkeypatch.setattr(torch.jit, "freeze", refuse)
    teacher = load_teacher([teacher_file], DistillConfig())
    x = torch.randn(8, 144)
    got = teacher.logits(x)
    assert teacher.fast is None
    torch.testing.assert_close(got, torch.jit.load(str(teacher_file)).eval()(x))
