"""Engine, session factory and the two edges that commit: the request dependency and `session_scope`.

Services only flush. Work that must follow a successful commit (enqueueing a task) is registered with
`on_commit` and run by the edge after the commit returns, so a worker never sees a row that is not there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings

log = logging.getLogger(__name__)
_HOOKS = "after_commit"


def make_engine(settings: Settings) -> Engine:
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        # The API and the embedded worker share the file: wait for the writer instead of failing.
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(
        url,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_pool_size,
        pool_pre_ping=True,
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
    """Owns the engine and session factory; tests swap `session_factory` to bind sessions to a connection."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.session_factory: Callable[[], Session] = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        return cls(make_engine(settings))

    def dispose(self) -> None:
        self.engine.dispose()


def on_commit(session: Session, fn: Callable[[], None]) -> None:
    """Run `fn` once the edge has committed this session; dropped if it rolls back."""
    session.info.setdefault(_HOOKS, []).append(fn)


def commit(session: Session) -> None:
    session.commit()
    hooks = session.info.pop(_HOOKS, [])
    for fn in hooks:
        try:
            fn()
        except Exception:  # the row is committed; a reconciler re-drives what a failed hook missed
            log.exception("after-commit hook %r failed", fn)


def rollback(session: Session) -> None:
    session.info.pop(_HOOKS, None)
    session.rollback()


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
