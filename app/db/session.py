"""Engine, session factory and the two edges that commit: the request dependency and `session_scope`.

Services only flush. Work that must follow a successful commit (enqueueing a task) is registered with
`on_commit` and run by the edge after the commit returns, so a worker never sees a row that is not there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db.aio import AsyncReadPool, Lookup, libpq_dsn

log = logging.getLogger(__name__)
_HOOKS = "after_commit"
_UNDO = "after_rollback"


def make_engine(settings: Settings) -> Engine:
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        # The API and the embedded worker share the file: wait for the writer instead of failing.
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # No pre-ping by default: it costs a round trip per checkout. After a database restart the first use of
    # a stale connection fails (503), SQLAlchemy then invalidates the whole pool, and the next request works.
    return create_engine(
        url,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_pool_size,
        pool_pre_ping=settings.database_pre_ping,
        pool_recycle=1800,
        pool_timeout=10,
    )


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


class Database:
    """Owns the engine and two session factories; tests swap both to bind sessions to one connection.

    `read_factory` sessions run in autocommit: a lone SELECT then costs one round trip instead of
    BEGIN + SELECT + ROLLBACK. Use them only for reads that need no transaction.
    """

    def __init__(self, engine: Engine, *, read_pool_size: int = 1) -> None:
        self.engine = engine
        self._url = engine.url.render_as_string(hide_password=False)
        self._read_pool_size = read_pool_size
        self._read_pool: AsyncReadPool | None = None
        self._read_pool_loop: asyncio.AbstractEventLoop | None = None
        self.session_factory: Callable[[], Session] = sessionmaker(engine, expire_on_commit=False)
        autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.read_factory: Callable[[], Session] = sessionmaker(autocommit, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    async def read_one(self, sql: str, params: dict[str, Any]) -> Any:
        """One row from a psycopg-syntax query on the async read pool (PostgreSQL only)."""
        return await self._pool().fetchone(sql, params)

    async def lookup(self, lookup: Lookup, key: tuple[Any, ...]) -> Any:
        """The row `lookup` answers for `key` (or None), batched with concurrent callers (PostgreSQL only)."""
        return await self._pool().lookup(lookup, key)

    def _pool(self) -> AsyncReadPool:
        loop = asyncio.get_running_loop()
        if self._read_pool is None or self._read_pool_loop is not loop:
            self._read_pool = AsyncReadPool(libpq_dsn(self._url), self._read_pool_size)
            self._read_pool_loop = loop
        return self._read_pool

    async def close_async(self) -> None:
        if self._read_pool is not None:
            await self._read_pool.close()
            self._read_pool = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        return cls(make_engine(settings), read_pool_size=settings.database_read_pool_size)

    def dispose(self) -> None:
        self.engine.dispose()


def on_commit(session: Session, fn: Callable[[], None]) -> None:
    """Run `fn` once the edge has committed this session; dropped if it rolls back."""
    session.info.setdefault(_HOOKS, []).append(fn)


def on_rollback(session: Session, fn: Callable[[], None]) -> None:
    """Run `fn` if the edge rolls this session back (undo a side effect outside the database)."""
    session.info.setdefault(_UNDO, []).append(fn)


def commit(session: Session) -> None:
    try:
        session.commit()
    except BaseException:
        rollback(session)
        raise
    session.info.pop(_UNDO, None)
    _run(session.info.pop(_HOOKS, []), "after-commit")


def rollback(session: Session) -> None:
    session.info.pop(_HOOKS, None)
    session.rollback()
    _run(session.info.pop(_UNDO, []), "after-rollback")


def _run(hooks: list[Callable[[], None]], when: str) -> None:
    for fn in hooks:
        try:
            fn()
        except Exception:  # the transaction is settled; a reconciler re-drives what a failed hook missed
            log.exception("%s hook %r failed", when, fn)


@contextmanager
def session_scope(db: Database) -> Iterator[Session]:
    """The worker's task edge: commit on success, roll back on any error, always close."""
    session = db.session_factory()
    try:
        yield session
        commit(session)
    except BaseException:
        rollback(session)
        raise
    finally:
        session.close()


def database_unavailable(exc: BaseException) -> bool:
    """The database is unreachable or went away mid-use (not a bad query): the API answers 503 for it, a
    running stage waits it out."""
    return isinstance(exc, (OperationalError, PoolTimeoutError, psycopg.OperationalError)) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    )
