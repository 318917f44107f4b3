from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from app.jobs.config_schema import (
    LM_STUDENTS,
    STRICT,
    STUDENTS,
    DistillConfigSchema,
    LMConfigSchema,
    model_spec,
)
from app.jobs.state import TIMESTAMP_STATES

MAX_METADATA_BYTES = 16 * 1024


# Ids are ours (`file_<hex>`): anything else is refused here, before it reaches SQL.
FileId = Annotated[str, Field(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_-]+$")]
Task = Literal["classification", "causal_lm"]
DEFAULT_STUDENT = {"classification": "mlp:hidden=128", "causal_lm": "causal_lm"}
STUDENT_NAMES = {"classification": STUDENTS, "causal_lm": LM_STUDENTS}


def _config_task(value: Any) -> str | None:
    """The config's task tag; None (a 422 on `config`) for anything that is not a config object."""
    if isinstance(value, (DistillConfigSchema, LMConfigSchema)):
        return value.task
    task = value.get("task", "classification") if isinstance(value, dict) else None
    return task if isinstance(task, str) else None


# The config's schema is the task's; `_task_into_config` copies the request's `task` in to choose it.
TaskConfig = Annotated[
    Annotated[DistillConfigSchema, Tag("classification")] | Annotated[LMConfigSchema, Tag("causal_lm")],
    Discriminator(_config_task),
]


class JobCreate(BaseModel):
    model_config = STRICT

    # `classification` (every job before language models) or `causal_lm` (token-level KD of a language
    # model); a text classifier is a classification job whose teacher is a transformer.
    task: Task = "classification"
    teacher_file_ids: list[FileId] = Field(min_length=1, max_length=8)
    dataset_file_id: FileId
    validation_file_id: FileId | None = None
    # unset: the task's default (an MLP; a causal LM half the teacher's size)
    student: str | None = Field(default=None, validate_default=True)
    student_init_file_id: FileId | None = None
    config: TaskConfig = Field(default_factory=DistillConfigSchema)
    metadata: dict[str, Any] = Field(default_factory=dict)
    webhook_url: AnyHttpUrl | None = None
    # Wall-clock seconds from the first stage's start; past it the job fails with `timeout` and keeps the
    # last student checkpoint as the artifact `partial_student.pt`.
    max_runtime_s: int | None = Field(default=None, ge=1, le=30 * 24 * 3600)

    @model_validator(mode="before")
    @classmethod
    def _task_into_config(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("config", {}), dict):
            task = data.get("task", "classification")
            if isinstance(task, str) and task in STUDENT_NAMES:  # anything else fails on `task` itself
                data = {**data, "config": {**data.get("config", {}), "task": task}}
        return data

    @field_validator("student")
    @classmethod
    def _student_of_the_task(cls, value: str | None, info: ValidationInfo) -> str:
        task = info.data.get("task", "classification")
        return model_spec(DEFAULT_STUDENT[task] if value is None else value, "student", STUDENT_NAMES[task])

    @model_validator(mode="after")
    def _exports_of_the_student(self) -> JobCreate:
        if isinstance(self.config, DistillConfigSchema) and self.student is not None:
            self.config = self.config.for_student(self.student)
        return self

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
        """The resolved settings the worker hands to `DistillConfig.from_dict` or, for a language model,
        `LMConfig.from_dict` (student included; the task's defaults filled in)."""
        if isinstance(self.config, LMConfigSchema):
            return {**self.config.resolved(), "student": self.student}
        return {**self.config.model_dump(mode="json"), "student": self.student}


class JobError(BaseModel):
    code: str
    message: str


class JobOut(BaseModel):
    id: str
    status: str
    task: str
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
        task=job.task,
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
