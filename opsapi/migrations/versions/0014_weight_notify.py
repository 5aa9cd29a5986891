"""The data plane's invalidation comes from the database itself: a change to what a service's
weight answer shows (a rollout's weight, generation, state, versions, slots or lease, a new
rollout, the service's stable version) sends `NOTIFY opsapi_weights, '<service>'`, delivered
when the transaction commits, as the interpreter's own `pg_notify` call did (a round trip per
transition, now none). PostgreSQL only: SQLite runs in one process, whose interpreter
invalidates its copies directly.

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-30
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# What the weight answer (opsapi.canary.views.weight_document) is made of.
_SHOWN = (
    "desired_weight",
    "generation",
    "state",
    "canary_version",
    "stable_version",
    "canary_slot",
    "stable_slot",
    "lease_seconds",
)
_CHANGED = " OR ".join(f"OLD.{name} IS DISTINCT FROM NEW.{name}" for name in _SHOWN)

PG_FUNCTION = """CREATE FUNCTION opsapi_weights_notify() RETURNS trigger AS $$
BEGIN
  -- The payload names the service (the column the trigger names): each replica drops its
  -- copy of that service's answer.
  PERFORM pg_notify('opsapi_weights', to_jsonb(NEW) ->> TG_ARGV[0]);
  RETURN NULL;
END $$ LANGUAGE plpgsql"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(PG_FUNCTION)
    op.execute(
        "CREATE TRIGGER rollout_weights_started AFTER INSERT ON rollout"
        " FOR EACH ROW EXECUTE FUNCTION opsapi_weights_notify('service')"
    )
    op.execute(
        "CREATE TRIGGER rollout_weights_changed AFTER UPDATE ON rollout"
        f" FOR EACH ROW WHEN ({_CHANGED}) EXECUTE FUNCTION opsapi_weights_notify('service')"
    )
    op.execute(
        "CREATE TRIGGER service_weights_changed AFTER UPDATE ON service FOR EACH ROW"
        " WHEN (OLD.stable_version IS DISTINCT FROM NEW.stable_version)"
        " EXECUTE FUNCTION opsapi_weights_notify('name')"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER service_weights_changed ON service")
    op.execute("DROP TRIGGER rollout_weights_changed ON rollout")
    op.execute("DROP TRIGGER rollout_weights_started ON rollout")
    op.execute("DROP FUNCTION opsapi_weights_notify()")
