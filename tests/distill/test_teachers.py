"""Teachers in every accepted format, the refusals, ensembles, scikit-learn via ONNX, and the preflight."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from worker.distill.config import DistillConfig
from worker.distill.errors import ConfigError, MismatchError, TeacherError
from worker.distill.students import build_student
from worker.distill.teachers import check_compatible, detect_format, load_teacher

torch.set_num_threads(1)
# the legacy exporter is quick, which keeps these tests fast; export.py tries the dynamo one first
pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")
ARCH = "mlp:hidden=16"


@pytest.fixture
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return build_student(ARCH, (12,), 5).eval()


def _onnx(model: nn.Module, path: Path, example: torch.Tensor, *, dynamic: bool = True) -> Path:
    axes = {"x": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=False,
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes=axes,
    )
    return path


def _arch(arch: str = ARCH) -> DistillConfig:
    return DistillConfig(teacher_arch=arch)


def test_detect_format_tells_each_kind_apart(mlp: nn.Module, tmp_path: Path) -> None:
    torch.jit.save(torch.jit.script(mlp), str(tmp_path / "a.pt"))
    _onnx(mlp, tmp_path / "b.bin", torch.randn(2, 12))
    save_file(mlp.state_dict(), str(tmp_path / "c.bin"))
    torch.save(mlp.state_dict(), tmp_path / "d.bin")
    torch.save(mlp.state_dict(), tmp_path / "e.bin", _use_new_zipfile_serialization=False)
    kinds = [detect_format(tmp_path / n) for n in ("a.pt", "b.bin", "c.bin", "d.bin", "e.bin")]
    assert kinds == ["torchscript", "onnx", "safetensors", "state_dict", "state_dict"]


@pytest.mark.parametrize("content", [b"", b"hello, I am a text file\n", os.urandom(4096), b"\x08\x07garbage"])
def test_undetectable_files_list_the_accepted_formats(content: bytes, tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(content)
    with pytest.raises(TeacherError, match="accepted: TorchScript.*ONNX.*safetensors.*state dict") as err:
        load_teacher([tmp_path / "model.pt"])
    assert err.value.code == "unknown_teacher_format"


def test_a_zip_that_is_not_a_model_is_refused(tmp_path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(tmp_path / "t.zip", "w") as zf:
        zf.writestr("readme.txt", "not a model")
    with pytest.raises(TeacherError, match="cannot tell"):
        detect_format(tmp_path / "t.zip")


def test_torchscript_teacher(mlp: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "teacher.pt"
    torch.jit.save(torch.jit.script(mlp), str(path))
    teacher = load_teacher([path], input_shape=(12,))
    x = torch.randn(7, 12)
    torch.testing.assert_close(teacher.logits(x), mlp(x))
    assert (teacher.format, teacher.num_classes, teacher.input_shape) == ("torchscript", 5, (12,))
    assert teacher.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert teacher.logits(x).dtype == torch.float32
    assert load_teacher([path]).num_classes is None, "TorchScript does not declare it; nothing to probe with"


def test_onnx_teacher_runs_any_batch_size(mlp: nn.Module, tmp_path: Path) -> None:
    teacher = load_teacher([_onnx(mlp, tmp_path / "t.onnx", torch.randn(2, 12))])
    x = torch.randn(9, 12)
    torch.testing.assert_close(teacher.logits(x), mlp(x), rtol=1e-4, atol=1e-5)
    assert (teacher.format, teacher.num_classes, teacher.input_shape) == ("onnx", 5, (12,))


def test_onnx_teacher_exported_with_a_fixed_batch(mlp: nn.Module, tmp_path: Path) -> None:
    teacher = load_teacher([_onnx(mlp, tmp_path / "t.onnx", torch.randn(4, 12), dynamic=False)])
    x = torch.randn(7, 12)  # not a multiple of 4: the last chunk is padded and trimmed
    torch.testing.assert_close(teacher.logits(x), mlp(x), rtol=1e-4, atol=1e-5)


def test_onnx_softmax_output_is_turned_back_into_logits(mlp: nn.Module, tmp_path: Path) -> None:
    with_softmax = nn.Sequential(mlp, nn.Softmax(dim=1)).eval()
    teacher = load_teacher([_onnx(with_softmax, tmp_path / "t.onnx", torch.randn(2, 12))])
    x = torch.randn(6, 12)
    torch.testing.assert_close(teacher.logits(x).softmax(1), mlp(x).softmax(1), rtol=1e-4, atol=1e-6)


def test_safetensors_teacher_in_a_registry_architecture(mlp: nn.Module, tmp_path: Path) -> None:
    save_file(mlp.state_dict(), str(tmp_path / "w.safetensors"))
    teacher = load_teacher([tmp_path / "w.safetensors"], _arch())
    x = torch.randn(3, 12)
    torch.testing.assert_close(teacher.logits(x), mlp(x))
    assert (teacher.format, teacher.num_classes, teacher.input_shape) == ("safetensors", 5, (12,))


def test_state_dict_teacher_loads_weights_only(tmp_path: Path) -> None:
    torch.manual_seed(1)
    cnn = build_student("cnn:channels=4,8", (1, 10, 10), 3).eval()
    torch.save({"state_dict": cnn.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    teacher = load_teacher([tmp_path / "ckpt.pt"], _arch("cnn:channels=4,8"))
    assert (teacher.format, teacher.num_classes, teacher.input_shape) == ("state_dict", 3, None)
    x = torch.randn(2, 1, 10, 10)
    torch.testing.assert_close(teacher.logits(x), cnn(x))


def test_weights_without_an_architecture_ask_for_one(mlp: nn.Module, tmp_path: Path) -> None:
    save_file(mlp.state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(TeacherError, match="set teacher_arch.*cnn, logreg, mlp, resnet") as err:
        load_teacher([tmp_path / "w.safetensors"])
    assert (err.value.code, err.value.field) == ("teacher_arch_required", "teacher_arch")


@pytest.mark.parametrize("arch", ["mlp:hidden=32", "cnn", "mlp:hidden=16,16"])
def test_weights_that_do_not_fit_the_architecture(arch: str, mlp: nn.Module, tmp_path: Path) -> None:
    torch.save(mlp.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(TeacherError, match="do not fit teacher_arch") as err:
        load_teacher([tmp_path / "sd.pt"], _arch(arch))
    assert err.value.code == "teacher_weights_mismatch"


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # what an attacker ships: unpickling runs this call
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["pickle", "torch.save", "torch.save-legacy"])
def test_pickle_payload_is_refused_and_never_runs(writer: str, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    obj = {"weight": _Payload(marker)}
    path = tmp_path / "teacher.pt"
    if writer == "pickle":
        path.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=writer == "torch.save")
    with pytest.raises(TeacherError, match="refused.*pickle") as err:
        load_teacher([path], _arch())
    assert err.value.code == "unsafe_pickle"
    assert not marker.exists()


def test_a_pickled_whole_module_is_refused(mlp: nn.Module, tmp_path: Path) -> None:
    torch.save(mlp, tmp_path / "model.pt")
    with pytest.raises(TeacherError) as err:
        load_teacher([tmp_path / "model.pt"], _arch())
    assert err.value.code == "unsafe_pickle"


def test_ensemble_of_one_equals_the_teacher(mlp: nn.Module, tmp_path: Path) -> None:
    from worker.distill.teachers import EnsembleTeacher

    torch.jit.save(torch.jit.script(mlp), str(tmp_path / "t.pt"))
    single = load_teacher([tmp_path / "t.pt"], input_shape=(12,))
    ensemble = EnsembleTeacher([single])
    x = torch.randn(8, 12)
    torch.testing.assert_close(ensemble.logits(x).softmax(1), single.logits(x).softmax(1))
    torch.testing.assert_close(ensemble.logits(x).logsumexp(1), torch.zeros(8), atol=1e-6, rtol=0)


def test_ensemble_averages_probabilities(mlp: nn.Module, tmp_path: Path) -> None:
    torch.manual_seed(5)
    other = build_student("logreg", (12,), 5).eval()
    torch.jit.save(torch.jit.script(mlp), str(tmp_path / "a.pt"))
    _onnx(other, tmp_path / "b.onnx", torch.randn(2, 12))
    teacher = load_teacher([tmp_path / "a.pt", tmp_path / "b.onnx"], input_shape=(12,))
    x = torch.randn(6, 12)
    expected = (mlp(x).softmax(1) + other(x).softmax(1)) / 2
    torch.testing.assert_close(teacher.logits(x).exp(), expected, rtol=1e-4, atol=1e-6)
    assert (teacher.format, teacher.num_classes) == ("ensemble", 5)
    swapped = load_teacher([tmp_path / "b.onnx", tmp_path / "a.pt"])
    assert swapped.sha256 == teacher.sha256, "the digest does not depend on the order of the files"


def test_ensemble_members_must_agree_on_classes(mlp: nn.Module, tmp_path: Path) -> None:
    _onnx(mlp, tmp_path / "a.onnx", torch.randn(2, 12))
    _onnx(build_student("logreg", (12,), 3).eval(), tmp_path / "b.onnx", torch.randn(2, 12))
    with pytest.raises(MismatchError, match="disagree on the class count: onnx=5, onnx=3"):
        load_teacher([tmp_path / "a.onnx", tmp_path / "b.onnx"])


def test_scikit_learn_teacher_through_skl2onnx(tmp_path: Path) -> None:
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 4)).astype(np.float32)
    y = (x[:, 0] + 2 * x[:, 1] > 0).astype(int) + (x[:, 2] > 1).astype(int)
    clf = LogisticRegression(max_iter=200).fit(x, y)
    onx = to_onnx(clf, x[:1], options={id(clf): {"zipmap": False}}, target_opset=17)
    (tmp_path / "sk.onnx").write_bytes(onx.SerializeToString())
    teacher = load_teacher([tmp_path / "sk.onnx"])
    assert (teacher.format, teacher.num_classes, teacher.input_shape) == ("onnx", 3, (4,))
    probs = teacher.logits(torch.from_numpy(x)).softmax(1).numpy()
    np.testing.assert_allclose(probs, clf.predict_proba(x), rtol=1e-4, atol=1e-5)


def test_scikit_learn_zipmap_output_is_refused_with_a_hint(tmp_path: Path) -> None:
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    x = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    clf = LogisticRegression().fit(x, (x[:, 0] > 0).astype(int))
    (tmp_path / "sk.onnx").write_bytes(to_onnx(clf, x[:1], target_opset=17).SerializeToString())
    with pytest.raises(TeacherError, match="zipmap"):
        load_teacher([tmp_path / "sk.onnx"])


def test_explicit_format_must_match_the_file(mlp: nn.Module, tmp_path: Path) -> None:
    torch.jit.save(torch.jit.script(mlp), str(tmp_path / "t.pt"))
    with pytest.raises(TeacherError, match="teacher_format is 'onnx' but t.pt is a torchscript file"):
        load_teacher([tmp_path / "t.pt"], DistillConfig(teacher_format="onnx"))
    with pytest.raises(ConfigError, match="accepted: auto, torchscript, onnx, safetensors, state_dict"):
        load_teacher([tmp_path / "t.pt"], DistillConfig(teacher_format="keras"))


def test_check_compatible_accepts_matching_models(mlp: nn.Module, tmp_path: Path) -> None:
    torch.jit.save(torch.jit.script(mlp), str(tmp_path / "t.pt"))
    teacher = load_teacher([tmp_path / "t.pt"])
    student = build_student("logreg", (12,), 5)
    student.train()
    report = check_compatible(teacher, student, torch.randn(10, 12))
    assert report == {
        "input_shape": [12],
        "teacher_output_shape": [2, 5],
        "student_output_shape": [2, 5],
        "num_classes": 5,
    }
    assert teacher.num_classes == 5 and student.training, "class count learnt; student mode restored"


def test_check_compatible_names_both_shapes_on_class_mismatch(mlp: nn.Module, tmp_path: Path) -> None:
    teacher = load_teacher([_onnx(mlp, tmp_path / "t.onnx", torch.randn(2, 12))])
    with pytest.raises(MismatchError, match=r"teacher outputs \(2, 5\) but student outputs \(2, 10\)"):
        check_compatible(teacher, build_student("logreg", (12,), 10), torch.randn(4, 12))


def test_check_compatible_names_the_input_shape_the_teacher_expects(mlp: nn.Module, tmp_path: Path) -> None:
    teacher = load_teacher([_onnx(mlp, tmp_path / "t.onnx", torch.randn(2, 12))])
    with pytest.raises(MismatchError, match=r"shape \(3, 5\) \(the model declares input \(12,\)\)") as err:
        check_compatible(teacher, build_student("logreg", (3, 5), 5), torch.randn(4, 3, 5))
    assert err.value.code == "shape_mismatch"
    torch.jit.save(torch.jit.script(mlp), str(tmp_path / "t.pt"))
    with pytest.raises(MismatchError, match=r"torchscript\) fails on data of shape \(7,\)"):
        load_teacher([tmp_path / "t.pt"], input_shape=(7,))
