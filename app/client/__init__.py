"""The typed Python client of the distill API (httpx only: usable without the server's dependencies)."""

from app.client.client import Client
from app.client.errors import (
    ApiError,
    ChecksumMismatch,
    Conflict,
    ConnectionFailed,
    DistillClientError,
    InvalidRequest,
    JobCancelled,
    JobFailed,
    NotFound,
    PayloadTooLarge,
    ServerError,
    Unauthorized,
    WaitTimeout,
)
from app.client.models import Artifact, Event, FileInfo, Job, JobPage

__all__ = [
    "ApiError", "Artifact", "ChecksumMismatch", "Client", "Conflict", "ConnectionFailed",
    "DistillClientError", "Event", "FileInfo", "InvalidRequest", "Job", "JobCancelled", "JobFailed",
    "JobPage", "NotFound",
    "PayloadTooLarge", "ServerError", "Unauthorized", "WaitTimeout",
]
