from app.db.base import Base, UTCDateTime, new_id, utcnow
from app.db.session import Database, commit, on_commit, on_rollback, rollback, session_scope

__all__ = [
    "Base",
    "Database",
    "UTCDateTime",
    "commit",
    "new_id",
    "on_commit",
    "on_rollback",
    "rollback",
    "session_scope",
    "utcnow",
]
