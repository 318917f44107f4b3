"""Sends webhook events from a small thread pool, after the transition has committed.

Events of one job go out one at a time and in order (a per-job queue), while different jobs proceed in
parallel, so one slow receiver delays only its own job. Each attempt is written to the job's event log as a
`webhook` event; a failed attempt is retried with exponential backoff up to `webhook_max_attempts`.
Connections open only to addresses `app.receivers` allows; a refused one is recorded, not retried.
Deliveries live in memory: a process that dies mid-retry loses the rest, and the event log shows how far
it got.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from app.config import Settings, get_settings
from app.db.session import Database, session_scope
from app.jobs import lifecycle
from app.observability.logging import bind_job
from app.receivers import ReceiverBlocked, guarded_transport, private_allowed
from app.webhooks.signing import HEADER, WebhooksNotConfigured, sign, tenant_secret

log = logging.getLogger("distill.webhooks")


@dataclass(frozen=True)
class Delivery:
    job_id: str
    tenant_id: str
    url: str
    event: dict[str, Any]  # the JSON body


class Dispatcher:
    def __init__(self, settings: Settings, db: Database | None = None, *, workers: int = 4) -> None:
        self.settings = settings
        self._db = db
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="webhook")
        self._lock = threading.Lock()
        self._queues: dict[str, deque[Delivery]] = {}
        self._idle = threading.Condition(self._lock)
        # One pool of connections for all deliveries: building a TLS context per POST costs ~0.1 s.
        self._http = httpx.Client(
            timeout=settings.webhook_timeout_s,
            follow_redirects=False,
            headers={"User-Agent": "distill-webhooks"},
            transport=guarded_transport(allow_private=private_allowed(settings)),
        )

    @property
    def db(self) -> Database:
        if self._db is None:
            self._db = Database.from_settings(self.settings)
        return self._db

    def schedule(self, delivery: Delivery) -> None:
        with self._lock:
            queue = self._queues.get(delivery.job_id)
            if queue is not None:  # a drain for this job is running and will pick it up
                queue.append(delivery)
                return
            self._queues[delivery.job_id] = deque([delivery])
        self._pool.submit(self._drain, delivery.job_id)

    def _drain(self, job_id: str) -> None:
        while True:
            with self._lock:
                queue = self._queues[job_id]
                if not queue:
                    del self._queues[job_id]
                    self._idle.notify_all()
                    return
                delivery = queue[0]
            try:
                with bind_job(job_id):
                    self._deliver(delivery)
            except Exception:  # never let one bad delivery stop the job's later events
                log.exception("webhook delivery crashed")
            with self._lock:
                queue.popleft()

    def wait_idle(self, timeout: float) -> bool:
        """Until every scheduled delivery has finished (tests and shutdown)."""
        with self._lock:
            return self._idle.wait_for(lambda: not self._queues, timeout)

    def _deliver(self, d: Delivery) -> None:
        body = json.dumps(d.event, separators=(",", ":"), default=str).encode()
        attempts = self.settings.webhook_max_attempts
        try:
            secret = tenant_secret(self.settings, d.tenant_id)
            blocked = _blocked(d.url)
        except WebhooksNotConfigured as exc:
            secret, blocked = "", exc.detail
        for attempt in range(1, attempts + 1):
            started = time.perf_counter()
            status, error = None, blocked
            if not blocked:
                headers = {
                    "Content-Type": "application/json",
                    "Distill-Event-Id": d.event["id"],
                    "Distill-Event-Type": d.event["type"],
                    "Distill-Delivery-Attempt": str(attempt),
                    HEADER: sign(secret, body),
                }
                try:
                    response = self._http.post(d.url, content=body, headers=headers)
                    status = response.status_code
                    error = None if 200 <= status < 300 else f"HTTP {status}"
                except ReceiverBlocked as exc:  # nothing was sent; the next try would be refused the same
                    error = blocked = str(exc)
                except httpx.HTTPError as exc:
                    error = f"{type(exc).__name__}: {exc}"[:300]
            retry_in = (
                None
                if error is None or blocked or attempt == attempts
                else self.settings.webhook_backoff_s * 2 ** (attempt - 1)
            )
            self._record(d, attempt, status, error, retry_in, time.perf_counter() - started)
            if retry_in is None:
                return
            time.sleep(retry_in)

    def _record(
        self,
        d: Delivery,
        attempt: int,
        status: int | None,
        error: str | None,
        retry_in: float | None,
        seconds: float,
    ) -> None:
        data = {
            "event_id": d.event["id"],
            "event_seq": d.event["data"]["seq"],
            "status": d.event["data"]["status"],
            "attempt": attempt,
            "ok": error is None,
            "status_code": status,
            "error": error,
            "retry_in_s": retry_in,
            "duration_ms": round(1000 * seconds, 1),
        }
        log.log(
            logging.INFO if error is None else logging.WARNING,
            "webhook %s attempt %d: %s",
            d.event["id"],
            attempt,
            error or status,
            extra={"webhook": data},
        )
        with session_scope(self.db) as session:
            lifecycle.record_event(session, d.job_id, "webhook", data)


def _blocked(url: str) -> str | None:
    """Only http(s) URLs; where they may connect is the transport's check (`app.receivers`)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "blocked: only http(s) URLs"
    return None


_dispatcher: Dispatcher | None = None
_dispatcher_lock = threading.Lock()


def get_dispatcher() -> Dispatcher:
    """One per process, on the settings of the environment (the API and the worker read the same)."""
    global _dispatcher
    with _dispatcher_lock:
        if _dispatcher is None:
            _dispatcher = Dispatcher(get_settings())
        return _dispatcher


def set_dispatcher(dispatcher: Dispatcher | None) -> None:
    """Lets an app built with explicit settings (tests) send with those."""
    global _dispatcher
    with _dispatcher_lock:
        _dispatcher = dispatcher
