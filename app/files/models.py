from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, UTCDateTime, new_id, utcnow

PURPOSES = ("teacher", "dataset", "student_init")


class File(Base):
    """An input a tenant uploaded or registered. Deleting drops the object, keeps the row (jobs cite it)."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_tenant_created", "tenant_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("file"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    purpose: Mapped[str] = mapped_column(String(20))
    filename: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    # `bucket` is set only for files registered from another bucket; None means the service's own store.
    bucket: Mapped[str | None] = mapped_column(String(255))
    key: Mapped[str] = mapped_column(String(1024))
    # A dataset registered from an `s3://bucket/prefix/`: `key` is the prefix, and these are its shard objects
    # as listed at registration, [{"key", "size", "etag"}] in key order (a changed object fails the fetch).
    members: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
