"""TorchScript and ONNX models that use file or custom operators are refused before they run; legit ones load.

Every hostile TorchScript file goes through the loader a job uses (`load_teacher` / `load_student_init`), and
each payload names a marker file that would appear if the operator ever ran.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper
from torch import Tensor, nn

from bench.teacher import FashionCNN
from tests.support.data import onnx_external_weight
from worker.distill.errors import ConfigError, TeacherError
from worker.distill.students import load_student_init
from worker.distill.teachers import load_teacher
from worker.distill.torchscript_guard import UnsafeOperator, check_module

torch.set_num_threads(1)

# A custom operator from a "library" (registered here, as a loaded .so would): any namespace outside the
# built-in ones is refused, whatever the operator does. torchvision's image:: ops are not installed here.
_LIBRARY = torch.library.Library("distill_guard_test", "DEF")
_LIBRARY.define("touch(Tensor x) -> Tensor")
_LIBRARY.impl("touch", lambda x: x.clone(), "CompositeExplicitAutograd")

MARKER = "/tmp/distill-guard-test-marker"  # baked into the scripted code; each test removes it first


@pytest.fixture(autouse=True)
def no_marker():
    Path(MARKER).unlink(missing_ok=True)
    yield
    Path(MARKER).unlink(missing_ok=True)


@torch.jit.script
def _save_and_pass(x: Tensor) -> Tensor:
    torch.save(x, "/tmp/distill-guard-test-marker")
    return x


class SavesInForward(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        torch.save(x, "/tmp/distill-guard-test-marker")
        return x[:, :3]


class ReadsAFile(nn.Module):
    """The reported attack: read a file, return a zero-size tensor whose shape is its bytes."""

    def forward(self, x: Tensor) -> Tensor:
        data = torch.from_file("/etc/hostname", False, 4, dtype=torch.uint8)
        shape: list[int] = [2, 0]
        for value in torch.jit.annotate(list[int], data.tolist()):
            shape.append(value)
        return torch.zeros(shape)


class _Nested(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        for i in range(2):
            if i > 0:
                x = _save_and_pass(x)  # a free function, in an If in a Loop, in a submodule
        return x[:, :3]


class NestedInSubmodule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _Nested()

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)


class SavesInAnotherMethod(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x[:, :3]

    @torch.jit.export
    def calibrate(self, x: Tensor) -> Tensor:
        return _save_and_pass(x)


class SavesInAFork(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.jit.wait(torch.jit.fork(_save_and_pass, x))[:, :3]


class CustomOperator(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.distill_guard_test.touch(x)[:, :3]


class SavesWhileLoading(nn.Module):
    """`torch.jit.load` itself calls `__setstate__`: this runs before any graph could be walked."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.ones(3)

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :3] * self.w

    @torch.jit.export
    def __getstate__(self) -> list[Tensor]:
        return [self.w]

    @torch.jit.export
    def __setstate__(self, state: list[Tensor]) -> None:
        self.w = state[0]
        torch.save(self.w, "/tmp/distill-guard-test-marker")
        self.training = False


class _Plain(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x[:, :3]


def _save_in_hook(module: _Plain, inputs: tuple[Tensor]) -> tuple[Tensor]:
    torch.save(inputs[0], "/tmp/distill-guard-test-marker")
    return inputs


def SavesInAHook() -> nn.Module:  # noqa: N802 - stands in the list of module classes below
    module = _Plain()
    module.register_forward_pre_hook(_save_in_hook)  # hooks run around forward but are not its methods
    return module


def _script(module: nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module), str(path))
    return path


REFUSED = pytest.mark.parametrize(
    ("module", "operator"),
    [
        (SavesInForward, "aten::save"),
        (ReadsAFile, "aten::from_file"),
        (NestedInSubmodule, "aten::save"),
        (SavesInAnotherMethod, "aten::save"),
        (SavesInAFork, "aten::save"),
        (SavesInAHook, "aten::save"),
        (CustomOperator, "distill_guard_test::touch"),
        (SavesWhileLoading, "aten::save"),
    ],
    ids=["forward", "from_file", "nested", "exported_method", "fork", "hook", "custom_namespace", "setstate"],
)


