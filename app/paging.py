"""Opaque keyset cursors over `(created_at, id)`, newest first. Stable under inserts, no OFFSET scans.

The query side is `app.db.repository.keyset_page`."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Any, TypeVar

from app.errors import InvalidRequest

T = TypeVar("T")
MAX_LIMIT = 100


def encode_cursor(created_at: datetime, row_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), row_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        stamp, row_id = json.loads(raw)
        created_at = datetime.fromisoformat(stamp)
        if created_at.tzinfo is None or not isinstance(row_id, str):
            raise ValueError("incomplete cursor")
    except (ValueError, TypeError, binascii.Error, json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidRequest("cursor", "not a cursor this API returned", code="invalid_cursor") from None
    return created_at, row_id


def split_page(rows: list[T], limit: int, key: Any) -> tuple[list[T], str | None]:
    """`key(row) -> (created_at, id)`; the cursor points at the last row shown when more rows exist."""
    if len(rows) <= limit:
        return rows, None
    page = rows[:limit]
    return page, encode_cursor(*key(page[-1]))
