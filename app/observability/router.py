"""`GET /metrics` (Prometheus text format: counts, never tenant data) and the one call that wires metrics
and request logging into the app.

Who may scrape: anyone on the embedded default; with `metrics_token` set, only a bearer of it; in
production without a token, nobody (404) unless the operator sets `metrics_public`, saying the port is
reachable only from inside. Job counts and queue depths are no secret on a laptop, but on a public API they
tell outsiders how busy the service is and which routes answer slowly.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.orm import Session

from app.config import Settings
from app.deps import SettingsDep
from app.errors import NotFound
from app.observability.metrics import make_registry
from app.observability.middleware import ObservabilityMiddleware
from app.queue import DISTILL_QUEUE, SOFT_LABEL_QUEUE, make_celery_client
from app.tenants.exceptions import Unauthorized

log = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)


async def check_scraper(request: Request, settings: SettingsDep) -> None:
    if settings.metrics_token:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken must not tell how much of a guess was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), settings.metrics_token.encode()
        ):
            raise Unauthorized("a valid metrics token is required: Authorization: Bearer <token>")
    elif settings.environment == "production" and not settings.metrics_public:
        raise NotFound("Not Found")  # hidden rather than refused: a 401 would advertise it


@router.get("/metrics", dependencies=[Depends(check_scraper)])
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
    if settings.environment == "production" and not (settings.metrics_token or settings.metrics_public):
        log.warning("/metrics answers 404: set DISTILL_METRICS_TOKEN, or DISTILL_METRICS_PUBLIC=true")
    registry, latency = make_registry(sessions, broker_queue_depth(settings))
    app.state.metrics_registry = registry
    app.add_middleware(ObservabilityMiddleware, latency=latency)
    app.include_router(router)
