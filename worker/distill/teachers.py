"""Teachers from files: loading without unpickling, ensembles, and the preflight check.

Accepted formats, detected from the bytes (never from the file name) by model_formats.py:
- `torchscript`: a `torch.jit.save` zip (has `constants.pkl` / `code/`); runs in the TorchScript interpreter,
  whose loader only rebuilds tensors and TorchScript classes, so no arbitrary Python runs, and whose file and
  custom-library operators are refused before and after loading (torchscript_guard.py);
- `onnx`: a protobuf ModelProto, run with onnxruntime on CPU (any framework, e.g. scikit-learn via skl2onnx);
  custom-op domains and external data outside the model's folder are refused first;
- `safetensors` and `state_dict` (a `torch.save` file): weights only, loaded into `config.teacher_arch` from
  the students registry; a state dict goes through `torch.load(weights_only=True)`, so a pickle carrying
  code or arbitrary objects is refused.
A list of files is an ensemble: the mean of the members' probabilities, returned as its log (valid logits).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from worker.distill.config import DistillConfig
from worker.distill.errors import (
    ConfigError,
    DistillError,
    MismatchError,
    TeacherError,
    describe_shape,
    error_cause,
)
from worker.distill.model_formats import FORMATS, detect_format
from worker.distill.teacher_formats import OnnxSession, load_weights_module
from worker.distill.torchscript_guard import UnsafeOperator, load_torchscript

SHOWN_MEMBERS = 6  # an ensemble's members named in a message

__all__ = ["FORMATS", "Teacher", "check_compatible", "detect_format", "load_teacher", "sha256_file"]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Teacher:
    """A frozen classifier: `logits(x)` maps a preprocessed float32 batch (N, *input_shape) to (N, classes).

    `num_classes`/`input_shape` are None when the format does not say and no probe has run yet;
    `sha256` is the file's digest (for an ensemble: of the members' digests, sorted).
    """

    def __init__(
        self,
        fmt: str,
        sha256: str,
        *,
        input_shape: tuple[int, ...] | None = None,
        num_classes: int | None = None,
    ) -> None:
        self.format = fmt
        self.sha256 = sha256
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.num_classes = num_classes

    def logits(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, x: Tensor) -> Tensor:
        return self.logits(x)

    def to(self, device: torch.device | str) -> Teacher:
        return self

    def probe(self, input_shape: tuple[int, ...]) -> int:
        """Run a zero batch of `input_shape` to learn the class count; MismatchError if the shape is wrong."""
        out = self.checked_logits(torch.zeros(2, *input_shape))
        self.num_classes = int(out.shape[1])
        self.input_shape = self.input_shape or tuple(input_shape)
        return self.num_classes

    def checked_logits(self, x: Tensor) -> Tensor:
        """`logits(x)`, with any failure or a non-(batch, classes) output turned into a MismatchError."""
        try:
            out = self.logits(x)
        except DistillError:
            raise
        except Exception as exc:  # noqa: BLE001 - the model's own message names the layer that broke
            raise MismatchError(
                f"teacher ({self.format}) fails on data of shape {describe_shape(x.shape[1:])}"
                f"{self._declared_input(x)}: {error_cause(exc)}",
                field="teacher",
            ) from None
        if out.dim() != 2 or out.shape[0] != x.shape[0]:
            raise MismatchError(
                f"teacher returns a tensor of shape {describe_shape(out)} for a batch of {len(x)} rows; "
                f"expected a 2-D (batch, classes) tensor with batch {len(x)}",
                field="teacher",
            )
        return out

    def _declared_input(self, x: Tensor) -> str:
        """The input shape the file declares (ONNX), when it is not the data's own shape echoed back."""
        if self.input_shape is None or tuple(self.input_shape) == tuple(x.shape[1:]):
            return ""
        return f" (the model declares input {describe_shape(self.input_shape)})"


