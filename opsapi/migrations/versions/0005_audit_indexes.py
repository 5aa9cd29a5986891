"""Audit review: an index for the `source` filter.

The review API pages newest first on (at, id); every filter column has a (column, at, id) index
so that a filtered page is one index range scan. `source` had none: a rare source (`system`,
`pagerduty`) made a filtered page scan the whole table.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_audit_source_at", "audit_event", ["source", "at", "id"])


def downgrade() -> None:
    op.drop_index("ix_audit_source_at", table_name="audit_event")
