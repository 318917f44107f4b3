"""Structured JSON logs: one object per line with time, level, logger, message, and the job and request ids
of whatever is running, so one `grep job_…` follows a job through the API and the worker.

The ids live in context variables: the HTTP middleware binds them per request, a Celery task per run
(`install_celery_logging`), and any code can `with bind_job(job_id):`.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

job_id_var: ContextVar[str | None] = ContextVar("distill_job_id", default=None)
request_id_var: ContextVar[str | None] = ContextVar("distill_request_id", default=None)

# Attributes every LogRecord has; anything else came from `extra=` and is logged as a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        job_id = getattr(record, "job_id", None) or job_id_var.get()
        if job_id:
            entry["job_id"] = job_id
        if request_id_var.get():
            entry["request_id"] = request_id_var.get()
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str | int = "INFO") -> None:
    """Routes the root logger to stderr as JSON; safe to call more than once."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_distill_json", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler._distill_json = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    handler.setFormatter(JsonFormatter())
    root.setLevel(level)


@contextmanager
def bind_job(job_id: str | None) -> Iterator[None]:
    token = job_id_var.set(job_id)
    try:
        yield
    finally:
        job_id_var.reset(token)


def install_celery_logging() -> None:
    """Binds the job id (a task's first argument) around every task run, and logs JSON in the worker."""
    from celery import signals

    tokens: dict[str, Any] = {}

    def before(task_id: str | None = None, args: Any = None, **_: Any) -> None:
        job_id = args[0] if args and isinstance(args[0], str) else None
        tokens[task_id or ""] = job_id_var.set(job_id)

    def after(task_id: str | None = None, **_: Any) -> None:
        token = tokens.pop(task_id or "", None)
        if token is not None:
            job_id_var.reset(token)

    def setup(**_: Any) -> None:  # replaces Celery's own plain-text logging setup
        configure_logging()

    signals.task_prerun.connect(before, weak=False)
    signals.task_postrun.connect(after, weak=False)
    signals.setup_logging.connect(setup, weak=False)
