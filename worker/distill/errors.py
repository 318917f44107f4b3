"""Errors the core raises on bad input. Each carries a stable `code` that the service shows to users."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol


class DistillError(Exception):
    """Base class: something about the job's inputs or settings is wrong.
    `code` is stable, `message` actionable."""

    code = "distill_error"

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.field = field

    def to_dict(self) -> dict[str, str | None]:
        return {"code": self.code, "message": self.message, "field": self.field}


class ConfigError(DistillError):
    code = "invalid_config"


class TeacherError(DistillError):
    code = "invalid_teacher"


class DatasetError(DistillError):
    code = "invalid_dataset"


class ArchiveError(DatasetError):
    code = "unsafe_archive"


class MismatchError(DistillError):
    """Teacher, student and data disagree (input shape, class count)."""

    code = "shape_mismatch"


# Messages quote what a tenant's model returned or raised. The model is the tenant's code and may have read
# something it should not (a file, another job's data): nothing it controls goes into a message unbounded.
SHOWN_DIMS = 4
LARGEST_DIM = 1_000_000
MAX_CAUSE_CHARS = 300
_TORCHSCRIPT_HEAD = "The following operation failed in the TorchScript interpreter"
_NUMBER = r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
_NUMBER_RUN = re.compile(rf"{_NUMBER}(?:\s*,\s*{_NUMBER}){{{SHOWN_DIMS},}}")


class Shaped(Protocol):
    """A tensor or an array: anything with a `.shape`."""

    @property
    def shape(self) -> Sequence[int]: ...


def describe_shape(shape: Shaped | Sequence[int]) -> str:
    """`(2, 10)`; at most SHOWN_DIMS sizes, each capped: `(2, 0, 100, 115, ... 47 dims)`, `(2, >1e6)`.

    Takes a tensor/array (its `.shape`) or a sequence of ints."""
    dims = list(shape if isinstance(shape, Sequence) else shape.shape)
    shown = [describe_dim(d) for d in dims[:SHOWN_DIMS]]
    if len(dims) > SHOWN_DIMS:
        return f"({', '.join(shown)}, ... {len(dims)} dims)"
    return f"({shown[0]},)" if len(shown) == 1 else f"({', '.join(shown)})"


def describe_dim(size: int) -> str:
    """One size for a message: `10`, or `>1e6` for anything larger (a number a model chose can carry data)."""
    return str(int(size)) if 0 <= int(size) <= LARGEST_DIM else ">1e6"


def error_cause(exc: BaseException, limit: int = MAX_CAUSE_CHARS) -> str:
    """One line naming why `exc` happened, at most `limit` characters, long lists of numbers shortened.

    A TorchScript error starts with a fixed sentence and a traceback of code frames, and its cause (e.g.
    "RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x5 and 8x3)") comes last; anything else
    is summed up by its first line.
    """
    lines = str(exc).strip().splitlines()
    text = _torchscript_cause(lines) if lines and lines[0].startswith(_TORCHSCRIPT_HEAD) else None
    text = _NUMBER_RUN.sub(_shorten_run, text or (lines or [type(exc).__name__])[0])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _torchscript_cause(lines: list[str]) -> str | None:
    """The unindented text after the last "Traceback of TorchScript" header (frames are indented)."""
    headers = [i for i, line in enumerate(lines) if line.startswith("Traceback of TorchScript")]
    rest = [line for line in lines[headers[-1] + 1 :] if line.strip()] if headers else []
    start = next((i for i, line in enumerate(rest) if not line[:1].isspace()), None)
    return None if start is None else " ".join(" ".join(rest[start:]).split())


def _shorten_run(match: re.Match[str]) -> str:
    """A list of numbers in a message ("sizes=[2, 100, 115, ...]") keeps its first few and its length."""
    values = [v.strip() for v in match.group(0).split(",")]
    return f"{', '.join(values[:SHOWN_DIMS])}, ... {len(values)} values"
