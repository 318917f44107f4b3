"""Opaque keyset cursors over `(created_at, id)`, newest first. Stable under inserts, no OFFSET scans."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import InstrumentedAttribute

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


def keyset_page(
    query: Select[Any],
    created_at: InstrumentedAttribute[Any],
    row_id: InstrumentedAttribute[Any],
    cursor: str | None,
    limit: int,
) -> Select[Any]:
    """Order newest first and start after `cursor`; fetches `limit + 1` rows to know if a next page exists."""
    if cursor:
        after_created, after_id = decode_cursor(cursor)
        query = query.where(
            or_(created_at < after_created, and_(created_at == after_created, row_id < after_id))
        )
    return query.order_by(created_at.desc(), row_id.desc()).limit(limit + 1)


def split_page(rows: list[T], limit: int, key: Any) -> tuple[list[T], str | None]:
    """`key(row) -> (created_at, id)`; the cursor points at the last row shown when more rows exist."""
    if len(rows) <= limit:
        return rows, None
    page = rows[:limit]
    return page, encode_cursor(*key(page[-1]))
