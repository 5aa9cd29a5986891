"""Safety beyond rollback: rejected versions, open PagerDuty incidents, API-set freeze windows.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "rejected_version",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("service", sa.String(63), nullable=False),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=True),
        sa.Column("reason", sa.String(2000), nullable=False),
        sa.Column("rejected_at", WHEN, nullable=False),
        sa.Column("lifted_at", WHEN, nullable=True),
        sa.Column("lifted_by", sa.String(255), nullable=True),
        sa.Column("lift_reason", sa.String(2000), nullable=True),
    )
    op.create_index(
        "uq_rejected_version_standing",
        "rejected_version",
        ["service", "version"],
        unique=True,
        postgresql_where=sa.text("lifted_at IS NULL"),
        sqlite_where=sa.text("lifted_at IS NULL"),
    )
    op.create_table(
        "incident",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("service", sa.String(63), primary_key=True),
        sa.Column("number", sa.Integer(), nullable=True),
        sa.Column("title", sa.String(500), nullable=False),
        sa.Column("html_url", sa.String(1000), nullable=True),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("opened_at", WHEN, nullable=False),
        sa.Column("updated_at", WHEN, nullable=False),
        sa.Column("resolved_at", WHEN, nullable=True),
    )
    op.create_index("ix_incident_open", "incident", ["service", "resolved_at"])
    op.create_table(
        "freeze_window",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("services", JSON, nullable=False),
        sa.Column("reason", sa.String(2000), nullable=False),
        sa.Column("starts_at", WHEN, nullable=True),
        sa.Column("ends_at", WHEN, nullable=True),
        sa.Column("cron", sa.String(100), nullable=True),
        sa.Column("duration_seconds", sa.Float(), nullable=True),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("created_by", sa.String(255), nullable=False),
        sa.Column("created_at", WHEN, nullable=False),
        sa.Column("deleted_at", WHEN, nullable=True),
        sa.Column("deleted_by", sa.String(255), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("freeze_window")
    op.drop_table("incident")
    op.drop_table("rejected_version")
