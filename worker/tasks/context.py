"""What a worker process holds for all its tasks: settings, the database, the object store, its identity."""

from __future__ import annotations

import os
import socket
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from celery import Celery

from app.config import Settings, get_settings
from app.db import Database
from app.storage import Storage, build_storage
from app.webhooks import hooks
from worker.sandbox import Sandbox


@dataclass
class WorkerContext:
    settings: Settings
    db: Database
    storage: Storage
    # Unique per process start: a restarted worker is a different lease holder than the one that died.
    worker_id: str
    scratch_root: Path
    celery: Celery  # sends the follow-up and retry tasks
    sandbox: Sandbox  # how stage children (user models) are confined

    def work_dir(self, job_id: str) -> Path:
        return self.scratch_root / job_id


_lock = threading.Lock()
_context: WorkerContext | None = None


def get_context() -> WorkerContext:
    """Built on first use inside the worker process (after any pool fork), then shared by its tasks."""
    global _context
    from worker.celery_app import get_celery_app

    with _lock:
        if _context is None:
            # The worker's edge: its status changes reach the jobs' webhooks, as the API's do.
            hooks.install()
            settings = get_settings()
            scratch = (settings.data_dir / "scratch").resolve()
            scratch.mkdir(parents=True, exist_ok=True)
            _context = WorkerContext(
                settings=settings,
                db=Database.from_settings(settings),
                storage=build_storage(settings, for_worker=True),
                worker_id=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
                scratch_root=scratch,
                celery=get_celery_app(),
                sandbox=sandbox_from(settings),
            )
        return _context


def sandbox_from(settings: Settings) -> Sandbox:
    return Sandbox(mode=settings.sandbox, bwrap=settings.bwrap_path, procs=settings.worker_procs)


def set_context(context: WorkerContext | None) -> None:
    """Tests run tasks in-process against their own database and store."""
    global _context
    with _lock:
        _context = context
