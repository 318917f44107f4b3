"""The Celery app: one broker, two queues, JSON only, at-least-once delivery made safe by the job row.

`soft_label` (teacher inference) and `distill` (training) are separate queues so the two can run on
different worker pools. Delivery is at least once (acks_late, reject on a lost worker); Postgres decides who
acts: a task does nothing until it wins `claim_stage`, so a second delivery is a cheap no-op.

Broker: Redis in production (`DISTILL_BROKER_URL=redis://...`). The embedded default needs no server: the
SQLAlchemy transport over a SQLite file, whose reads take a write lock (`BEGIN IMMEDIATE`), so the API and
worker processes can share it. The filesystem transport is accepted too but is not the default: its
consumer can pick up a message file its producer is still writing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery import Celery
from kombu import Queue

from app.config import Settings, get_settings

SOFT_LABEL_QUEUE = "soft_label"
DISTILL_QUEUE = "distill"
QUEUES = (SOFT_LABEL_QUEUE, DISTILL_QUEUE)
TASK_ROUTES = {"distill.soft_label": {"queue": SOFT_LABEL_QUEUE}, "distill.distill": {"queue": DISTILL_QUEUE}}
# A Redis message not acked within this long is handed to another worker. Jobs run longer than that; the
# redelivery then loses `claim_stage` while the first worker's lease is alive, and acks as a no-op.
REDIS_VISIBILITY_TIMEOUT_S = 6 * 3600


def embedded_broker_url(data_dir: Path) -> str:
    return f"sqla+sqlite:///{(data_dir / 'broker.sqlite').resolve()}"


def transport_options(settings: Settings) -> dict[str, Any]:
    url = settings.broker_url
    if url.startswith(("redis://", "rediss://")):
        return {"visibility_timeout": REDIS_VISIBILITY_TIMEOUT_S}
    if url.startswith(("sqla+", "sqlalchemy+")):
        # The transport creates its tables itself; the file's folder must exist first.
        if url.startswith(("sqla+sqlite:///", "sqlalchemy+sqlite:///")):
            Path(url.split(":///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
        return {"polling_interval": 0.5}
    if url.startswith("filesystem://"):
        folder, control = settings.broker_folder / "messages", settings.broker_folder / "control"
        for path in (folder, control):
            path.mkdir(parents=True, exist_ok=True)
        return {"data_folder_in": str(folder), "data_folder_out": str(folder), "control_folder": str(control),
                "polling_interval": 0.5}
    return {}


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    celery = Celery("distill", broker=settings.broker_url, include=["worker.tasks"])
    celery.conf.update(
        # Never pickle: a message body is data, not code.
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # The job row is the result; nothing reads Celery results.
        task_ignore_result=True,
        task_queues=[Queue(name, routing_key=name) for name in QUEUES],
        task_default_queue=DISTILL_QUEUE,
        task_routes=TASK_ROUTES,
        broker_transport_options=transport_options(settings),
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return celery


celery_app = make_celery()
