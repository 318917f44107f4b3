"""Lets a plain `<a href download>` in the dashboard fetch an artifact: on
`GET /v1/jobs/{id}/artifacts/{name}` without an Authorization header, the dashboard's `distill_key`
cookie becomes the bearer key.

Only that read-only route honours the cookie, and the cookie is SameSite=Strict, so no other site can make a
browser spend it; everything that changes state still needs the header, which only our own scripts send.
"""

from __future__ import annotations

import re
from http.cookies import CookieError, SimpleCookie
from urllib.parse import unquote

from starlette.types import ASGIApp, Receive, Scope, Send

COOKIE = "distill_key"
_ARTIFACT = re.compile(r"^/v1/jobs/[^/]+/artifacts/[^/]+$")


class ArtifactCookieAuth:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and _ARTIFACT.match(scope["path"]):
            headers = scope["headers"]
            if not any(name == b"authorization" for name, _ in headers):
                key = _cookie_key(headers)
                if key:
                    scope = {**scope, "headers": [*headers, (b"authorization", f"Bearer {key}".encode())]}
        await self.app(scope, receive, send)


def _cookie_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"cookie":
            try:
                jar = SimpleCookie(value.decode("latin-1"))
            except CookieError:
                return None
            key = unquote(jar[COOKIE].value) if COOKIE in jar else ""
            if key and key.isprintable():
                return key
    return None
