"""Typed views of the API's JSON (docs/architecture.md, "HTTP API (v1)").

Each keeps the full answer in `raw`, so a field the server adds later is still reachable without a release.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class FileInfo:
    id: str
    purpose: str
    filename: str
    size: int
    sha256: str
    created_at: str
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FileInfo:
        return cls(id=d["id"], purpose=d.get("purpose", ""), filename=d.get("filename", ""),
                   size=int(d.get("size") or 0), sha256=d.get("sha256", ""),
                   created_at=d.get("created_at", ""), raw=d)


@dataclass(frozen=True)
class Job:
    id: str
    status: str
    task: str
    stage: str | None
    progress: float
    epoch: int | None
    metrics: dict[str, Any]
    error: dict[str, Any] | None
    config: dict[str, Any]
    metadata: dict[str, Any]
    teacher_file_ids: list[str]
    dataset_file_id: str
    validation_file_id: str | None
    student_init_file_id: str | None
    attempts: int
    max_runtime_s: int | None
    created_at: str
    updated_at: str
    timestamps: dict[str, str]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_STATES

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Job:
        # Field for field the server's `JobOut` (tests/app/test_config_mirror.py holds them equal).
        return cls(
            id=d["id"], status=d["status"], task=d.get("task", "classification"), stage=d.get("stage"),
            progress=float(d.get("progress") or 0.0),
            epoch=d.get("epoch"), metrics=d.get("metrics") or {}, error=d.get("error"),
            config=d.get("config") or {}, metadata=d.get("metadata") or {},
            teacher_file_ids=list(d.get("teacher_file_ids") or []),
            dataset_file_id=d.get("dataset_file_id", ""), validation_file_id=d.get("validation_file_id"),
            student_init_file_id=d.get("student_init_file_id"),
            attempts=int(d.get("attempts") or 0), max_runtime_s=d.get("max_runtime_s"),
            created_at=d.get("created_at", ""), updated_at=d.get("updated_at", ""),
            timestamps=d.get("timestamps") or {}, raw=d,
        )  # fmt: skip


@dataclass(frozen=True)
class JobPage:
    data: list[Job]
    next_cursor: str | None


@dataclass(frozen=True)
class Event:
    seq: int
    kind: str
    data: dict[str, Any]
    created_at: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Event:
        return cls(seq=int(d["seq"]), kind=d["kind"], data=d.get("data") or {},
                   created_at=d.get("created_at", ""))


@dataclass(frozen=True)
class Artifact:
    name: str
    size: int
    sha256: str
    content_type: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Artifact:
        return cls(name=d["name"], size=int(d.get("size") or 0), sha256=d.get("sha256", ""),
                   content_type=d.get("content_type", "application/octet-stream"))
