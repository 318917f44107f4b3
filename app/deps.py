"""Typed dependencies shared by every router: the request's session (the commit edge), settings,
storage, the enqueue hook and the authenticated tenant."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.config import Settings
from app.db.session import Database, commit, rollback
from app.queue import Enqueuer
from app.storage import Storage
from app.tenants import service as tenants
from app.tenants.exceptions import Unauthorized


def get_session(request: Request) -> Iterator[Session]:
    """Commit when the handler returns, before the response is sent (scope="function" below)."""
    db: Database = request.app.state.db
    session = db.session_factory()
    try:
        yield session
        if session.in_transaction():
            commit(session)
    except BaseException:
        rollback(session)
        raise
    finally:
        session.close()


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def get_enqueuer(request: Request) -> Enqueuer:
    return request.app.state.enqueue


SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]
EnqueueDep = Annotated[Enqueuer, Depends(get_enqueuer)]


def current_tenant(request: Request, session: SessionDep) -> str:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise Unauthorized()
    cache: tenants.KeyCache = request.app.state.key_cache
    key_hash = tenants.hash_key(key)
    tenant_id = cache.get(key_hash)
    if tenant_id is None:
        tenant_id = tenants.authenticate(session, key)
        cache.put(key_hash, tenant_id)
    return tenant_id


TenantDep = Annotated[str, Depends(current_tenant)]
