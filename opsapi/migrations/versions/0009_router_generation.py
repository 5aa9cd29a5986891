"""Router generations: every change of what a router must apply (a weight, or the slots' roles
after a success or a revert) bumps the rollout's `generation`; an apply records the generation it
made live. Converged means `applied_generation = generation`, so a late apply of an older
generation can never pass for the newer one.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("rollout") as batch:
        batch.add_column(sa.Column("generation", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("applied_generation", sa.Integer(), nullable=True))
    # What was converged under the old bookkeeping stays converged.
    op.execute(
        "UPDATE rollout SET applied_generation = 0"
        " WHERE applied_weight = desired_weight AND router_error IS NULL"
    )


def downgrade() -> None:
    with op.batch_alter_table("rollout") as batch:
        batch.drop_column("applied_generation")
        batch.drop_column("generation")
