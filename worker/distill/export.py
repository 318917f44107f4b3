"""Export the student so it loads anywhere and takes the same RAW input as the teacher.

The exported model is `Sequential(PreprocessModule, student)` in eval mode on CPU, so a user never has to
re-implement our preprocessing. Formats: TorchScript (`student.pt`), safetensors (`student.safetensors`:
state dict + a JSON metadata string), ONNX (`student.onnx`, dynamic batch axis, checked against torch with
onnxruntime), and `model_card.json` describing how the student was made.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from worker.distill.errors import DistillError

ONNX_ATOL = 1e-4
FILENAMES = {"torchscript": "student.pt", "onnx": "student.onnx", "safetensors": "student.safetensors"}


class ExportError(DistillError):
    code = "export_failed"


def exportable(student: nn.Module, preprocess: nn.Module) -> nn.Module:
    """`Sequential(preprocess, student)` on CPU in eval mode: raw (B, *features) -> logits (B, C).

    It shares (and so moves to CPU and switches to eval) the modules given: a deep copy would turn a
    TorchScript student's parameters into non-leaf tensors that can be neither scripted nor exported.
    """
    return nn.Sequential(preprocess, student).to("cpu", torch.float32).eval()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters warn about deprecations and optional packages on every call: not the user's news."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """`torch.jit.script` keeps data-dependent control flow; modules it cannot compile are traced instead."""
    with _quiet(), torch.no_grad():
        try:
            compiled = torch.jit.script(model)
        except Exception:  # noqa: BLE001 - any scripting failure means: trace
            compiled = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(compiled, str(path))
        reloaded = torch.jit.load(str(path), map_location="cpu")
        diff = (reloaded(example) - model(example)).abs().max().item()
    if not diff <= ONNX_ATOL:
        raise ExportError(f"TorchScript export differs from the model by {diff:.3g}")
    return path


def export_safetensors(model: nn.Module, path: Path, metadata: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    # safetensors refuses shared or strided storage: give every tensor its own contiguous copy
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"distill": json.dumps(metadata, sort_keys=True)})
    return path


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, check_input: torch.Tensor) -> Path:
    """ONNX with a dynamic batch axis; `check_input` (ideally a batch size other than `example`'s) must give
    the torch outputs within `ONNX_ATOL` under onnxruntime, or the export is an error."""
    import onnxruntime as ort

    inputs, outputs = ["input"], ["logits"]
    with _quiet(), torch.no_grad():
        try:
            batch = torch.export.Dim("batch", min=1)
            dims = ({0: batch},)
            torch.onnx.export(model, (example,), str(path), dynamo=True, external_data=False,
                              dynamic_shapes=dims, verbose=False, input_names=inputs,
                              output_names=outputs)  # fmt: skip
        except Exception:  # noqa: BLE001 - torch.export misses some graphs (a TorchScript student init)
            # The TorchScript-based exporter takes a scripted model whole; a trace stops at a ScriptModule.
            axes = {"input": {0: "batch"}, "logits": {0: "batch"}}
            scripted = torch.jit.script(model)
            torch.onnx.export(
                scripted, (example,), str(path), dynamo=False, dynamic_axes=axes,
                input_names=inputs, output_names=outputs,
            )  # fmt: skip
        expected = model(check_input).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": check_input.numpy()})[0]
    diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
    if not diff < ONNX_ATOL:
        raise ExportError(f"ONNX export differs from torch by {diff:.3g} (limit {ONNX_ATOL})")
    return path


def library_versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}  # fmt: skip


def write_model_card(path: Path, card: dict[str, Any]) -> Path:
    """`card` holds teacher/dataset hashes, the resolved config, metrics; library versions are added here."""
    full = {**card, "libraries": library_versions()}
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(full, indent=2, sort_keys=True))
    tmp.replace(path)
    return path


def export_student(
    student: nn.Module,
    preprocess: nn.Module,
    out_dir: Path,
    *,
    sample: torch.Tensor,
    formats: list[str],
    metadata: dict[str, Any],
) -> list[Path]:
    """Write the chosen formats into `out_dir`; `sample` is a few RAW input rows used to trace and check.

    `metadata` (arch spec, input shape, classes, preprocessing) goes into the safetensors header.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = exportable(student, preprocess)
    sample = sample.to("cpu", torch.float32)
    example, check = sample[:2], sample[: max(3, min(len(sample), 8))]
    written: list[Path] = []
    for fmt in formats:
        path = out_dir / FILENAMES[fmt]
        tmp = path.with_name(path.name + ".partial")
        if fmt == "torchscript":
            export_torchscript(model, example, tmp)
        elif fmt == "safetensors":
            export_safetensors(model, tmp, metadata)
        elif fmt == "onnx":
            export_onnx(model, example, tmp, check)
        tmp.replace(path)  # a half-written file never carries the final name
        written.append(path)
    return written
