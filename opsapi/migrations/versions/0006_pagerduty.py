"""PagerDuty: the outbox of Events API alerts, and the webhook events already processed.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("cause", sa.String(128), nullable=False),
        sa.Column("service", sa.String(63), nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=True),
        sa.Column("dedup_key", sa.String(255), nullable=False),
        sa.Column("routing_key", sa.String(64), nullable=False),
        sa.Column("payload", JSON, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.String(2000), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index(
        "ix_outbox_due",
        "outbox",
        ["next_attempt_at"],
        postgresql_where=sa.text("state = 'pending'"),
        sqlite_where=sa.text("state = 'pending'"),
    )
    op.create_index("ix_outbox_rollout", "outbox", ["rollout_id", "id"])
    op.create_index("ix_outbox_service_kind", "outbox", ["service", "kind", "id"])
    op.create_index("ix_outbox_dedup_key", "outbox", ["dedup_key", "id"])
    op.create_index("uq_outbox_cause", "outbox", ["cause"], unique=True)
    op.create_table(
        "pagerduty_event",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
    )
    op.create_index("ix_pagerduty_event_received", "pagerduty_event", ["received_at"])


def downgrade() -> None:
    op.drop_table("pagerduty_event")
    op.drop_table("outbox")
