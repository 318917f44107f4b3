"""The FastAPI application: `create_app()` wires settings, database, storage and the enqueue hook."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.config import Settings, get_settings
from app.db.session import Database
from app.errors import install_exception_handler
from app.files.router import router as files_router
from app.health import router as health_router
from app.jobs.router import install_job_poll
from app.jobs.router import router as jobs_router
from app.observability.logging import configure_logging
from app.observability.router import install_observability
from app.openapi_problems import problem_openapi
from app.queue import CeleryEnqueuer, Enqueuer, make_celery_client
from app.storage import Storage, build_storage
from app.tenants.service import KeyCache
from app.ui.router import install_ui
from app.webhooks.router import install_webhooks

log = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None,
    *,
    db: Database | None = None,
    storage: Storage | None = None,
    enqueue: Enqueuer | None = None,
) -> FastAPI:
    """Everything not passed in is built from settings. `enqueue` is the hook that starts a new job
    (default: send `distill.soft_label` to the Celery broker)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Everything imported and built so far lives as long as the process: move it out of the collector's
        # sight. A full collection of the ~150k startup objects takes ~70 ms on this kind of machine and,
        # triggered by request garbage, was the whole p99 of the polled read (bench/api.py: 89 ms -> 11 ms).
        gc.collect()
        gc.freeze()
        yield
        gc.unfreeze()  # an app that stops inside a longer-lived process (tests) leaves its heap collectable
        await app.state.db.close_async()
        if db is None:  # only dispose what this app created
            app.state.db.dispose()

    app = FastAPI(
        title="distill",
        version="1",
        lifespan=lifespan,
        description="Distillation as a service: send a teacher and data, get back a small student.",
    )
    app.state.settings = settings
    app.state.db = db or Database.from_settings(settings)
    app.state.storage = storage or build_storage(settings)
    app.state.enqueue = enqueue or CeleryEnqueuer(make_celery_client(settings))
    app.state.key_cache = KeyCache(settings.key_cache_ttl_s)
    install_exception_handler(app)
    app.include_router(health_router)
    app.include_router(files_router)
    app.include_router(jobs_router)
    install_job_poll(app)
    configure_logging()
    install_observability(app, settings, lambda: app.state.db.session_factory())
    install_ui(app)
    install_webhooks(app, settings, app.state.db)
    app.openapi = problem_openapi(app)  # type: ignore[method-assign]
    return app
