from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.repository import keyset_page
from app.files.models import File


def get_for_tenant(session: Session, tenant_id: str, file_id: str) -> File | None:
    return session.scalars(
        select(File).where(File.id == file_id, File.tenant_id == tenant_id, File.deleted_at.is_(None))
    ).one_or_none()


def get_many_for_tenant(session: Session, tenant_id: str, file_ids: Iterable[str]) -> dict[str, File]:
    query = select(File).where(
        File.id.in_(list(file_ids)), File.tenant_id == tenant_id, File.deleted_at.is_(None)
    )
    return {f.id: f for f in session.scalars(query)}


def get_many(session: Session, file_ids: Iterable[str]) -> dict[str, File]:
    """Unscoped: for the worker, which acts on a job already checked against its tenant."""
    return {f.id: f for f in session.scalars(select(File).where(File.id.in_(list(file_ids))))}


def list_for_tenant(
    session: Session, tenant_id: str, *, purpose: str | None, cursor: str | None, limit: int
) -> list[File]:
    query = select(File).where(File.tenant_id == tenant_id, File.deleted_at.is_(None))
    if purpose is not None:
        query = query.where(File.purpose == purpose)
    return list(session.scalars(keyset_page(query, File.created_at, File.id, cursor, limit)))
