"""Turns each `status` event `app.jobs.lifecycle` writes into a webhook delivery, scheduled after commit.

Listening on the event row's insert (rather than editing every transition) catches all of them, from the
API (queued, cancelled) and from workers alike; `after commit` means a rolled-back transition sends nothing.
Nothing happens on import: each edge that wants deliveries calls `install()` (`create_app`, through
`install_webhooks`, and the worker's context).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapper, object_session

from app.db.base import utcnow
from app.db.session import on_commit
from app.jobs import repository
from app.jobs.models import JobEvent
from app.webhooks.dispatcher import Delivery, get_dispatcher

EVENT_TYPE = "job.status_changed"


def _on_event_insert(_mapper: Mapper[Any], connection: Connection, target: JobEvent) -> None:
    if target.kind != "status":
        return
    job = repository.webhook_target(connection, target.job_id)
    if job is None or not job.url:
        return
    url, tenant_id, metadata, error_code, error_message = (
        job.url,
        job.tenant_id,
        job.metadata,
        job.error_code,
        job.error_message,
    )
    data = target.data or {}
    status = data.get("to")
    created = target.created_at or utcnow()
    body = {
        "id": f"evt_{target.job_id}_{target.seq}",
        "type": EVENT_TYPE,
        "created_at": created.isoformat(),
        "data": {
            "job_id": target.job_id, "seq": target.seq, "status": status, "previous": data.get("from"),
            "error": {"code": error_code, "message": error_message} if status == "failed" else None,
            "metadata": metadata or {},
        },
    }
    delivery = Delivery(job_id=target.job_id, tenant_id=tenant_id, url=url, event=body)
    session = object_session(target)
    if session is not None:
        on_commit(session, lambda: get_dispatcher().schedule(delivery))


def install() -> None:
    """Subscribe this process's job events to webhook deliveries (idempotent)."""
    if not event.contains(JobEvent, "after_insert", _on_event_insert):
        event.listen(JobEvent, "after_insert", _on_event_insert)
