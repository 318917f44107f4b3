"""The task's side of a running stage: forwards the child's messages to the database and says when to stop.

Progress goes to the job row at most about once a second, but a new epoch or a stage change is written at
once (the service turns a new epoch into an `epoch` event). The lease is renewed as a heartbeat; the row's
status is read about once a second so a cancel reaches the child within seconds.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from app.db import session_scope
from app.db.base import utcnow
from app.jobs import service
from app.jobs.state import PIPELINE
from worker.tasks.context import WorkerContext
from worker.tasks.workspace import WorkMirror

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 1.0
# Which job status each step of the core runs under.
STEP_STATUS = {
    "preflight": "soft_labeling",
    "soft_label": "soft_labeling",
    "distill": "distilling",
    "evaluate": "evaluating",
    "export": "exporting",
}
# Set when the worker is asked to shut down (SIGTERM): running stages stop and hand their job back.
shutting_down = threading.Event()


class StageWatch:
    def __init__(
        self, ctx: WorkerContext, job_id: str, status: str, mirror: WorkMirror | None = None
    ) -> None:
        self.ctx, self.job_id, self.status, self.mirror = ctx, job_id, status, mirror
        self.lost: str | None = None  # why this worker no longer owns the job
        self._pending: dict[str, Any] | None = None
        self._last_write = 0.0
        self._last_epoch: tuple[str, int | None] | None = None
        self._next_renew = time.monotonic() + ctx.settings.worker_lease_s / 4
        self._next_push = time.monotonic() + ctx.settings.mirror_interval_s
        self._pusher: threading.Thread | None = None

    def on_message(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "stage":
            self.flush()
            self._enter(STEP_STATUS.get(msg["name"], self.status))
        elif msg["type"] == "progress":
            event = msg["event"]
            epoch_key = (str(event.get("stage")), event.get("epoch"))
            new_epoch = event.get("epoch") is not None and epoch_key != self._last_epoch
            self._pending = event
            if new_epoch or time.monotonic() - self._last_write >= PROGRESS_INTERVAL_S:
                self.flush()
            if new_epoch:
                self._last_epoch = epoch_key
            if self.mirror is not None and (new_epoch or time.monotonic() >= self._next_push):
                self._push_in_background()
                self._next_push = time.monotonic() + self.ctx.settings.mirror_interval_s

    def _push_in_background(self) -> None:
        """The epoch's checkpoint (or the shards so far) survive this machine. Off this thread, because an
        upload retrying through a storage outage must not stop the lease heartbeat (the reaper would take the
        job from a worker that is fine). One push at a time; one that fails is redone by the next."""
        if self._pusher is not None and self._pusher.is_alive():
            return
        self._pusher = threading.Thread(target=self._push, name=f"mirror-{self.job_id}", daemon=True)
        self._pusher.start()

    def _push(self) -> None:
        assert self.mirror is not None
        try:
            self.mirror.push()
        except Exception as exc:  # the stage's final push (synchronous) is the one that must succeed
            log.warning(
                "job %s: mirroring the work folder failed, retried at the next push: %s", self.job_id, exc
            )

    @contextlib.contextmanager
    def heartbeat(self) -> Iterator[None]:
        """Keep the lease while the task itself works after the child (final uploads, which may be retrying
        through a storage outage): no child messages come then to drive `should_stop`."""
        done = threading.Event()

        def beat() -> None:
            every = self.ctx.settings.worker_lease_s / 4
            while not done.wait(every):
                try:
                    with session_scope(self.ctx.db) as session:
                        if not service.renew_lease(
                            session, self.job_id, self.ctx.worker_id, lease_s=self.ctx.settings.worker_lease_s
                        ):
                            return
                except Exception as exc:  # the database away too: the lease may lapse, the reaper decides
                    log.warning("job %s: renewing the lease failed: %s", self.job_id, exc)

        thread = threading.Thread(target=beat, name=f"lease-{self.job_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def drain(self) -> None:
        """Wait for a background push, so the caller's own push never runs beside it."""
        if self._pusher is not None:
            self._pusher.join()

    def _enter(self, new: str) -> None:
        # Only forward: a resumed task re-runs earlier steps (they find their work done) under a later status.
        if self.lost or PIPELINE.index(new) <= PIPELINE.index(self.status):
            return
        with session_scope(self.ctx.db) as session:
            job = service.claim_stage(
                session,
                self.job_id,
                self.status,
                new,
                self.ctx.worker_id,
                lease_s=self.ctx.settings.worker_lease_s,
            )
        if job is None:
            self.lost = "moved"
        else:
            self.status = new

    def flush(self) -> None:
        event, self._pending = self._pending, None
        if event is None or self.lost:
            return
        metrics = event.get("metrics") or {}
        metrics = {"stage": event.get("stage"), **metrics} if event.get("stage") else metrics
        with session_scope(self.ctx.db) as session:
            running = service.record_progress(
                session, self.job_id, float(event.get("progress") or 0.0), event.get("epoch"), metrics
            )
        self._last_write = time.monotonic()
        if not running:
            self.lost = "moved"

    def should_stop(self) -> str | None:
        """A reason to stop the child now ("cancelled", "lease_lost", "shutdown", "timeout"), or None."""
        if shutting_down.is_set():
            return "shutdown"
        with session_scope(self.ctx.db) as session:
            job = service.get_job_for_worker(session, self.job_id)
            status = None if job is None else job.status
            if status == self.status and time.monotonic() >= self._next_renew:
                if not service.renew_lease(
                    session, self.job_id, self.ctx.worker_id, lease_s=self.ctx.settings.worker_lease_s
                ):
                    return "lease_lost"
                self._next_renew = time.monotonic() + self.ctx.settings.worker_lease_s / 4
        if status == "cancelled":
            return "cancelled"
        if status != self.status or self.lost:
            return "lease_lost"
        if job is not None and past_deadline(job.max_runtime_s, job.soft_labeling_at):
            return "timeout"
        return None


def past_deadline(max_runtime_s: int | None, started_at: datetime | None) -> bool:
    """The job's wall clock runs from its first stage's start, across attempts and workers."""
    if not max_runtime_s or started_at is None:
        return False
    return utcnow() - started_at > timedelta(seconds=max_runtime_s)
