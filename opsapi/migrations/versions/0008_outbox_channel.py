"""Notifications in the outbox: a `channel` column (NULL for PagerDuty rows), and room in the
unique `cause` for "notify:<channel>:<transition cause>".

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("outbox", sa.Column("channel", sa.String(63), nullable=True))
    # SQLite does not enforce VARCHAR lengths (and cannot alter a column in place).
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column(
            "outbox", "cause", type_=sa.String(255), existing_type=sa.String(128),
            existing_nullable=False,
        )  # fmt: skip


def downgrade() -> None:
    op.execute("DELETE FROM outbox WHERE kind = 'notification'")
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column(
            "outbox", "cause", type_=sa.String(128), existing_type=sa.String(255),
            existing_nullable=False,
        )  # fmt: skip
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("channel")
