"""The Celery *client* side: the app sends tasks by name and never imports the worker's task code.

Task names and queues are fixed here; `worker/celery_app.py` consumes the same names. Jobs are enqueued by
an `Enqueuer` hook that the request edge runs after commit (`app.db.on_commit`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from celery import Celery

from app.config import Settings

SOFT_LABEL_QUEUE = "soft_label"
DISTILL_QUEUE = "distill"
TASK_SOFT_LABEL = "distill.soft_label"
TASK_DISTILL = "distill.distill"
# One shard task of a soft-label stage split over workers: takes the job id and the shard's number.
TASK_SOFT_LABEL_SHARD = "distill.soft_label_shard"
# stage name -> (task name, queue); a task takes the job id only
STAGE_TASKS = {"soft_label": (TASK_SOFT_LABEL, SOFT_LABEL_QUEUE), "distill": (TASK_DISTILL, DISTILL_QUEUE)}


class Enqueuer(Protocol):
    def __call__(self, job_id: str) -> None: ...


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """What the producer needs per transport; mirrors `worker.celery_app.transport_options` (same folders)."""
    url = settings.broker_url
    if url.startswith(("sqla+sqlite:///", "sqlalchemy+sqlite:///")):
        Path(url.split(":///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
    if url.startswith("filesystem://"):
        folder, control = Path(settings.broker_folder) / "messages", Path(settings.broker_folder) / "control"
        for path in (folder, control):
            path.mkdir(parents=True, exist_ok=True)
        return {"data_folder_in": str(folder), "data_folder_out": str(folder), "control_folder": str(control)}
    return {}


def celery_config(settings: Settings) -> dict[str, Any]:
    """Settings shared by the API's client and the worker's app (which may add its own on top)."""
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": broker_transport_options(settings),
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        # A broker outage must not hold a request long: the row is committed, a reconciler re-drives it.
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2},
    }


def make_celery_client(settings: Settings) -> Celery:
    client = Celery("distill-api", set_as_current=False)
    client.conf.update(celery_config(settings))
    return client


def enqueue_stage(client: Celery, stage: str, job_id: str) -> None:
    task, queue = STAGE_TASKS[stage]
    client.send_task(task, args=[job_id], queue=queue)


class CeleryEnqueuer:
    """Default hook: a new job starts at the soft-label stage."""

    def __init__(self, client: Celery) -> None:
        self.client = client

    def __call__(self, job_id: str) -> None:
        enqueue_stage(self.client, "soft_label", job_id)

    def ping(self, timeout: float) -> None:
        with self.client.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
