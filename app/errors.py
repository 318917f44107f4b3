"""Domain errors and the one exception handler that renders every failure as RFC 9457 problem+json.

Each noun's `exceptions.py` subclasses `AppError` with a status and a stable `code`; routers never build
error responses themselves. Anything unexpected still leaves as problem+json, never as an HTML 500.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.db.session import database_unavailable

log = logging.getLogger(__name__)
PROBLEM_JSON = "application/problem+json"


class AppError(Exception):
    status = 400
    code = "bad_request"
    title = "Bad request"

    def __init__(
        self,
        detail: str,
        *,
        code: str | None = None,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        self.errors = errors
        self.headers = headers or {}


class NotFound(AppError):
    status, code, title = 404, "not_found", "Not found"


class Conflict(AppError):
    status, code, title = 409, "conflict", "Conflict"


class InvalidRequest(AppError):
    """422 naming the offending field(s): `InvalidRequest("config.epochs", "must be >= 1")`."""

    status, code, title = 422, "validation_error", "Invalid request"

    def __init__(
        self, field: str, message: str, *, code: str | None = None, more: list[dict[str, str]] | None = None
    ) -> None:
        errors = [{"field": field, "message": message}, *(more or [])]
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors), code=code, errors=errors)


class ServiceUnavailable(AppError):
    status, code, title = 503, "service_unavailable", "Service unavailable"

    def __init__(self, detail: str, *, code: str | None = None) -> None:
        super().__init__(detail, code=code, headers={"Retry-After": "5"})


def problem(
    status: int,
    code: str,
    title: str,
    detail: str,
    *,
    errors: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


# ...and the tag of a job config's task (a tagged union on the request's `task`)
_UNION_TAGS = ("float", "int", "str", "bool", "none", "list", "dict", "classification", "causal_lm")


def _field_path(loc: tuple[Any, ...]) -> str:
    """`("body", "config", "temperature", "literal['auto']")` -> `"config.temperature"`."""
    parts = [str(p) for p in loc]
    if len(parts) > 1 and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    # pydantic adds the union member that failed ("literal['auto']", "constrained-float"): not a field
    return ".".join(
        p
        for p in parts
        if "[" not in p and not p.startswith(("constrained-", "function-")) and p not in _UNION_TAGS
    )


def validation_errors(raw: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One entry per field; alternatives of a union are joined with "or"."""
    merged: dict[str, list[str]] = {}
    for error in raw:
        messages = merged.setdefault(_field_path(tuple(error.get("loc", ()))), [])
        message = str(error.get("msg", "invalid value"))
        if message not in messages:
            messages.append(message)
    return [{"field": field, "message": " or ".join(messages)} for field, messages in merged.items()]


_HTTP_CODES = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


async def handle_exception(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, AppError):
        return problem(exc.status, exc.code, exc.title, exc.detail, errors=exc.errors, headers=exc.headers)
    if isinstance(exc, RequestValidationError):
        errors = validation_errors(list(exc.errors()))
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "invalid request"
        return problem(422, "validation_error", "Invalid request", detail, errors=errors)
    if isinstance(exc, StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        headers = dict(exc.headers) if exc.headers else None
        return problem(exc.status_code, code, str(exc.detail), str(exc.detail), headers=headers)
    if database_unavailable(exc):
        log.warning("database unavailable: %s", exc)
        return problem(
            503,
            "database_unavailable",
            "Service unavailable",
            "the database is unreachable; retry",
            headers={"Retry-After": "5"},
        )
    if isinstance(exc, (DataError, psycopg.DataError)):
        # e.g. a NUL character in a string or JSON value: PostgreSQL cannot store it, the client can fix it
        detail = "the request holds a value that cannot be stored"
        return problem(400, "invalid_input", "Invalid input", detail)
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem(500, "internal_error", "Internal server error", "an unexpected error occurred")


def install_exception_handler(app: FastAPI) -> None:
    # Registering the DB errors by class keeps them in ExceptionMiddleware (answered, not re-raised).
    for exc_type in (
        Exception,
        AppError,
        RequestValidationError,
        StarletteHTTPException,
        DBAPIError,
        PoolTimeoutError,
        psycopg.OperationalError,
        psycopg.DataError,
    ):
        app.add_exception_handler(exc_type, handle_exception)
