"""Fail-safe leases: an applied canary weight is valid until the controller's next renewal plus a
margin; a router that can hold an expiry falls back to 100 % stable by itself when it passes.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("rollout") as batch:
        batch.add_column(sa.Column("lease_seconds", sa.Float(), nullable=True))
        batch.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rollout") as batch:
        batch.drop_column("lease_until")
        batch.drop_column("lease_seconds")