@REFUSED
def test_a_teacher_using_a_refused_operator_never_runs(tmp_path, module, operator) -> None:
    path = _script(module(), tmp_path / "teacher.pt")
    with pytest.raises(TeacherError) as err:
        load_teacher([path], input_shape=(8,))  # with a shape, the loader would run the model
    assert (err.value.code, err.value.field) == ("unsafe_operator", "teacher")
    assert operator in err.value.message and "teacher.pt" in err.value.message
    assert not Path(MARKER).exists()


@REFUSED
def test_the_graph_walk_alone_finds_each_refused_operator(module, operator) -> None:
    """The source check runs first in the loader; this shows the compiled-graph walk stands on its own."""
    with pytest.raises(UnsafeOperator) as err:
        check_module(torch.jit.script(module()))
    assert err.value.operator == operator


def test_the_setstate_payload_is_live_so_refusing_it_before_loading_matters(tmp_path) -> None:
    path = _script(SavesWhileLoading(), tmp_path / "teacher.pt")
    with pytest.raises(TeacherError):
        load_teacher([path])
    assert not Path(MARKER).exists()
    torch.jit.load(str(path))  # the control: a plain load runs __setstate__
    assert Path(MARKER).exists()


def _rewrite_code(src: Path, dst: Path, old: str, new: str) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(
                info, data.replace(old.encode(), new.encode()) if info.filename.endswith(".py") else data
            )
    return dst


@pytest.mark.parametrize(
    "payload",
    [
        'getattr(torch, "save")(self.w, "/tmp/distill-guard-test-marker")',
        't = torch\n    t.save(self.w, "/tmp/distill-guard-test-marker")',
        'ops.aten.save(self.w, "/tmp/distill-guard-test-marker")',
    ],
    ids=["getattr", "alias", "ops_namespace"],
)
def test_hand_written_archive_code_cannot_reach_save_another_way(tmp_path, payload) -> None:
    """torch.jit.save never writes these forms, but the importer compiles any TorchScript it is given."""
    clean = tmp_path / "clean.pt"
    torch.jit.save(torch.jit.script(SavesInForward()), str(tmp_path / "unused.pt"))

    class Loads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.ones(3)

        def forward(self, x: Tensor) -> Tensor:
            return x[:, :3] * self.w

        @torch.jit.export
        def __getstate__(self) -> list[Tensor]:
            return [self.w]

        @torch.jit.export
        def __setstate__(self, state: list[Tensor]) -> None:
            self.w = state[0]
            self.training = False

    _script(Loads(), clean)
    hostile = _rewrite_code(
        clean, tmp_path / "hostile.pt", "self.training = False", payload + "\n    self.training = False"
    )
    with pytest.raises(TeacherError) as err:
        load_teacher([hostile])
    assert err.value.code == "unsafe_operator" and not Path(MARKER).exists()
    torch.jit.load(str(hostile))  # the control: the edited code compiles and runs at load
    assert Path(MARKER).exists()


def test_an_archive_with_two_copies_of_a_code_file_is_refused(tmp_path) -> None:
    path = _script(nn.Linear(8, 3), tmp_path / "teacher.pt")
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".py"))
    with zipfile.ZipFile(path, "a") as zf:  # the loader finds code files by a case-insensitive name
        zf.writestr(name.upper(), "x = 1\n")
    with pytest.raises(TeacherError, match="twice") as err:
        load_teacher([path])
    assert err.value.code == "invalid_teacher"


def test_a_student_init_using_a_refused_operator_is_refused(tmp_path) -> None:
    path = _script(SavesInForward(), tmp_path / "init.pt")
    with pytest.raises(ConfigError) as err:
        load_student_init(path, num_classes=3, input_shape=(8,))
    assert (err.value.code, err.value.field) == ("unsafe_operator", "student_init")
    assert not Path(MARKER).exists()


class Prints(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        print("teacher batch", x.shape)  # prim::Print stays allowed: it only reaches the worker's log
        return x.reshape(len(x), -1)[:, :10]


def _quantized() -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(
    "build",
    [
        lambda: torch.jit.script(FashionCNN().eval()),
        lambda: torch.jit.trace(FashionCNN().eval(), torch.zeros(2, 1, 28, 28)),
        lambda: torch.jit.freeze(torch.jit.script(FashionCNN().eval())),
        lambda: torch.jit.script(_quantized()),
        lambda: torch.jit.script(Prints()),
    ],
    ids=["cnn_scripted", "cnn_traced", "cnn_frozen", "quantized", "prints"],
)
def test_legit_teachers_load_and_run_on_the_fast_path(tmp_path, build) -> None:
    torch.manual_seed(0)
    path = tmp_path / "teacher.pt"
    torch.jit.save(build(), str(path))
    teacher = load_teacher([path], input_shape=(1, 28, 28))
    assert teacher.num_classes == 10
    out = teacher.logits(torch.rand(4, 1, 28, 28))  # the first non-zero batch builds the frozen fast path
    assert out.shape == (4, 10)


# ---------- ONNX


def _onnx_model(nodes, functions=(), initializer=(), domains=()) -> bytes:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 3])],
        initializer=list(initializer),
    )
    opsets = [helper.make_opsetid("", 17), *(helper.make_opsetid(d, 1) for d in domains)]
    model = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    return model.SerializeToString()


