"""Built-in students: shapes, parameter errors, TorchScript and ONNX export, and a user's init module."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from worker.distill.errors import ConfigError, MismatchError
from worker.distill.students import STUDENTS, build_student, load_student_init

torch.set_num_threads(1)
# the legacy exporter is quick, which keeps these tests fast; export.py tries the dynamo one first
pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")

CASES = [
    ("logreg", (6,)),
    ("mlp:hidden=16,8;dropout=0.1", (1, 6, 6)),
    ("mlp", (10,)),
    ("cnn:channels=4,8", (1, 7, 7)),
    ("cnn:channels=4", (5, 5)),  # grey images stored without a channel axis
    ("resnet:depth=8;width=4", (3, 8, 8)),
]


def test_registry_lists_the_four_students() -> None:
    assert STUDENTS.names() == ["cnn", "logreg", "mlp", "resnet"]


@pytest.mark.parametrize("spec,shape", CASES)
def test_student_gives_logits_for_each_class(spec: str, shape: tuple[int, ...]) -> None:
    model = build_student(spec, shape, 3).eval()
    assert model(torch.randn(4, *shape)).shape == (4, 3)


@pytest.mark.parametrize("spec,shape", CASES)
def test_student_scripts_and_exports_to_onnx_with_same_outputs(
    spec: str, shape: tuple[int, ...], tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = build_student(spec, shape, 3).eval()
    x = torch.randn(5, *shape)
    expected = model(x)
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), expected)
    onnx_path = tmp_path / "m.onnx"
    torch.onnx.export(
        model, (x[:2],), str(onnx_path), dynamo=False, input_names=["x"], output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
    )  # fmt: skip
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.numpy()})[0]  # a batch size other than the traced one
    np.testing.assert_allclose(got, expected.detach().numpy(), rtol=1e-4, atol=1e-5)


def test_mlp_layers_follow_the_spec() -> None:
    model = build_student("mlp:hidden=32,16", (1, 28, 28), 10)
    widths = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert widths == [(784, 32), (32, 16), (16, 10)]


def test_resnet_depth_sets_the_block_count() -> None:
    def blocks(depth: int) -> int:
        model = build_student(f"resnet:depth={depth};width=4", (3, 8, 8), 2)
        return sum(type(m).__name__ == "_BasicBlock" for m in model.modules())

    assert (blocks(8), blocks(14)) == (3, 6)


@pytest.mark.parametrize(
    "spec,shape,message",
    [
        ("mlp:hiden=10", (4,), "unknown parameter.*hiden.*accepted: hidden, dropout"),
        ("logreg:hidden=3", (4,), "accepted: none"),
        ("mlp:hidden=0", (4,), "hidden must be positive"),
        ("mlp:dropout=1.5", (4,), r"dropout must be in \[0, 1\)"),
        ("cnn", (784,), r"needs image inputs \(C, H, W\)"),
        ("resnet:depth=10", (3, 8, 8), "6n \\+ 2"),
        ("transformer", (4,), "unknown student 'transformer'; known: cnn, logreg, mlp, resnet"),
    ],
)
def test_bad_specs_are_config_errors(spec: str, shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        build_student(spec, shape, 3)
    assert err.value.field == "student"


def test_student_init_loads_a_users_torchscript_module(tmp_path: Path) -> None:
    torch.manual_seed(0)
    own = nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.Tanh(), nn.Linear(7, 4))
    torch.jit.save(torch.jit.script(own), str(tmp_path / "init.pt"))
    model = load_student_init(tmp_path / "init.pt", num_classes=4, input_shape=(3, 4))
    x = torch.randn(3, 3, 4)
    torch.testing.assert_close(model(x), own(x))
    assert model.training and all(p.requires_grad for p in model.parameters()), "it is trained further"


def test_student_init_with_wrong_output_size_is_a_mismatch(tmp_path: Path) -> None:
    torch.jit.save(torch.jit.script(nn.Linear(12, 4)), str(tmp_path / "init.pt"))
    with pytest.raises(MismatchError, match=r"returns a tensor of shape \(2, 4\).*the teacher's 10 classes"):
        load_student_init(tmp_path / "init.pt", num_classes=10, input_shape=(12,))
    with pytest.raises(MismatchError, match=r"fails on input of shape \(2, 5\)"):
        load_student_init(tmp_path / "init.pt", num_classes=4, input_shape=(5,))


def test_student_init_must_be_torchscript(tmp_path: Path) -> None:
    torch.save(nn.Linear(3, 2).state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ConfigError, match="must be a TorchScript archive.*state_dict") as err:
        load_student_init(tmp_path / "sd.pt", num_classes=2, input_shape=(3,))
    assert err.value.code == "invalid_student_init"
