from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AnyHttpUrl, BaseModel, Field, field_validator

from app.jobs.config_schema import STRICT, DistillConfigSchema, model_spec
from app.jobs.state import TIMESTAMP_STATES

MAX_METADATA_BYTES = 16 * 1024


# Ids are ours (`file_<hex>`): anything else is refused here, before it reaches SQL.
FileId = Annotated[str, Field(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_-]+$")]


class JobCreate(BaseModel):
    model_config = STRICT

    teacher_file_ids: list[FileId] = Field(min_length=1, max_length=8)
    dataset_file_id: FileId
    validation_file_id: FileId | None = None
    student: str = "mlp:hidden=128"
    student_init_file_id: FileId | None = None
    config: DistillConfigSchema = Field(default_factory=DistillConfigSchema)
    metadata: dict[str, Any] = Field(default_factory=dict)
    webhook_url: AnyHttpUrl | None = None
    # Wall-clock seconds from the first stage's start; past it the job fails with `timeout` and keeps the
    # last student checkpoint as the artifact `partial_student.pt`.
    max_runtime_s: int | None = Field(default=None, ge=1, le=30 * 24 * 3600)

    @field_validator("student")
    @classmethod
    def _student(cls, value: str) -> str:
        return model_spec(value, "student")

    @field_validator("teacher_file_ids")
    @classmethod
    def _distinct_teachers(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("teacher file ids must not repeat")
        return value

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:  # free-form, so STRICT's float check cannot reach it: NaN and Infinity are not JSON
            encoded = json.dumps(value, separators=(",", ":"), allow_nan=False)
        except ValueError:
            raise ValueError("metadata must not hold NaN or Infinity") from None
        if len(encoded) > MAX_METADATA_BYTES:
            raise ValueError(f"metadata must serialise to at most {MAX_METADATA_BYTES} bytes of JSON")
        return value

    def distill_config(self) -> dict[str, Any]:
        """The resolved settings the worker hands to `DistillConfig.from_dict` (student included)."""
        return {**self.config.model_dump(mode="json"), "student": self.student}


class JobError(BaseModel):
    code: str
    message: str


class JobOut(BaseModel):
    id: str
    status: str
    stage: str | None
    progress: float
    epoch: int | None
    metrics: dict[str, Any]
    error: JobError | None
    config: dict[str, Any]
    metadata: dict[str, Any]
    teacher_file_ids: list[str]
    dataset_file_id: str
    validation_file_id: str | None
    student_init_file_id: str | None
    attempts: int
    max_runtime_s: int | None = None
    created_at: datetime
    updated_at: datetime
    timestamps: dict[str, datetime]


def job_out(job: Any) -> JobOut:
    """From a `Job` row, or any row with the same attribute names (the lean read path selects columns)."""
    stamps = {state: _utc(getattr(job, f"{state}_at")) for state in TIMESTAMP_STATES}
    error = None if job.error_code is None else JobError(code=job.error_code, message=job.error_message or "")
    return JobOut(
        id=job.id,
        status=job.status,
        stage=job.stage,
        progress=job.progress,
        epoch=job.epoch,
        metrics=job.metrics or {},
        error=error,
        config=job.config,
        metadata=job.metadata_ or {},
        teacher_file_ids=job.teacher_file_ids,
        dataset_file_id=job.dataset_file_id,
        validation_file_id=job.validation_file_id,
        student_init_file_id=job.student_init_file_id,
        attempts=job.attempts,
        max_runtime_s=job.max_runtime_s,
        created_at=job.created_at,
        updated_at=job.updated_at,
        timestamps={state: at for state, at in stamps.items() if at is not None},
    )


def _utc(value: datetime | None) -> datetime | None:
    """Rows read straight from the driver carry the server's zone; the API always answers in UTC ("Z")."""
    return None if value is None else value.astimezone(UTC)


class JobPage(BaseModel):
    data: list[JobOut]
    next_cursor: str | None


class EventOut(BaseModel):
    seq: int
    kind: str
    data: dict[str, Any]
    created_at: datetime


class EventList(BaseModel):
    data: list[EventOut]


class ArtifactOut(BaseModel):
    name: str
    size: int
    sha256: str
    content_type: str


class ArtifactList(BaseModel):
    data: list[ArtifactOut]
