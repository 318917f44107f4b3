"""A small pool of async psycopg connections for the hottest read (`GET /v1/jobs/{id}`, polled by every
client): no thread-pool hop, no Session, one prepared statement per request, autocommit.

Writes and everything else go through SQLAlchemy sessions (`app.db.session`). Connections belong to the
event loop that opened them; the pool is created lazily inside each worker process's loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
from psycopg.rows import namedtuple_row
from sqlalchemy.engine import make_url


def libpq_dsn(sqlalchemy_url: str) -> str:
    return make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(hide_password=False)


class AsyncReadPool:
    def __init__(self, dsn: str, size: int, connect_timeout: float = 5.0) -> None:
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self._slots = asyncio.Semaphore(size)
        self._idle: list[psycopg.AsyncConnection[Any]] = []

    async def fetchone(self, sql: str, params: dict[str, Any]) -> Any:
        async with self._slots:
            conn = self._idle.pop() if self._idle else await self._connect()
            try:
                cursor = conn.cursor(row_factory=namedtuple_row)
                await cursor.execute(sql, params, prepare=True)
                row = await cursor.fetchone()
            except BaseException:
                await conn.close()  # a broken or interrupted connection is never reused
                raise
            self._idle.append(conn)
            return row

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(
            self.dsn, autocommit=True, connect_timeout=max(1, int(self.connect_timeout))
        )

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()
