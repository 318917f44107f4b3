from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Purpose = Literal["teacher", "dataset", "student_init"]


class FileOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    purpose: str
    filename: str
    size: int
    sha256: str | None
    created_at: datetime


class FilePage(BaseModel):
    data: list[FileOut]
    next_cursor: str | None


class FileRegister(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uri: str = Field(min_length=6, max_length=1100, examples=["s3://my-bucket/datasets/train.npz"])
    purpose: Purpose
    filename: str | None = Field(default=None, min_length=1, max_length=255)
