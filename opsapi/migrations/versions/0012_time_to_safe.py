"""Time to safe: every rollback (and revert) records when its cause was seen, when the decision
committed, when the router applied it and when the traffic was confirmed at 0.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("rollout") as batch:
        batch.add_column(sa.Column("time_to_safe", JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rollout") as batch:
        batch.drop_column("time_to_safe")
