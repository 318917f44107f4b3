"""Query pieces every repository shares."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import InstrumentedAttribute

from app.paging import decode_cursor


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
