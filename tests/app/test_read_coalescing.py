"""The async read pool coalesces concurrent reads into pipelines on few connections; each caller still gets
its own answer, and a failing query fails only its caller. The poll route serves `GET /v1/jobs/{id}`."""

from __future__ import annotations

import asyncio

import psycopg

from app.db.aio import AsyncReadPool, Lookup, libpq_dsn
from app.jobs.router import poll_job
from app.main import create_app
from tests.support.processes import free_port


def _run(pg_url: str, size: int, queries: list[tuple[str, dict]]) -> tuple[list[object], int]:
    async def main() -> tuple[list[object], int]:
        pool = AsyncReadPool(libpq_dsn(pg_url), size)
        try:
            results = await asyncio.gather(*(pool.fetchone(sql, p) for sql, p in queries),
                                           return_exceptions=True)
            after = await pool.fetchone("SELECT 7 AS n", {})  # the pool still works afterwards
            assert after.n == 7
            return results, len(pool._idle)
        finally:
            await pool.close()

    return asyncio.run(main())


def test_concurrent_reads_on_one_connection_each_get_their_own_row(pg_url: str) -> None:
    queries = [("SELECT %(n)s::int AS n, %(s)s::text AS s", {"n": n, "s": f"row-{n}"}) for n in range(40)]
    results, connections = _run(pg_url, 1, queries)
    assert [(r.n, r.s) for r in results] == [(n, f"row-{n}") for n in range(40)]  # type: ignore[attr-defined]
    assert connections == 1


def test_a_failing_query_fails_only_its_caller(pg_url: str) -> None:
    queries = [("SELECT 10 / %(d)s::int AS q", {"d": d}) for d in (1, 2, 0, 5, 10)]
    results, _ = _run(pg_url, 1, queries)
    assert isinstance(results[2], psycopg.errors.DivisionByZero)
    assert [r.q for i, r in enumerate(results) if i != 2] == [10, 5, 2, 1]  # type: ignore[attr-defined]


def test_unreachable_database_fails_every_waiting_caller() -> None:
    url = f"postgresql://u@127.0.0.1:{free_port()}/x"

    async def main() -> list[object]:
        pool = AsyncReadPool(url, 2)
        reads = (pool.fetchone("SELECT 1", {}) for _ in range(5))
        return await asyncio.gather(*reads, return_exceptions=True)

    assert all(isinstance(r, psycopg.OperationalError) for r in asyncio.run(main()))


def test_the_poll_route_matches_first_and_get_job_stays_documented() -> None:
    app = create_app()
    first = app.router.routes[0]
    assert first.endpoint is poll_job and "GET" in first.methods  # type: ignore[attr-defined]
    assert "get" in app.openapi()["paths"]["/v1/jobs/{job_id}"]


def test_concurrent_lookups_are_one_statement_and_each_caller_gets_its_own_row_or_none(pg_url: str) -> None:
    """The polled read's shape: one statement over arrays of keys (`unnest ... WITH ORDINALITY`)."""
    lookup = Lookup(
        "SELECT q.ord, q.a || '/' || q.b AS ab FROM unnest(%(as)s::text[], %(bs)s::text[]) "
        "WITH ORDINALITY AS q(a, b, ord) WHERE q.a <> 'missing'",
        ("as", "bs"),
    )
    keys = [(f"a{n}", f"b{n}") for n in range(30)] + [("missing", "x"), ("bad\x00key", "x"), ("a1", "b1")]

    async def main() -> tuple[list[object], list[int]]:
        pool = AsyncReadPool(libpq_dsn(pg_url), 1)
        try:
            statements: list[int] = []
            real_send = pool._send_lookup

            async def counting(conn, lk, items):  # type: ignore[no-untyped-def]
                statements.append(len(items))
                await real_send(conn, lk, items)

            pool._send_lookup = counting  # type: ignore[method-assign]
            results = await asyncio.gather(*(pool.lookup(lookup, k) for k in keys), return_exceptions=True)
            return results, statements
        finally:
            await pool.close()

    results, statements = asyncio.run(main())
    assert [r.ab for r in results[:30]] == [f"a{n}/b{n}" for n in range(30)]  # type: ignore[union-attr]
    assert results[30] is None  # no row for this key
    assert isinstance(results[31], psycopg.DataError)  # text cannot hold NUL: only this caller fails
    assert results[32].ab == "a1/b1"  # type: ignore[union-attr]
    # One statement carried every waiting key; the bad key made it fail, so each key was retried alone.
    assert statements == [len(keys)] + [1] * len(keys)
