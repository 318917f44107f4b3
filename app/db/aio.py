"""A small pool of async psycopg connections for the hottest read (`GET /v1/jobs/{id}`, polled by every
client): no thread-pool hop, no Session, prepared statements, autocommit.

Concurrent reads are coalesced: while a connection is busy, new queries wait in a queue, and the next free
connection sends everything waiting as one pipeline (one write, one read, one wake-up of PostgreSQL's
backend) instead of one round trip each. On this kind of machine a round trip's syscalls and wake-ups cost
several times the query itself. Every query is still sent after its caller asked: nothing is cached.

A `Lookup` goes further: the callers waiting on the same keyed statement (the polled job read) are answered
by one statement over arrays of their keys (`unnest ... WITH ORDINALITY`), one result set instead of a
pipeline of N statements, whose per-statement client work was the largest cost left on that path.

Writes and everything else go through SQLAlchemy sessions (`app.db.session`). Connections belong to the
event loop that opened them; the pool is created lazily inside each worker process's loop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import namedtuple_row
from sqlalchemy.engine import make_url

MAX_PIPELINE = 64


@dataclass(frozen=True)
class Lookup:
    """A statement that answers many single-row lookups at once. `sql` takes one array parameter per key
    part, named in `params` in key order, and returns an `ord` column: the 1-based position of the key a row
    answers (`unnest(%(a)s::text[], ...) WITH ORDINALITY AS q(..., ord)`). A key without a row gets None."""

    sql: str
    params: tuple[str, ...]


_Waiting = tuple["str | Lookup", Any, "asyncio.Future[Any]"]  # (sql, params) or (lookup, key)


def libpq_dsn(sqlalchemy_url: str) -> str:
    return make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(hide_password=False)


class AsyncReadPool:
    def __init__(self, dsn: str, size: int, connect_timeout: float = 5.0) -> None:
        self.dsn = dsn
        self.size = size
        self.connect_timeout = connect_timeout
        self._busy = 0
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        self._waiting: list[_Waiting] = []

    async def fetchone(self, sql: str, params: dict[str, Any]) -> Any:
        return await self._wait((sql, params))

    async def lookup(self, lookup: Lookup, key: tuple[Any, ...]) -> Any:
        """The row `lookup` returns for `key`, or None."""
        return await self._wait((lookup, key))

    async def _wait(self, query: tuple[Any, Any]) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((*query, future))
        if self._busy < self.size:
            self._busy += 1
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        """Send what is waiting, as pipelines on one connection, until nothing is."""
        conn = None
        try:
            conn = self._idle.pop() if self._idle else await self._connect()
            while self._waiting:
                batch, self._waiting = self._waiting[:MAX_PIPELINE], self._waiting[MAX_PIPELINE:]
                await self._send(conn, [item for item in batch if not item[2].done()])  # skip callers gone
        except BaseException as exc:  # no connection, a broken one, or this task cancelled
            if conn is not None:
                await conn.close()  # a broken or interrupted connection is never reused
                conn = None
            waiting, self._waiting = self._waiting, []
            _fail(waiting, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._busy -= 1
            if conn is not None:
                self._idle.append(conn)

    async def _send(self, conn: psycopg.AsyncConnection[Any], batch: list[_Waiting]) -> None:
        lookups: dict[Lookup, list[_Waiting]] = {}
        for item in batch:
            if isinstance(item[0], Lookup):
                lookups.setdefault(item[0], []).append(item)
        for lookup, items in lookups.items():
            await self._send_lookup(conn, lookup, items)
        plain = [item for item in batch if not isinstance(item[0], Lookup)]
        if plain:
            await self._send_pipeline(conn, plain)

    async def _send_lookup(
        self, conn: psycopg.AsyncConnection[Any], lookup: Lookup, items: list[_Waiting]
    ) -> None:
        params = {name: [item[1][i] for item in items] for i, name in enumerate(lookup.params)}
        try:
            cursor = conn.cursor(row_factory=namedtuple_row)
            await cursor.execute(lookup.sql, params, prepare=True)
            rows = await cursor.fetchall()
        except psycopg.Error as exc:
            if conn.closed or len(items) == 1:
                _fail(items, exc)
                if conn.closed:
                    raise
                return
            for item in items:  # one bad key (autocommit: the connection is fine): only its caller fails
                await self._send_lookup(conn, lookup, [item])
            return
        except BaseException as exc:
            _fail(items, exc)
            raise
        by_position = {getattr(row, "ord"): row for row in rows}  # noqa: B009 - a column named at run time
        for position, (_, _, future) in enumerate(items, 1):
            if not future.done():
                future.set_result(by_position.get(position))

    async def _send_pipeline(self, conn: psycopg.AsyncConnection[Any], batch: list[_Waiting]) -> None:
        try:
            cursors = [conn.cursor(row_factory=namedtuple_row) for _ in batch]
            async with conn.pipeline():
                for cursor, (sql, params, _) in zip(cursors, batch, strict=True):
                    assert isinstance(sql, str)  # lookups went to _send_lookup
                    await cursor.execute(sql, params, prepare=True)
            rows = [await cursor.fetchone() for cursor in cursors]
        except psycopg.Error as exc:
            if conn.closed:
                _fail(batch, exc)
                raise
            if len(batch) == 1:
                _fail(batch, exc)
                return
            # An error aborts the rest of a pipeline: rerun the queries one by one, so only the bad one fails.
            for item in batch:
                await self._send_pipeline(conn, [item])
            return
        except BaseException as exc:
            _fail(batch, exc)
            raise
        for row, (_, _, future) in zip(rows, batch, strict=True):
            if not future.done():
                future.set_result(row)

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(
            self.dsn, autocommit=True, connect_timeout=max(1, int(self.connect_timeout))
        )

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()


def _fail(items: list[_Waiting], exc: BaseException) -> None:
    for _, _, future in items:
        if not future.done():
            future.set_exception(exc)
