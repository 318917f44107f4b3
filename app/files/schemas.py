from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Purpose = Literal["teacher", "dataset", "student_init"]


class FileOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    purpose: str
    filename: str
    size: int
    sha256: str | None
    created_at: datetime
    # A dataset registered from an `s3://bucket/prefix/`: how many shard objects it holds (else None).
    shards: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _count_shards(cls, value: Any) -> Any:
        members = getattr(value, "members", None)
        if members is not None and not isinstance(value, dict):
            fields = {name: getattr(value, name) for name in cls.model_fields if name != "shards"}
            return {**fields, "shards": len(members)}
        return value


class FilePage(BaseModel):
    data: list[FileOut]
    next_cursor: str | None


class FileRegister(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # An object, or a prefix ending in "/": every WebDataset shard (*.tar) under it, as one dataset.
    uri: str = Field(
        min_length=6,
        max_length=1100,
        examples=["s3://my-bucket/datasets/train.npz", "s3://my-bucket/datasets/shards/"],
    )
    purpose: Purpose
    filename: str | None = Field(default=None, min_length=1, max_length=255)
