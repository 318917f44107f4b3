"""Typed errors the client raises. Every API failure keeps the problem `code`, so callers branch on it.

A failed or cancelled job is an error too: `Client.wait` raises `JobFailed` / `JobCancelled` carrying the job.
"""

from __future__ import annotations

from typing import Any


class DistillClientError(Exception):
    """Base class; `code` is the stable machine-readable reason, printed by the CLI."""

    code = "client_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ConnectionFailed(DistillClientError):
    """The server could not be reached (or kept answering 503) after every retry."""

    code = "connection_failed"


class ChecksumMismatch(DistillClientError):
    code = "checksum_mismatch"


class ApiError(DistillClientError):
    """An `application/problem+json` answer from the API."""

    code = "api_error"

    def __init__(self, status: int, code: str, title: str, detail: str,
                 errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail or title, code=code)
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = errors or []

    def __str__(self) -> str:
        fields = "; ".join(f"{e.get('field')}: {e.get('message')}" for e in self.errors)
        text = f"{self.code} ({self.status}): {self.detail or self.title}"
        return f"{text} [{fields}]" if fields and fields not in text else text


class Unauthorized(ApiError):
    pass


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    pass


class InvalidRequest(ApiError):
    pass


class PayloadTooLarge(ApiError):
    pass


class ServerError(ApiError):
    pass


_BY_STATUS: dict[int, type[ApiError]] = {
    401: Unauthorized, 403: Unauthorized, 404: NotFound, 409: Conflict, 413: PayloadTooLarge,
    400: InvalidRequest, 422: InvalidRequest,
}


def error_from_response(status: int, body: Any, reason: str = "") -> ApiError:
    """Builds the typed error from a problem+json body; tolerates non-JSON bodies from proxies."""
    if not isinstance(body, dict):
        body = {}
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else ApiError)
    return cls(
        status=status,
        code=str(body.get("code") or f"http_{status}"),
        title=str(body.get("title") or reason),
        detail=str(body.get("detail") or reason or f"HTTP {status}"),
        errors=body.get("errors") if isinstance(body.get("errors"), list) else None,
    )


class JobFailed(DistillClientError):
    """The job ended `failed`; `code`/`message` are the job's own error."""

    code = "job_failed"

    def __init__(self, job: Any) -> None:
        error = getattr(job, "error", None) or {}
        super().__init__(f"job {job.id} failed: {error.get('message', 'no message')}",
                         code=error.get("code") or "job_failed")
        self.job = job


class JobCancelled(DistillClientError):
    code = "job_cancelled"

    def __init__(self, job: Any) -> None:
        super().__init__(f"job {job.id} was cancelled")
        self.job = job


class WaitTimeout(DistillClientError):
    code = "wait_timeout"
