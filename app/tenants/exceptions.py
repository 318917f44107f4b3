from __future__ import annotations

from app.errors import AppError


class Unauthorized(AppError):
    status, code, title = 401, "unauthorized", "Unauthorized"

    def __init__(self, detail: str = "a valid API key is required: Authorization: Bearer <key>") -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})
