"""Exported students take the teacher's RAW input and give the same logits in every format."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from worker.distill import export
from worker.distill.export import ExportError, export_student, exportable, write_model_card
from worker.distill.preprocess import PreprocessModule

torch.set_num_threads(1)
PRE = {"scale": 1 / 255, "mean": [0.1, 0.5, 0.9], "std": [0.2, 0.3, 0.4]}
META = {"arch": "tiny", "input_shape": [3, 4], "num_classes": 5, "preprocess": PRE}


def tiny_student() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    student, pre = tiny_student(), PreprocessModule(**PRE)
    raw = torch.rand(16, 3, 4) * 255
    paths = export_student(student, pre, out, sample=raw, formats=["torchscript", "safetensors", "onnx"],
                           metadata=META)  # fmt: skip
    with torch.no_grad():
        expected = student(pre(raw))
    return out, paths, raw, expected


def test_all_formats_are_written_under_their_artifact_names(exported):
    out, paths, _, _ = exported
    assert [p.name for p in paths] == ["student.pt", "student.safetensors", "student.onnx"]
    assert not list(out.glob("*.partial"))


def test_torchscript_takes_raw_input_with_preprocessing_inside(exported):
    out, _, raw, expected = exported
    loaded = torch.jit.load(str(out / "student.pt"))
    torch.testing.assert_close(loaded(raw), expected)
    assert not torch.allclose(loaded(raw), tiny_student()(raw), atol=1e-2)  # raw != preprocessed input


def test_onnx_matches_torch_on_any_batch_size(exported):
    out, _, raw, expected = exported
    session = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 16):
        got = session.run(None, {"input": raw[:n].numpy()})[0]
        assert np.abs(got - expected[:n].numpy()).max() < 1e-4


def test_safetensors_holds_weights_and_metadata(exported):
    out, _, raw, expected = exported
    with safe_open(str(out / "student.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["distill"])
    assert meta == META
    model = exportable(tiny_student(), PreprocessModule(**meta["preprocess"]))
    model.load_state_dict(load_file(str(out / "student.safetensors")))
    torch.testing.assert_close(model(raw), expected)


def test_an_onnx_mismatch_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "ONNX_ATOL", 0.0)  # no export can be within 0
    with pytest.raises(ExportError, match="ONNX export differs") as info:
        sample = torch.rand(4, 3, 4)
        export_student(
            tiny_student(), PreprocessModule(), tmp_path, sample=sample, formats=["onnx"], metadata=META
        )
    assert info.value.code == "export_failed" and not (tmp_path / "student.onnx").exists()


def test_model_card_records_library_versions(tmp_path):
    card = json.loads(write_model_card(tmp_path / "model_card.json", {"seed": 3}).read_text())
    assert card["seed"] == 3
    assert set(card["libraries"]) == {"python", "torch", "numpy", "onnx", "onnxruntime"}
    assert card["libraries"]["torch"] == torch.__version__
