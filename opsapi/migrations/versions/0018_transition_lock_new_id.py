"""`transition_lock(service, outbox, safety, new_rollout)`: as `transition_lock` (migration
0017), and, when `new_rollout`, the id a rollout started by this transition takes
(`next_rollout_id`, drawn from the rollout table's own sequence). A start then writes its
rollout with its audit event in one statement: the id the event names is known before the
row is inserted (one round trip fewer per start). An id drawn by a transition that does not
start one is simply never used, as a rolled-back insert leaves one unused.

The three-argument function stays for replicas still running the earlier code during a
rolling upgrade.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-01
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PG_FUNCTION = r"""CREATE FUNCTION transition_lock(
  p_service text, p_outbox boolean, p_safety boolean, p_new_rollout boolean
) RETURNS TABLE (
  service_row service, rollout_row rollout, outbox_rows outbox[],
  rejected text[], incidents incident[], freezes freeze_window[], next_rollout_id integer
)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  -- The id is drawn once the locks are held (the projection runs after the scan), and only
  -- when the service has a row (no row: its first writer creates it, then calls again).
  RETURN QUERY
    SELECT l.*, CASE WHEN p_new_rollout
                     THEN nextval(pg_get_serial_sequence('rollout', 'id'))::integer END
      FROM transition_lock(p_service, p_outbox, p_safety) l;
END $$"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION transition_lock(text, boolean, boolean, boolean)")
