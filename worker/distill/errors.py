"""Errors the core raises on bad input. Each carries a stable `code` that the service shows to users."""

from __future__ import annotations


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