class OnnxTeacher(Teacher):
    """Runs on CPU through onnxruntime whatever `to()` says; outputs come back on the input's device."""

    def __init__(self, path: Path, sha256: str) -> None:
        self.session = OnnxSession(path)
        super().__init__(
            "onnx", sha256, input_shape=self.session.input_shape, num_classes=self.session.num_classes
        )

    def logits(self, x: Tensor) -> Tensor:
        return self.session(x)


class ModuleTeacher(Teacher):
    """A torch module (TorchScript or a registry architecture with loaded weights).

    On CPU a TorchScript teacher runs frozen and optimized for inference (`torch.jit.freeze` then
    `torch.jit.optimize_for_inference`: constants folded, conv + batch-norm fused, oneDNN kernels): 3.3x less
    CPU for the Fashion-MNIST CNN (bench/README.md). The optimized copy is used only if it builds and its
    logits on the first non-zero batch match the plain module's (within FAST_TOLERANCE); else the plain one.
    """

    FAST_TOLERANCE = 1e-4

    def __init__(self, module: nn.Module, fmt: str, sha256: str, **shape: Any) -> None:
        super().__init__(fmt, sha256, **shape)
        self.module = module.eval()
        self.device = torch.device("cpu")
        self.fast: torch.jit.ScriptModule | None = None
        self._fast_decided = False

    def logits(self, x: Tensor) -> Tensor:
        x = x.to(self.device, torch.float32)
        with torch.no_grad():
            if not self._fast_decided and bool(x.any()):  # judged on real rows, not a zero probe
                self._decide_fast(x)
            return self._call(self.fast if self.fast is not None else self.module, x)

    def _decide_fast(self, x: Tensor) -> None:
        self._fast_decided = True
        if self.device.type != "cpu" or not isinstance(self.module, torch.jit.ScriptModule):
            return
        try:
            fast = torch.jit.optimize_for_inference(torch.jit.freeze(self.module.eval()))
            got, want = self._call(fast, x), self._call(self.module, x)
        except Exception:  # noqa: BLE001 - any model freezing cannot handle runs as it is
            return
        if got.shape == want.shape and torch.allclose(
            got, want, rtol=self.FAST_TOLERANCE, atol=self.FAST_TOLERANCE
        ):
            self.fast = fast

    @staticmethod
    def _call(module: nn.Module, x: Tensor) -> Tensor:
        out = module(x)
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
            out = out[0]
        elif isinstance(out, dict) and isinstance(out.get("logits"), Tensor):
            out = out["logits"]
        if not isinstance(out, Tensor):
            raise TeacherError(f"teacher returned {type(out).__name__}, expected a logits tensor")
        return out.float()

    def to(self, device: torch.device | str) -> ModuleTeacher:
        self.device = torch.device(device)
        self.module.to(self.device)
        self.fast, self._fast_decided = None, False  # decided again for the new device
        return self


class EnsembleTeacher(Teacher):
    """Averages the members' probabilities (not logits: members may be calibrated differently)."""

    def __init__(self, members: Sequence[Teacher]) -> None:
        classes = {m.num_classes for m in members if m.num_classes is not None}
        if len(classes) > 1:
            shown = ", ".join(f"{m.format}={m.num_classes}" for m in members)
            raise MismatchError(f"ensemble members disagree on the class count: {shown}", field="teacher")
        digest = hashlib.sha256("\n".join(sorted(m.sha256 for m in members)).encode()).hexdigest()
        shapes = {m.input_shape for m in members if m.input_shape is not None}
        super().__init__(
            "ensemble",
            digest,
            num_classes=classes.pop() if classes else None,
            input_shape=shapes.pop() if len(shapes) == 1 else None,
        )
        self.members = list(members)

    def logits(self, x: Tensor) -> Tensor:
        outs = [m.logits(x) for m in self.members]
        if len({tuple(o.shape) for o in outs}) > 1:
            pairs = list(zip(self.members, outs, strict=True))
            shown = ", ".join(f"{m.format}: {describe_shape(o)}" for m, o in pairs[:SHOWN_MEMBERS])
            more = f", ... {len(pairs)} members" if len(pairs) > SHOWN_MEMBERS else ""
            raise MismatchError(
                f"ensemble members return different output shapes: {shown}{more}", field="teacher"
            )
        log_probs = torch.stack([o.float().log_softmax(dim=-1) for o in outs])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(outs))

    def to(self, device: torch.device | str) -> EnsembleTeacher:
        for m in self.members:
            m.to(device)
        return self


