"""`alembic upgrade head`, `downgrade base`, `upgrade head` on PostgreSQL and SQLite, and the models match the
migrations (autogenerate finds no difference)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, pool

from app.db import migrate
from app.db.models import metadata
from tests.support.services import create_database, drop_database

TABLES = {"tenants", "api_keys", "files", "jobs", "job_events", "artifacts", "job_shards"}


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'distill.db'}"
        return
    name = f"distill_migrations_{os.getpid()}"
    yield create_database(name)
    drop_database(name)


def tables(url: str) -> set[str]:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_and_no_autogenerate_diff(empty_db: str) -> None:
    migrate.upgrade(empty_db)
    assert tables(empty_db) == TABLES
    migrate.downgrade(empty_db, "base")
    assert tables(empty_db) == set()
    migrate.upgrade(empty_db)
    assert tables(empty_db) == TABLES
    engine = create_engine(empty_db, poolclass=pool.NullPool)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "render_as_batch": True})
        assert compare_metadata(context, metadata) == []
    engine.dispose()
