"""Release lifecycle: slots on services and rollouts, `reverted`, idempotency answers completed
after the router applied.

Turn-1 router parameters named a fixed stable and canary address (nginx `stable`/`canary`,
HAProxy `stable_server`/`canary_server`); they become two slots, `blue` (was stable) and `green`
(was canary). Under the old model a succeeded rollout left its traffic on the canary address, so
a service whose latest rollout succeeded has its stable version in `green`.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""

import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_OPEN = "state NOT IN ('succeeded', 'rolled_back')"
NEW_OPEN = "state NOT IN ('succeeded', 'rolled_back', 'reverted')"
_TURN_ONE = (("stable", "canary"), ("stable_server", "canary_server"))


def to_slots(router: Any) -> Any:
    """Turn-1 router parameters as slots; anything else unchanged."""
    if not isinstance(router, dict):
        return router
    for stable_key, canary_key in _TURN_ONE:
        if stable_key in router and canary_key in router and "slots" not in router:
            converted = {k: v for k, v in router.items() if k not in (stable_key, canary_key)}
            converted["slots"] = {"blue": router[stable_key], "green": router[canary_key]}
            return converted
    return router


def _load(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def upgrade() -> None:
    with op.batch_alter_table("service") as batch:
        batch.add_column(sa.Column("stable_slot", sa.String(32), nullable=True))
        batch.add_column(sa.Column("previous_version", sa.String(128), nullable=True))
        batch.add_column(sa.Column("previous_slot", sa.String(32), nullable=True))
    with op.batch_alter_table("rollout") as batch:
        batch.add_column(
            sa.Column("stable_slot", sa.String(32), nullable=False, server_default="blue")
        )
        batch.add_column(
            sa.Column("canary_slot", sa.String(32), nullable=False, server_default="green")
        )
    with op.batch_alter_table("idempotency_key") as batch:
        batch.add_column(
            sa.Column("complete", sa.Boolean(), nullable=False, server_default=sa.true())
        )
    op.drop_index("uq_rollout_open_service", table_name="rollout")
    op.create_index(
        "uq_rollout_open_service",
        "rollout",
        ["service"],
        unique=True,
        postgresql_where=sa.text(NEW_OPEN),
        sqlite_where=sa.text(NEW_OPEN),
    )
    _convert_data()


def _convert_data() -> None:
    bind = op.get_bind()
    json_type = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
    for row in bind.execute(sa.text("SELECT name, policy FROM service")).mappings():
        policy = _load(row["policy"]) or {}
        if isinstance(policy, dict) and "router" in policy:
            converted = {**policy, "router": to_slots(policy["router"])}
            if converted != policy:
                bind.execute(
                    sa.text("UPDATE service SET policy = :policy WHERE name = :name").bindparams(
                        sa.bindparam("policy", type_=json_type)
                    ),
                    {"policy": converted, "name": row["name"]},
                )
    for row in bind.execute(sa.text("SELECT id, router FROM rollout")).mappings():
        router = _load(row["router"])
        converted = to_slots(router)
        if converted != router:
            bind.execute(
                sa.text("UPDATE rollout SET router = :router WHERE id = :id").bindparams(
                    sa.bindparam("router", type_=json_type)
                ),
                {"router": converted, "id": row["id"]},
            )
    # A succeeded rollout's traffic stayed on its canary address (now slot green).
    bind.execute(sa.text("UPDATE rollout SET stable_slot = 'green' WHERE state = 'succeeded'"))
    bind.execute(
        sa.text(
            "UPDATE service SET stable_slot = CASE WHEN ("
            " SELECT r.state FROM rollout r WHERE r.service = service.name"
            " ORDER BY r.id DESC LIMIT 1) = 'succeeded' THEN 'green' ELSE 'blue' END"
        )
    )


def downgrade() -> None:
    op.drop_index("uq_rollout_open_service", table_name="rollout")
    op.create_index(
        "uq_rollout_open_service",
        "rollout",
        ["service"],
        unique=True,
        postgresql_where=sa.text(OLD_OPEN),
        sqlite_where=sa.text(OLD_OPEN),
    )
    with op.batch_alter_table("idempotency_key") as batch:
        batch.drop_column("complete")
    with op.batch_alter_table("rollout") as batch:
        batch.drop_column("canary_slot")
        batch.drop_column("stable_slot")
    with op.batch_alter_table("service") as batch:
        batch.drop_column("previous_slot")
        batch.drop_column("previous_version")
        batch.drop_column("stable_slot")
