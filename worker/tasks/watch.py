"""The task's side of a running stage: forwards the child's messages to the database and says when to stop.

Progress goes to the job row at most about once a second, but a new epoch or a stage change is written at
once (the service turns a new epoch into an `epoch` event). The lease is renewed as a heartbeat; the row's
status is read about once a second so a cancel reaches the child within seconds.

The database being away (a restart, a failover, a network cut) does not stop the child: writes queue up in
order (epoch records, stage changes, the latest progress) and go out once it answers; until then the stage
computes on. When it is back, the first lease renewal says whether this worker still owns the job (the
reaper may have handed it on if the outage outlasted the lease), and the stage stops if not.

A shard task of a split soft-label stage is watched the same way, with the shard's lease and progress in
place of the job's; cancel and `max_runtime_s` are read from the job row, so they reach every shard.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from app.db import database_unavailable, session_scope
from app.db.base import utcnow
from app.jobs import lifecycle
from app.jobs.state import PIPELINE
from worker.tasks.context import WorkerContext
from worker.tasks.workspace import WorkMirror

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 1.0
# Which job status each step of the core runs under.
STEP_STATUS = {
    "preflight": "soft_labeling",
    "soft_label": "soft_labeling",
    "soft_label_rows": "soft_labeling",
    "distill": "distilling",
    "evaluate": "evaluating",
    "export": "exporting",
}
# Set when the worker is asked to shut down (SIGTERM): running stages stop and hand their job back.
shutting_down = threading.Event()

T = TypeVar("T")
_AWAY = object()  # what `_db` returns while the database is unreachable


class StageWatch:
    """`shard`: the number of the shard task this stage is (its lease is renewed and its progress recorded
    instead of the job's)."""

    def __init__(
        self,
        ctx: WorkerContext,
        job_id: str,
        status: str,
        mirror: WorkMirror | None = None,
        *,
        shard: int | None = None,
    ) -> None:
        self.ctx, self.job_id, self.status, self.mirror, self.shard = ctx, job_id, status, mirror, shard
        self.lost: str | None = None  # why this worker no longer owns the job
        # Unwritten, in order: ("enter", status) and ("progress", event, starts_epoch); a progress event
        # replaces the one before it unless that one starts an epoch (its record is kept).
        self._queue: list[tuple[Any, ...]] = []
        self._db_away_since: float | None = None
        self._last_write = 0.0
        self._last_epoch: tuple[str, str | None, int | None] | None = None
        self._next_renew = time.monotonic() + ctx.settings.worker_lease_s / 4
        self._next_push = time.monotonic() + ctx.settings.mirror_interval_s
        self._pusher: threading.Thread | None = None

    def on_message(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "stage":
            self._queue.append(("enter", STEP_STATUS.get(msg["name"], self.status)))
            # Every step says in the job's events how the user's model was confined while it ran.
            confinement = {k: msg.get(k) for k in ("sandbox", "network_isolated")}
            self._queue.append(("step", {"step": msg["name"], **confinement}))
            self.flush()
        elif msg["type"] == "progress":
            event = msg["event"]
            phase = (event.get("metrics") or {}).get("phase")
            epoch_key = (str(event.get("stage")), phase, event.get("epoch"))
            new_epoch = event.get("epoch") is not None and epoch_key != self._last_epoch
            if self._queue and self._queue[-1][0] == "progress" and not self._queue[-1][2]:
                self._queue[-1] = ("progress", event, new_epoch)
            else:
                self._queue.append(("progress", event, new_epoch))
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
                        if not self._renew(session):
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

    def _db(self, fn: Callable[[Session], T]) -> T | object:
        """`fn` in one transaction, or `_AWAY` when the database cannot be reached (logged once an outage)."""
        try:
            with session_scope(self.ctx.db) as session:
                result = fn(session)
        except Exception as exc:
            if not database_unavailable(exc):
                raise
            if self._db_away_since is None:
                self._db_away_since = time.monotonic()
                log.warning(
                    "job %s: database unreachable, the stage runs on and its writes wait: %s",
                    self.job_id,
                    exc,
                )
            return _AWAY
        if self._db_away_since is not None:
            away = time.monotonic() - self._db_away_since
            log.warning("job %s: database back after %.1f s; writing what waited", self.job_id, away)
            self._db_away_since = None
        return result

    def flush(self) -> None:
        """Write what is queued, in order; stop at the first write the database is not there for."""
        while self._queue and not self.lost:
            item = self._queue[0]
            if item[0] == "enter":
                done = self._enter(item[1])
            elif item[0] == "step":
                done = self._step_event(item[1])
            else:
                done = self._record(item[1])
            if not done:
                return
            self._queue.pop(0)
        self._queue.clear()  # lost: nothing of this worker's is written any more

    def settle(self, wait_s: float) -> None:
        """After the child: write everything still queued, waiting out a database outage for up to `wait_s`
        (the outputs are on the scratch disk; the success path that follows needs the database anyway)."""
        deadline, delay = time.monotonic() + wait_s, 0.25
        self.flush()
        while self._queue and not self.lost and time.monotonic() < deadline:
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(2 * delay, 5.0)
            self.flush()

    def _enter(self, new: str) -> bool:
        # Only forward: a resumed task re-runs earlier steps (they find their work done) under a later status.
        if PIPELINE.index(new) <= PIPELINE.index(self.status):
            return True
        old = self.status
        lease_s = self.ctx.settings.worker_lease_s
        job = self._db(
            lambda session: lifecycle.claim_stage(
                session, self.job_id, old, new, self.ctx.worker_id, lease_s=lease_s
            )
        )
        if job is _AWAY:
            return False
        if job is None:
            self.lost = "moved"
        else:
            self.status = new
        return True

    def _step_event(self, data: dict[str, Any]) -> bool:
        if self.lost:
            return True
        data = data if self.shard is None else {**data, "shard": self.shard}
        return (
            self._db(lambda session: lifecycle.add_event(session, self.job_id, "step_started", data))
            is not _AWAY
        )

    def _record(self, event: dict[str, Any]) -> bool:
        metrics = event.get("metrics") or {}
        metrics = {"stage": event.get("stage"), **metrics} if event.get("stage") else metrics
        progress, epoch = float(event.get("progress") or 0.0), event.get("epoch")
        running = self._db(lambda session: self._report(session, progress, epoch, metrics))
        if running is _AWAY:
            return False
        self._last_write = time.monotonic()
        if not running:
            self.lost = "moved"
        return True

    def should_stop(self) -> str | None:
        """A reason to stop the child now ("cancelled", "lease_lost", "shutdown", "timeout"), or None."""
        if shutting_down.is_set():
            return "shutdown"
        if self._queue and self._db_away_since is not None:
            self.flush()  # the outage may be over: what waited goes out first
        checked = self._db(self._check)
        if checked is _AWAY:
            return None  # computing on; the first renewal after the outage decides
        assert isinstance(checked, tuple)
        job, renewed = checked
        if renewed is False:
            return "lease_lost"
        status = None if job is None else job.status
        if status == "cancelled":
            return "cancelled"
        if status != self.status or self.lost:
            return "lease_lost"
        if job is not None and past_deadline(job.max_runtime_s, job.soft_labeling_at):
            return "timeout"
        return None

    def _check(self, session: Session) -> tuple[Any, bool | None]:
        """The job row (None if gone) and, when a renewal was due, whether the lease was renewed."""
        job = lifecycle.get_job_for_worker(session, self.job_id)
        renewed = None
        if job is not None and job.status == self.status and time.monotonic() >= self._next_renew:
            renewed = self._renew(session)
            if renewed:
                self._next_renew = time.monotonic() + self.ctx.settings.worker_lease_s / 4
        return job, renewed

    def _renew(self, session: Session) -> bool:
        lease_s, worker_id = self.ctx.settings.worker_lease_s, self.ctx.worker_id
        if self.shard is None:
            return lifecycle.renew_lease(session, self.job_id, worker_id, lease_s=lease_s)
        return lifecycle.renew_shard_lease(session, self.job_id, self.shard, worker_id, lease_s=lease_s)

    def _report(self, session: Session, progress: float, epoch: int | None, metrics: dict[str, Any]) -> bool:
        if self.shard is None:
            return lifecycle.record_progress(session, self.job_id, progress, epoch, metrics)
        return lifecycle.record_shard_progress(session, self.job_id, self.shard, self.ctx.worker_id, progress)


def past_deadline(max_runtime_s: int | None, started_at: datetime | None) -> bool:
    """The job's wall clock runs from its first stage's start, across attempts and workers."""
    if not max_runtime_s or started_at is None:
        return False
    return utcnow() - started_at > timedelta(seconds=max_runtime_s)