def load_teacher(
    paths: Sequence[Path] | Path,
    config: DistillConfig | None = None,
    *,
    input_shape: tuple[int, ...] | None = None,
) -> Teacher:
    """Load one teacher, or an ensemble from several files.

    `input_shape` (the dataset's feature shape) lets the loader probe the class count of formats that do not
    declare it (TorchScript); without it `num_classes` may stay None until `check_compatible` runs.
    """
    config = config or DistillConfig()
    if config.teacher_format != "auto" and config.teacher_format not in FORMATS:
        raise ConfigError(
            f"teacher_format {config.teacher_format!r} unknown; accepted: auto, {', '.join(FORMATS)}",
            field="teacher_format",
        )
    files = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not files:
        raise TeacherError("no teacher file given", code="teacher_not_found", field="teacher")
    members = [_load_one(p, config, input_shape) for p in files]
    teacher = members[0] if len(members) == 1 else EnsembleTeacher(members)
    if input_shape is not None and teacher.num_classes is None:
        teacher.probe(tuple(input_shape))
    return teacher


def _load_one(path: Path, config: DistillConfig, input_shape: tuple[int, ...] | None) -> Teacher:
    fmt = detect_format(path)
    if config.teacher_format not in ("auto", fmt):
        raise TeacherError(
            f"teacher_format is {config.teacher_format!r} but {path.name} is a {fmt} file",
            code="teacher_format_mismatch",
            field="teacher_format",
        )
    sha = sha256_file(path)
    if fmt == "onnx":
        return OnnxTeacher(path, sha)
    if fmt == "torchscript":
        try:
            module = load_torchscript(path)
        except UnsafeOperator as exc:
            raise TeacherError(
                exc.message(path.name, "teacher"), code="unsafe_operator", field="teacher"
            ) from None
        except Exception as exc:  # noqa: BLE001 - a corrupt archive fails in many ways
            raise TeacherError(f"cannot load TorchScript teacher {path.name}: {error_cause(exc)}") from None
        return ModuleTeacher(module, fmt, sha, input_shape=input_shape)
    weights, shape, classes = load_weights_module(path, fmt, config.teacher_arch, input_shape)
    return ModuleTeacher(weights, fmt, sha, input_shape=shape, num_classes=classes)


def check_compatible(teacher: Teacher, student: nn.Module, sample: Tensor) -> dict[str, Any]:
    """Run two preprocessed samples through teacher and student; MismatchError naming both shapes if not.

    Fills in `teacher.num_classes` when the teacher's format did not declare it.
    """
    x = sample[:2] if sample.dtype == torch.int64 else sample[:2].float()  # int64: token ids
    if x.shape[0] == 0:
        raise MismatchError("preflight needs at least one sample", field="dataset")
    t_out = teacher.checked_logits(x)
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            s_out = student(x.to(next(student.parameters(), x).device))
    except Exception as exc:  # noqa: BLE001
        raise MismatchError(
            f"student fails on data of shape {describe_shape(x.shape[1:])}: {error_cause(exc)}",
            field="student",
        ) from None
    finally:
        student.train(was_training)
    if tuple(s_out.shape) != tuple(t_out.shape):
        raise MismatchError(
            f"teacher outputs {describe_shape(t_out)} but student outputs {describe_shape(s_out)} "
            f"for input {describe_shape(x)}",
            field="student",
        )
    if not torch.isfinite(t_out).all():
        raise TeacherError(
            "teacher produced non-finite logits on the first samples", code="teacher_non_finite"
        )
    if teacher.num_classes is None:
        teacher.num_classes = int(t_out.shape[1])
    return {
        "input_shape": list(x.shape[1:]),
        "teacher_output_shape": list(t_out.shape),
        "student_output_shape": list(s_out.shape),
        "num_classes": int(t_out.shape[1]),
    }
