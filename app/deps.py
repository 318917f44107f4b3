"""Typed dependencies shared by every router: the request's session (the commit edge), settings,
storage, the enqueue hook and the authenticated tenant.

They are `async` on purpose: a sync dependency costs a thread-pool round trip per request, and these only
touch the database (in the pool) when they must. That keeps the hot read path to one hop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, cast

from anyio import CapacityLimiter, to_thread
from fastapi import Depends, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.config import Settings
from app.db.session import Database, commit, rollback
from app.queue import Enqueuer
from app.storage import Storage
from app.tenants import service as tenants
from app.tenants.exceptions import Unauthorized

EDGE_THREADS = 20


def _edge_limiter(request: Request) -> CapacityLimiter:
    """Threads for commit, rollback and close only, apart from the handlers' pool. A handler may return
    holding a row lock (the per-tenant caps lock the tenant row); if its commit queued for the shared pool,
    requests blocked on that lock could hold every thread and the lock would never be released."""
    limiter: CapacityLimiter | None = getattr(request.app.state, "edge_limiter", None)
    if limiter is None:
        limiter = request.app.state.edge_limiter = CapacityLimiter(EDGE_THREADS)
    return limiter


async def get_session(request: Request) -> AsyncIterator[Session]:
    """Commit when the handler returns, before the response is sent (scope="function" below).

    Creating a Session does no I/O; the commit, rollback and close that do run on the edge's own threads.
    """
    db: Database = request.app.state.db
    session = db.session_factory()
    limiter = _edge_limiter(request)
    try:
        yield session
        if session.in_transaction():
            await to_thread.run_sync(commit, session, limiter=limiter)
    except BaseException:
        await to_thread.run_sync(rollback, session, limiter=limiter)
        raise
    finally:
        await to_thread.run_sync(session.close, limiter=limiter)


# app.state is untyped: create_app sets each of these once, with exactly these types.
async def get_settings(request: Request) -> Settings:
    return cast(Settings, request.app.state.settings)


async def get_storage(request: Request) -> Storage:
    return cast(Storage, request.app.state.storage)


async def get_enqueuer(request: Request) -> Enqueuer:
    return cast(Enqueuer, request.app.state.enqueue)


async def get_db(request: Request) -> Database:
    return cast(Database, request.app.state.db)


SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]
EnqueueDep = Annotated[Enqueuer, Depends(get_enqueuer)]
DatabaseDep = Annotated[Database, Depends(get_db)]


def _authenticate(db: Database, key: str) -> str:
    with db.read_factory() as session:
        return tenants.authenticate(session, key)


async def current_tenant(request: Request) -> str:
    """The tenant owning the Bearer key; a per-process cache of key hashes skips the query when warm."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise Unauthorized()
    cache: tenants.KeyCache = request.app.state.key_cache
    key_hash = tenants.hash_key(key)
    tenant_id = cache.get(key_hash)
    if tenant_id is None:
        tenant_id = await run_in_threadpool(_authenticate, request.app.state.db, key)
        cache.put(key_hash, tenant_id)
    return tenant_id


TenantDep = Annotated[str, Depends(current_tenant)]
