"""The object-store key layout, in one place. Every key a tenant's data lives under starts with its tenant id.

A job's keys mirror the core's work folder (`inputs/`, `soft_labels/`, `checkpoints/`, `out/`), so the
worker can sync a folder to a prefix and back without translating names.
"""

from __future__ import annotations

from pathlib import PurePosixPath

READINESS_PROBE = "_distill/readyz"


def _segment(value: str, what: str) -> str:
    if not value or "/" in value or value in (".", "..") or "\\" in value:
        raise ValueError(f"bad {what} for a storage key: {value!r}")
    return value


def file_key(tenant_id: str, file_id: str) -> str:
    return f"tenants/{_segment(tenant_id, 'tenant id')}/files/{_segment(file_id, 'file id')}"


def job_prefix(tenant_id: str, job_id: str) -> str:
    return f"tenants/{_segment(tenant_id, 'tenant id')}/jobs/{_segment(job_id, 'job id')}/"


def job_work_key(tenant_id: str, job_id: str, relpath: str) -> str:
    """Key of `work/<relpath>` for one job; refuses paths that would escape the job's prefix."""
    path = PurePosixPath(relpath)
    if path.is_absolute() or not path.parts or any(p in ("..", ".", "") for p in path.parts):
        raise ValueError(f"bad work-folder path for a storage key: {relpath!r}")
    return job_prefix(tenant_id, job_id) + path.as_posix()


def artifact_key(tenant_id: str, job_id: str, name: str) -> str:
    return job_work_key(tenant_id, job_id, f"out/{_segment(name, 'artifact name')}")
