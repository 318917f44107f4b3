"""Error messages that quote a model's outputs stay bounded: a model cannot use them to carry data out.

The reported attack: a TorchScript teacher read a file and returned a zero-size tensor whose shape was the
file's bytes, and the shape_mismatch message listed every one of them.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from worker.distill.errors import ConfigError, MismatchError, describe_shape, error_cause
from worker.distill.softlabels import soft_label_stage
from worker.distill.students import load_student_init
from worker.distill.teachers import EnsembleTeacher, ModuleTeacher, load_teacher

torch.set_num_threads(1)
SECRET = [2, 0, 115, 107, 45, 108, 105, 118, 101]  # "sk-live": what a file's bytes look like as dims


class ShapeCarrier(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros([2, 0, 115, 107, 45, 108, 105, 118, 101])


class HugeDim(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros([2, 0, 123456789])


class Raises(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.text = "A" * 5000

    def forward(self, x: Tensor) -> Tensor:
        if bool(x.sum() == 0):
            raise ValueError(self.text)
        return x


def _save(module: nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module), str(path))
    return path


def test_describe_shape_shows_few_dims_and_caps_each() -> None:
    assert describe_shape(torch.zeros(2, 10)) == "(2, 10)"
    assert describe_shape((5,)) == "(5,)" and describe_shape(()) == "()"
    assert describe_shape(SECRET) == "(2, 0, 115, 107, ... 9 dims)"
    assert describe_shape([2, 10**9]) == "(2, >1e6)"


def test_a_teacher_returning_its_data_as_a_shape_gets_a_bounded_message(tmp_path) -> None:
    with pytest.raises(MismatchError) as err:
        load_teacher([_save(ShapeCarrier(), tmp_path / "t.pt")], input_shape=(8,))
    message = err.value.message
    assert "(2, 0, 115, 107, ... 9 dims)" in message
    assert "45" not in message and "118, 101" not in message  # the rest of the bytes stay behind
    assert "expected a 2-D (batch, classes) tensor with batch 2" in message
    with pytest.raises(MismatchError, match=r"\(2, 0, >1e6\)"):
        load_teacher([_save(HugeDim(), tmp_path / "h.pt")], input_shape=(8,))


def test_a_torchscript_failure_keeps_its_cause_line(tmp_path) -> None:
    with pytest.raises(MismatchError) as err:
        load_teacher([_save(nn.Linear(8, 3), tmp_path / "t.pt")], input_shape=(5,))
    message = err.value.message
    assert message.endswith("RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x5 and 8x3)")
    assert "TorchScript interpreter" not in message
    assert "declares input" not in message  # the data's own shape is not echoed back as "expected"


def test_a_torchscript_cause_is_capped(tmp_path) -> None:
    with pytest.raises(MismatchError) as err:
        load_teacher([_save(Raises(), tmp_path / "t.pt")], input_shape=(8,))
    assert "builtins.ValueError: AAAA" in err.value.message and err.value.message.endswith("...")
    assert len(err.value.message) < 400


def test_error_cause_shortens_long_lists_of_numbers() -> None:
    try:
        torch.zeros([2, *range(100, 147), 0])  # torch's own message lists every size
    except RuntimeError as exc:
        cause = error_cause(exc)
    assert cause.endswith("sizes=[2, 100, 101, 102, ... 49 values]")
    assert error_cause(ValueError("first\nsecond")) == "first" and error_cause(ValueError()) == "ValueError"


def test_ensemble_shape_disagreement_is_bounded() -> None:
    class Fixed(nn.Module):
        def __init__(self, shape: list[int]) -> None:
            super().__init__()
            self.shape = shape

        def forward(self, x: Tensor) -> Tensor:
            return torch.zeros(self.shape)

    members = [ModuleTeacher(Fixed(s), "torchscript", str(i)) for i, s in enumerate(([2, 3], SECRET))]
    with pytest.raises(MismatchError) as err:
        EnsembleTeacher(members).checked_logits(torch.zeros(2, 8))
    assert "torchscript: (2, 3), torchscript: (2, 0, 115, 107, ... 9 dims)" in err.value.message


def test_student_init_messages_are_bounded(tmp_path) -> None:
    with pytest.raises(MismatchError) as err:
        load_student_init(_save(ShapeCarrier(), tmp_path / "i.pt"), num_classes=3, input_shape=(8,))
    assert "(2, 0, 115, 107, ... 9 dims)" in err.value.message and "118" not in err.value.message
    with zipfile.ZipFile(tmp_path / "bad.pt", "w") as zf:
        zf.writestr("bad/code/__torch__.py", "def (:\n")
    with pytest.raises(ConfigError, match="cannot load student init: code file .* cannot be parsed") as err:
        load_student_init(tmp_path / "bad.pt", num_classes=3, input_shape=(8,))
    assert err.value.code == "invalid_student_init"


def test_a_teacher_that_changes_its_class_count_between_batches_is_named(tmp_path) -> None:
    def teacher(x: Tensor) -> Tensor:
        return torch.zeros(len(x), 3 if len(x) == 1 else 115)

    with pytest.raises(MismatchError, match="3 classes for the first row and 115 for a later batch"):
        soft_label_stage(teacher, torch.zeros(10, 4), tmp_path, batch_size=4)
