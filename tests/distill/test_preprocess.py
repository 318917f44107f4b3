"""PreprocessModule: the formula, per-channel broadcasting, and that it survives TorchScript and ONNX."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from worker.distill.config import DistillConfig
from worker.distill.errors import ConfigError
from worker.distill.preprocess import PreprocessModule

torch.set_num_threads(1)
# the legacy exporter is quick, which keeps these tests fast; export.py tries the dynamo one first
pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")


def test_scalar_formula_matches_numpy() -> None:
    x = torch.rand(4, 1, 3, 3) * 255
    module = PreprocessModule(scale=1 / 255, mean=[0.2860], std=[0.3530])
    expected = (x.numpy() / 255 - 0.2860) / 0.3530
    np.testing.assert_allclose(module(x).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_per_channel_values_apply_along_axis_one() -> None:
    x = torch.ones(2, 3, 4, 4)
    out = PreprocessModule(mean=[0.0, 1.0, 2.0], std=[1.0, 2.0, 4.0])(x)
    assert out[:, 0].unique().tolist() == [1.0]
    assert out[:, 1].unique().tolist() == [0.0]
    assert out[:, 2].unique().tolist() == [-0.25]
    table = PreprocessModule(mean=[1.0, 2.0], std=[2.0])(torch.tensor([[3.0, 3.0]]))
    assert table.tolist() == [[1.0, 0.5]], "per-feature on (N, F) tables too; a scalar std broadcasts"


def test_from_config_and_identity() -> None:
    config = DistillConfig.from_dict({"preprocess": {"scale": 0.5, "mean": 1, "std": 2}})
    module = PreprocessModule.from_config(config.preprocess)
    assert module(torch.tensor([[6.0]])).item() == 1.0
    assert PreprocessModule.from_config(DistillConfig().preprocess).is_identity
    assert not module.is_identity


@pytest.mark.parametrize("mean,std", [([0.5], [0.25]), ([0.1, 0.2, 0.3], [0.5, 0.6, 0.7])])
def test_scripts_and_exports_to_onnx(mean: list[float], std: list[float], tmp_path: Path) -> None:
    module = PreprocessModule(scale=1 / 255, mean=mean, std=std)
    x = torch.rand(3, 3, 5, 5) * 255
    torch.testing.assert_close(torch.jit.script(module)(x), module(x))
    torch.onnx.export(
        module, (x[:1],), str(tmp_path / "p.onnx"), dynamo=False, input_names=["x"],
        dynamic_axes={"x": {0: "batch"}},
    )  # fmt: skip
    got = ort.InferenceSession(str(tmp_path / "p.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()}
    )[0]
    np.testing.assert_allclose(got, module(x).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"std": [0.0]}, "std > 0"),
        ({"scale": 0.0}, "scale must be non-zero"),
        ({"mean": [0.0, 0.0], "std": [1.0, 1.0, 1.0]}, "mean has 2 channels but std has 3"),
    ],
)
def test_bad_values_are_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PreprocessModule(**kwargs)
