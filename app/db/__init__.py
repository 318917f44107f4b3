from app.db.base import Base, UTCDateTime, new_id, utcnow
from app.db.session import (
    Database,
    commit,
    database_unavailable,
    on_commit,
    on_rollback,
    rollback,
    session_scope,
)

__all__ = [
    "Base",
    "Database",
    "UTCDateTime",
    "commit",
    "database_unavailable",
    "new_id",
    "on_commit",
    "on_rollback",
    "rollback",
    "session_scope",
    "utcnow",
]
