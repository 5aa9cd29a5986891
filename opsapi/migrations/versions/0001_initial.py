"""Initial schema: services, rollouts, audit events, idempotency keys.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)
OPEN = sa.text("state NOT IN ('succeeded', 'rolled_back')")
DUE = sa.text("next_evaluation_at IS NOT NULL")


def upgrade() -> None:
    op.create_table(
        "service",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("policy", JSON, nullable=False),
        sa.Column("stable_version", sa.String(128), nullable=True),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.Column("updated_by", sa.String(255), nullable=False),
    )
    op.create_table(
        "rollout",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("service", sa.String(63), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("canary_version", sa.String(128), nullable=False),
        sa.Column("stable_version", sa.String(128), nullable=True),
        sa.Column("steps", JSON, nullable=False),
        sa.Column("step_index", sa.Integer(), nullable=False),
        sa.Column("desired_weight", sa.Integer(), nullable=False),
        sa.Column("applied_weight", sa.Integer(), nullable=True),
        sa.Column("step_started_at", TIMESTAMP, nullable=False),
        sa.Column("paused_at", TIMESTAMP, nullable=True),
        sa.Column("paused_seconds", sa.Float(), nullable=False),
        sa.Column("auto_promote", sa.Boolean(), nullable=False),
        sa.Column("interval_seconds", sa.Float(), nullable=False),
        sa.Column("router", JSON, nullable=False),
        sa.Column("gates", JSON, nullable=False),
        sa.Column("triggered_by", sa.String(32), nullable=False),
        sa.Column("reason", sa.String(2000), nullable=True),
        sa.Column("created_by", sa.String(255), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("next_evaluation_at", TIMESTAMP, nullable=True),
        sa.Column("router_error", sa.String(2000), nullable=True),
    )
    op.create_index(
        "uq_rollout_open_service",
        "rollout",
        ["service"],
        unique=True,
        postgresql_where=OPEN,
        sqlite_where=OPEN,
    )
    op.create_index("ix_rollout_service_id", "rollout", ["service", "id"])
    op.create_index(
        "ix_rollout_due", "rollout", ["next_evaluation_at"], postgresql_where=DUE, sqlite_where=DUE
    )
    op.create_table(
        "audit_event",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("at", TIMESTAMP, nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("roles", JSON, nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("service", sa.String(63), nullable=True),
        sa.Column("rollout_id", sa.Integer(), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=True),
        sa.Column("client_address", sa.String(64), nullable=True),
        sa.Column("details", JSON, nullable=False),
    )
    for name, columns in {
        "ix_audit_at": ["at", "id"],
        "ix_audit_service_at": ["service", "at", "id"],
        "ix_audit_actor_at": ["actor", "at", "id"],
        "ix_audit_action_at": ["action", "at", "id"],
        "ix_audit_outcome_at": ["outcome", "at", "id"],
        "ix_audit_rollout": ["rollout_id", "id"],
    }.items():
        op.create_index(name, "audit_event", columns)
    op.create_table(
        "idempotency_key",
        sa.Column("subject", sa.String(255), primary_key=True),
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("method", sa.String(8), nullable=False),
        sa.Column("path", sa.String(512), nullable=False),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("response_body", sa.Text(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
    )
    op.create_index("ix_idempotency_created", "idempotency_key", ["created_at"])


def downgrade() -> None:
    op.drop_table("idempotency_key")
    op.drop_table("audit_event")
    op.drop_table("rollout")
    op.drop_table("service")
