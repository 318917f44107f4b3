"""`GET /metrics` (Prometheus text format, no key: it shows counts, never tenant data) and the one call
that wires metrics and request logging into the app."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.orm import Session

from app.config import Settings
from app.observability.metrics import make_registry
from app.observability.middleware import ObservabilityMiddleware
from app.queue import DISTILL_QUEUE, SOFT_LABEL_QUEUE, make_celery_client

router = APIRouter(include_in_schema=False)


@router.get("/metrics")
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)


def broker_queue_depth(settings: Settings) -> Callable[[], dict[str, int]]:
    client = make_celery_client(settings)

    def depth() -> dict[str, int]:
        sizes = {}
        with client.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=settings.readiness_timeout_s)
            for queue in (SOFT_LABEL_QUEUE, DISTILL_QUEUE):
                try:
                    sizes[queue] = conn.default_channel.queue_declare(queue=queue, passive=True).message_count
                except Exception:  # a queue nobody has declared yet holds nothing
                    sizes[queue] = 0
        return sizes

    return depth


def install_observability(app: FastAPI, settings: Settings, sessions: Callable[[], Session]) -> None:
    registry, latency = make_registry(sessions, broker_queue_depth(settings))
    app.state.metrics_registry = registry
    app.add_middleware(ObservabilityMiddleware, latency=latency)
    app.include_router(router)