def _weights(name: str = "w") -> TensorProto:
    return helper.make_tensor(name, TensorProto.FLOAT, [8, 3], np.ones(24, np.float32))


def test_an_onnx_node_from_a_custom_domain_is_refused(tmp_path) -> None:
    path = tmp_path / "t.onnx"
    node = helper.make_node("ReadFile", ["x"], ["logits"], domain="com.example.io")
    path.write_bytes(_onnx_model([node], domains=["com.example.io"]))
    with pytest.raises(TeacherError) as err:
        load_teacher([path])
    assert err.value.code == "unsafe_operator" and "'com.example.io'" in err.value.message


def test_a_custom_domain_node_inside_an_if_branch_is_refused(tmp_path) -> None:
    branch = helper.make_graph(
        [helper.make_node("ReadFile", ["x"], ["y"], domain="com.example.io")],
        "branch",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
    )
    nodes = [
        helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])),
        helper.make_node("If", ["c"], ["logits"], then_branch=branch, else_branch=branch),
    ]
    path = tmp_path / "t.onnx"
    path.write_bytes(_onnx_model(nodes, domains=["com.example.io"]))
    with pytest.raises(TeacherError) as err:
        load_teacher([path])
    assert err.value.code == "unsafe_operator"


def test_a_model_local_function_in_its_own_domain_is_walked_not_refused(tmp_path) -> None:
    """Exporters put model-local functions in their own domains; their bodies are what is checked."""
    body = [helper.make_node("MatMul", ["a", "b"], ["out"])]
    function = helper.make_function(
        "pkg.local", "Project", ["a", "b"], ["out"], body, [helper.make_opsetid("", 17)]
    )
    node = helper.make_node("Project", ["x", "w"], ["logits"], domain="pkg.local")
    path = tmp_path / "t.onnx"
    path.write_bytes(
        _onnx_model([node], functions=[function], initializer=[_weights()], domains=["pkg.local"])
    )
    teacher = load_teacher([path])
    torch.testing.assert_close(teacher.logits(torch.ones(2, 8)), torch.full((2, 3), 8.0))


MATMUL = helper.make_node("MatMul", ["x", "w"], ["logits"])


@pytest.mark.parametrize("location", ["/etc/hostname", "../dataset/train.npz", "sub/../../x.bin", ""])
def test_onnx_external_data_outside_the_model_folder_is_refused_before_onnxruntime(
    tmp_path, location
) -> None:
    (tmp_path / "teacher").mkdir()
    path = tmp_path / "teacher" / "t.onnx"
    path.write_bytes(_onnx_model([MATMUL], initializer=[onnx_external_weight(location)]))
    with pytest.raises(TeacherError, match="External data path") as err:
        load_teacher([path])
    assert err.value.code == "invalid_teacher" and "ONNXRuntimeError" not in err.value.message


def test_onnx_external_data_through_a_symlink_out_of_the_folder_is_refused(tmp_path) -> None:
    (tmp_path / "teacher").mkdir()
    (tmp_path / "secret.bin").write_bytes(np.ones((8, 3), np.float32).tobytes())
    (tmp_path / "teacher" / "w.bin").symlink_to(tmp_path / "secret.bin")
    path = tmp_path / "teacher" / "t.onnx"
    path.write_bytes(_onnx_model([MATMUL], initializer=[onnx_external_weight("w.bin")]))
    with pytest.raises(TeacherError, match="External data path"):
        load_teacher([path])
    (tmp_path / "teacher" / "w.bin").unlink()
    (tmp_path / "secret.bin").rename(tmp_path / "teacher" / "w.bin")  # the same data beside the model loads
    torch.testing.assert_close(load_teacher([path]).logits(torch.ones(2, 8)), torch.full((2, 3), 8.0))
