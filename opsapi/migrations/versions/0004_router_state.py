"""Router state on rollouts: failed attempts, when to retry, when drift was last checked.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("rollout") as batch:
        batch.add_column(
            sa.Column("router_attempts", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("router_retry_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("router_checked_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rollout") as batch:
        batch.drop_column("router_checked_at")
        batch.drop_column("router_retry_at")
        batch.drop_column("router_attempts")
