from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.tenants.models import ApiKey, Tenant


def get_tenant_by_name(session: Session, name: str) -> Tenant | None:
    return session.scalars(select(Tenant).where(Tenant.name == name)).one_or_none()


def get_active_key(session: Session, key_hash: str) -> ApiKey | None:
    return session.scalars(
        select(ApiKey).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
    ).one_or_none()


def list_keys(session: Session, tenant_id: str) -> list[ApiKey]:
    return list(
        session.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.created_at))
    )


def lock(session: Session, tenant_id: str) -> None:
    """Hold the tenant's row until commit: submissions of one tenant count its jobs one at a time."""
    session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())
