"""`/healthz`: the process answers. `/readyz`: the database, the broker and the object store all answer."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _check_database(request: Request) -> None:
    with request.app.state.db.engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def _check_broker(request: Request) -> None:
    ping = getattr(request.app.state.enqueue, "ping", None)
    if ping is not None:
        ping(request.app.state.settings.readiness_timeout_s)


def _check_storage(request: Request) -> None:
    request.app.state.storage.ping()


@router.get("/readyz", responses={503: {"description": "a dependency is unreachable"}})
async def readyz(request: Request) -> JSONResponse:
    checks: dict[str, Any] = {}
    timeout = request.app.state.settings.readiness_timeout_s
    for name, check in (
        ("database", _check_database),
        ("broker", _check_broker),
        ("storage", _check_storage),
    ):
        try:
            with anyio.fail_after(timeout + 1):
                await anyio.to_thread.run_sync(check, request, abandon_on_cancel=True)
            checks[name] = "ok"
        except Exception as exc:  # readiness reports every failure instead of raising
            checks[name] = f"unavailable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503
    )
