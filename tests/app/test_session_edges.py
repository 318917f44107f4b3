"""The commit edge: hooks after commit run only when it commits, undo hooks only when it rolls back."""

from __future__ import annotations

import pytest

from app.db.session import Database, on_commit, on_rollback, session_scope
from app.tenants import service as tenants


def test_after_commit_and_after_rollback_hooks(db: Database) -> None:
    ran: list[str] = []
    with session_scope(db) as session:
        tenants.create_key(session, "hooks")
        on_commit(session, lambda: ran.append("committed"))
        on_rollback(session, lambda: ran.append("undone"))
        assert ran == []  # nothing runs before the edge settles the transaction
    assert ran == ["committed"]

    ran.clear()
    with pytest.raises(RuntimeError), session_scope(db) as session:
        on_commit(session, lambda: ran.append("committed"))
        on_rollback(session, lambda: ran.append("undone"))
        raise RuntimeError("the task failed")
    assert ran == ["undone"]


def test_a_failing_hook_does_not_undo_the_commit(db: Database) -> None:
    def broken() -> None:
        raise ConnectionError("broker down")

    with session_scope(db) as session:
        key = tenants.create_key(session, "hooks")
        on_commit(session, broken)
    with session_scope(db) as session:
        assert tenants.authenticate(session, key)
