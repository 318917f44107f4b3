"""Routes of the dashboard. Pages are HTML shells (no key needed to load them); static files come from
this package, so the dashboard works with no network access and nothing from a CDN."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, FastAPI
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from app.errors import NotFound
from app.ui import pages
from app.ui.cookie_auth import ArtifactCookieAuth

STATIC = Path(__file__).parent / "static"
CONTENT_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
# Our scripts only; nothing inline, nothing from elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
                               "form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
JobId = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9_-]{1,64}$")]

router = APIRouter(prefix="/ui", include_in_schema=False)


def _html(content: str) -> HTMLResponse:
    return HTMLResponse(content, headers=SECURITY_HEADERS)


@router.get("")
def ui_root() -> Response:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/")
def jobs() -> HTMLResponse:
    return _html(pages.jobs_page())


@router.get("/login")
def login() -> HTMLResponse:
    return _html(pages.login_page())


@router.get("/new")
def new_job() -> HTMLResponse:
    return _html(pages.new_job_page())


@router.get("/jobs/{job_id}")
def job(job_id: JobId) -> HTMLResponse:
    return _html(pages.job_page(job_id))


@router.get("/static/{name}")
def static(name: str) -> FileResponse:
    path = STATIC / name
    if not re.fullmatch(r"[a-z]+\.(js|css)", name) or not path.is_file():
        raise NotFound(f"no static file {name!r}", code="not_found")
    return FileResponse(path, media_type=CONTENT_TYPES[path.suffix],
                        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})


def install_ui(app: FastAPI) -> None:
    app.include_router(router)
    app.add_middleware(ArtifactCookieAuth)
