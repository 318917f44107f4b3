"""Fixtures for the API tests: a fresh PostgreSQL database migrated once per session, one rolled-back
transaction per test (each request's commit only releases a SAVEPOINT), a local object folder per test,
and the real Celery client publishing to a Redis database of our own."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from psycopg.rows import namedtuple_row
from sqlalchemy import Connection, Engine, create_engine, delete
from sqlalchemy.orm import sessionmaker
from starlette.concurrency import run_in_threadpool

from app.config import Settings
from app.db.aio import Lookup
from app.db.session import Database, session_scope
from app.files.models import File
from app.jobs.models import Job
from app.main import create_app
from app.queue import CeleryEnqueuer, make_celery_client
from app.storage import LocalStorage, Storage
from app.tenants import service as tenants
from app.tenants.models import Tenant as TenantRow
from tests.support.services import postgres_database

REDIS_URL = os.environ.get("DISTILL_TEST_REDIS", "redis://127.0.0.1:6379/12")


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    with postgres_database("distill_test") as url:
        yield url


@pytest.fixture(scope="session")
def engine(pg_url: str) -> Iterator[Engine]:
    engine = create_engine(pg_url, pool_size=2)
    yield engine
    engine.dispose()


@pytest.fixture
def connection(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn:
        outer = conn.begin()
        yield conn
        outer.rollback()


@pytest.fixture
def db(engine: Engine, connection: Connection) -> Database:
    database = Database(engine)
    # Every session joins the test's transaction; its commit() releases a SAVEPOINT instead of committing.
    database.session_factory = database.read_factory = sessionmaker(
        bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
    )
    database.read_one = partial(read_one_in_test_transaction, connection)  # type: ignore[method-assign]
    database.lookup = partial(lookup_in_test_transaction, connection)  # type: ignore[method-assign]
    return database


async def read_one_in_test_transaction(connection: Connection, sql: str, params: dict[str, Any]) -> Any:
    """The async read pool opens its own connections, which cannot see the test's uncommitted rows; run the
    same SQL on the test's connection instead. `test_read_pool.py` covers the pool itself."""

    def fetch() -> Any:
        cursor = connection.connection.driver_connection.cursor(row_factory=namedtuple_row)
        return cursor.execute(sql, params, prepare=True).fetchone()

    return await run_in_threadpool(fetch)


async def lookup_in_test_transaction(connection: Connection, lookup: Lookup, key: tuple[Any, ...]) -> Any:
    """`Database.lookup` for one key, on the test's connection (see above)."""
    params = {name: [part] for name, part in zip(lookup.params, key, strict=True)}
    return await read_one_in_test_transaction(connection, lookup.sql, params)


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "objects")


@pytest.fixture(scope="session")
def broker() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    client.delete("soft_label", "distill")
    yield client
    client.delete("soft_label", "distill")
    client.close()


@pytest.fixture
def settings(pg_url: str, tmp_path: Path) -> Settings:
    return Settings(
        environment="test",
        database_url=pg_url,
        broker_url=REDIS_URL,
        storage_path=tmp_path / "objects",
        max_upload_bytes=256 * 1024,
        key_cache_ttl_s=0,
    )


@pytest.fixture(scope="session")
def enqueuer(broker: redis.Redis) -> CeleryEnqueuer:
    """The app's default hook (a Celery client on Redis), built once: its connection pool is reused."""
    return CeleryEnqueuer(make_celery_client(Settings(broker_url=REDIS_URL)))


@pytest.fixture
def app(settings: Settings, db: Database, storage: Storage, enqueuer: CeleryEnqueuer) -> FastAPI:
    return create_app(settings, db=db, storage=storage, enqueue=enqueuer)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


@dataclass
class Tenant:
    name: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def make_tenant(db: Database, name: str) -> Tenant:
    with session_scope(db) as session:
        return Tenant(name, tenants.create_key(session, name))


@pytest.fixture
def alice(db: Database) -> Tenant:
    return make_tenant(db, "alice")


@pytest.fixture
def bob(db: Database) -> Tenant:
    return make_tenant(db, "bob")


COMMITTED_TENANTS = ["pool-a", "pool-b", "race"]


@pytest.fixture
def committed_db(engine: Engine) -> Iterator[Database]:
    """A Database whose commits are real, for what a test transaction cannot show (other connections,
    concurrency). Tenants named in COMMITTED_TENANTS, and their rows, are deleted afterwards."""
    db = Database(engine)
    yield db
    with session_scope(db) as session:  # nothing committed here may outlive the test
        for model in (Job, File):
            session.execute(
                delete(model).where(
                    model.tenant_id.in_(
                        session.query(TenantRow.id)
                        .filter(TenantRow.name.in_(COMMITTED_TENANTS))
                        .scalar_subquery()
                    )
                )
            )
        session.execute(delete(TenantRow).where(TenantRow.name.in_(COMMITTED_TENANTS)))
