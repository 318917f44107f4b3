"""Imports every model module so `Base.metadata` is complete (Alembic and tests use this)."""

from app.db.base import Base
from app.files import models as files_models  # noqa: F401
from app.jobs import models as jobs_models  # noqa: F401
from app.tenants import models as tenants_models  # noqa: F401

metadata = Base.metadata
