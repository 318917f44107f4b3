"""The Celery app: one broker, two queues, JSON only, at-least-once delivery made safe by the job row.

`soft_label` (teacher inference) and `distill` (training) are separate queues so the two can run on
different worker pools. Delivery is at least once (acks_late, reject on a lost worker); Postgres decides who
acts: a task does nothing until it wins `claim_stage`, so a second delivery is a cheap no-op.

Broker: Redis in production (`DISTILL_BROKER_URL=redis://...`). The embedded default needs no server: the
SQLAlchemy transport over a SQLite file, whose reads take a write lock (`BEGIN IMMEDIATE`), so the API and
worker processes can share it (the filesystem transport is not: its consumer can pick up a message file the
producer is still writing). Names and the producer's settings are shared with the API in `app/queue.py`.
"""

from __future__ import annotations

import functools
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from app.config import Settings, get_settings
from app.observability.logging import install_celery_logging
from app.queue import (
    DISTILL_QUEUE,
    SOFT_LABEL_QUEUE,
    TASK_DISTILL,
    TASK_SOFT_LABEL,
    TASK_SOFT_LABEL_SHARD,
    celery_config,
)

QUEUES = (SOFT_LABEL_QUEUE, DISTILL_QUEUE)
TASK_ROUTES = {
    TASK_SOFT_LABEL: {"queue": SOFT_LABEL_QUEUE},
    TASK_SOFT_LABEL_SHARD: {"queue": SOFT_LABEL_QUEUE},
    TASK_DISTILL: {"queue": DISTILL_QUEUE},
}
# A Redis message not acked within this long is handed to another worker. Jobs may run longer; the
# redelivery then loses `claim_stage` while the first worker's lease is alive, and acks as a no-op.
REDIS_VISIBILITY_TIMEOUT_S = 6 * 3600


def consumer_transport_options(settings: Settings, producer_options: dict[str, Any]) -> dict[str, Any]:
    """The producer's options (same folders, same files) plus what only a consumer uses."""
    options = dict(producer_options)
    if settings.broker_url.startswith(("redis://", "rediss://")):
        options["visibility_timeout"] = REDIS_VISIBILITY_TIMEOUT_S
    elif settings.broker_url.startswith("filesystem://"):
        options["polling_interval"] = 0.5
    # Not for the SQLAlchemy transport: it passes every option on to create_engine(), which refuses it.
    return options


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    shared = celery_config(settings)
    celery = Celery("distill")
    celery.conf.update(shared)
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
        # The same shape Celery gives a queue the API names in send_task: a direct exchange of its own name.
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
        task_default_queue=DISTILL_QUEUE,
        task_routes=TASK_ROUTES,
        broker_transport_options=consumer_transport_options(settings, shared["broker_transport_options"]),
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    # Explicit: the tasks and the reaper are registered here, not as a side effect of importing a module.
    from worker import reaper
    from worker.tasks import jobs, shards

    jobs.register(celery)
    shards.register(celery)
    reaper.register(celery)
    return celery


@functools.lru_cache(maxsize=1)
def get_celery_app() -> Celery:
    """The worker process's Celery app, on the environment's settings."""
    return make_celery()


def start_worker(argv: list[str]) -> None:
    """The worker's edge: JSON logs with the running task's job id, then Celery's own main loop."""
    install_celery_logging()
    get_celery_app().worker_main(argv)
