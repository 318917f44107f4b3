"""Jobs: a per-job wall-clock limit (`max_runtime_s`) and whether a cancel keeps the partial student.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_runtime_s", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("keep_partial", sa.Boolean(), server_default=sa.false(), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("keep_partial")
        batch_op.drop_column("max_runtime_s")
