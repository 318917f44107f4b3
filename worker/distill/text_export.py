"""Export a text-classifier student: as a Hugging Face folder (the two transformer kinds) and as ONNX (all).

    out_dir/student_hf/          model.safetensors, config.json, tokenizer.json, tokenizer_config.json
    out_dir/student_hf.tar.gz    that folder's files at its root, byte-identical for the same student
    out_dir/student.onnx         inputs input_ids and attention_mask (int64, batch x sequence), output logits
    out_dir/tokenizer.json       the tokenizer beside it, padding switched on

Extracting the tar gives `AutoModelForSequenceClassification.from_pretrained(folder)` and the tokenizer;
the ONNX model reads the mask it is given, so a runtime feeding the tokenizer's attention_mask gets the
student's logits whatever padding it chose.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from worker.distill.export import ONNX_ATOL, ExportError, _quiet
from worker.distill.lm_export import _write_tar_gz
from worker.distill.text_students import TextClassifier

HF_FOLDER = "student_hf"
HF_ARCHIVE = "student_hf.tar.gz"
ONNX_FILE = "student.onnx"
TOKENIZER_FILE = "tokenizer.json"
INPUTS = ["input_ids", "attention_mask"]


def has_hf_export(student: nn.Module) -> bool:
    """Whether the student is a Hugging Face model underneath (text_transformer, teacher_layers)."""
    return isinstance(getattr(student, "hf", None), nn.Module)


def export_text_hf(student: nn.Module, tokenizer: Any, out_dir: Path) -> Path:
    """Write the folder and its archive into `out_dir`; returns the archive's path. Weights are safetensors
    only, so loading the folder runs no pickle."""
    if not has_hf_export(student):
        raise ExportError(
            f"a Hugging Face export needs a text_transformer or teacher_layers student; "
            f"{type(student).__name__} has no Hugging Face model (export it as ONNX)"
        )
    hf: Any = student.hf
    out_dir = Path(out_dir)
    folder = out_dir / HF_FOLDER
    shutil.rmtree(folder, ignore_errors=True)  # a rerun must not leave an earlier attempt's files in the tar
    folder.mkdir(parents=True)
    student.to("cpu", torch.float32).eval()
    hf.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if not (folder / TOKENIZER_FILE).is_file():
        raise ExportError("the tokenizer is not a fast (tokenizers) tokenizer: no tokenizer.json was written")
    archive = out_dir / HF_ARCHIVE
    _write_tar_gz(folder, archive)
    return archive


class _MaskedClassifier(nn.Module):
    """(input_ids, attention_mask) -> logits: the caller's mask, not one recomputed from the pad id."""

    def __init__(self, student: TextClassifier) -> None:
        super().__init__()
        self.student = student

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        logits: Tensor = self.student.classify(input_ids, attention_mask)
        return logits


def export_text_onnx(student: nn.Module, tokenizer: Any, out_dir: Path, example_ids: Tensor) -> Path:
    """`student.onnx` and `tokenizer.json` into `out_dir`; returns the ONNX path.

    example_ids: a few padded rows (B, L) to trace with. The export must give the torch logits within
    ONNX_ATOL under onnxruntime, on them and on a batch of another size and length, or it is an error.
    """
    if not isinstance(student, TextClassifier):
        raise ExportError(f"{type(student).__name__} is not a text student (text_students.TextClassifier)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    student.to("cpu", torch.float32).eval()
    # eval() on the wrapper too: an exporter restores the mode it found, recursively, on the student as well
    model = _MaskedClassifier(student).eval()
    ids = example_ids.to("cpu", torch.long)
    pad_id = student.pad_id
    padding = torch.full((1, 3), pad_id, dtype=torch.long)
    checks = [ids, torch.cat([torch.cat([ids, ids[:1]]), padding.expand(len(ids) + 1, -1)], dim=1)]
    with torch.no_grad():
        expected = [model(x, (x != pad_id).long()).numpy() for x in checks]
    path = out_dir / ONNX_FILE
    tmp = path.with_name(path.name + ".partial")
    failures = []
    for exporter in (_export_torchscript_based, _export_dynamo):
        try:
            exporter(model, ids, (ids != pad_id).long(), tmp)
            diff = _onnx_difference(tmp, checks, expected, pad_id)
        except Exception as exc:  # noqa: BLE001 - the next exporter may manage; all failures are reported
            failures.append(
                f"{exporter.__name__.removeprefix('_export_')}: {type(exc).__name__}: {exc}"[:300]
            )
            continue
        if diff < ONNX_ATOL:
            break
        failures.append(f"ONNX export differs from torch by {diff:.3g} (limit {ONNX_ATOL})")
    else:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"ONNX export failed: {'; '.join(failures)}")
    tmp.replace(path)  # a half-written or unchecked file never carries the final name
    _write_tokenizer_json(tokenizer, pad_id, out_dir / TOKENIZER_FILE)
    return path


def _export_torchscript_based(model: nn.Module, ids: Tensor, mask: Tensor, path: Path) -> None:
    """Tracing exporter: about ten times faster than torch.export on these graphs, and checked the same."""
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUTS} | {"logits": {0: "batch"}}
    with _quiet(), torch.no_grad():
        torch.onnx.export(model, (ids, mask), str(path), dynamo=False, dynamic_axes=axes,
                          input_names=INPUTS, output_names=["logits"])  # fmt: skip


def _export_dynamo(model: nn.Module, ids: Tensor, mask: Tensor, path: Path) -> None:
    batch, sequence = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=1)
    dims = ({0: batch, 1: sequence}, {0: batch, 1: sequence})
    with _quiet(), torch.no_grad():
        torch.onnx.export(model, (ids, mask), str(path), dynamo=True, external_data=False, verbose=False,
                          dynamic_shapes=dims, input_names=INPUTS, output_names=["logits"])  # fmt: skip


def _onnx_difference(path: Path, checks: list[Tensor], expected: list[np.ndarray], pad_id: int) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for x, want in zip(checks, expected, strict=True):
        feed = {"input_ids": x.numpy(), "attention_mask": (x != pad_id).long().numpy()}
        got = session.run(None, feed)[0]
        worst = max(worst, float(np.abs(got - want).max()) if got.shape == want.shape else float("inf"))
    return worst


def _write_tokenizer_json(tokenizer: Any, pad_id: int, path: Path) -> None:
    """The fast tokenizer's own file, with padding on: a batch encoded by `tokenizers` alone comes with the
    pad id and attention mask the model expects."""
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("the tokenizer is not a fast (tokenizers) tokenizer: no tokenizer.json to write")
    copy = Tokenizer.from_str(backend.to_str())
    copy.enable_padding(pad_id=pad_id, pad_token=tokenizer.convert_ids_to_tokens(pad_id))
    tmp = path.with_name(path.name + ".partial")
    copy.save(str(tmp))
    tmp.replace(path)
