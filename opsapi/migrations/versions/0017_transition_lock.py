"""What a transition locks and reads, in one round trip: `transition_lock(service, outbox,
safety)` locks the service's row, then its latest rollout, and returns both with, when asked,
the rollout's outbox rows (for the answer) and what holds the service (standing rejections,
open incidents, freeze windows set through the API).

Each query runs after the one before it holds its lock and takes its own snapshot (a VOLATILE
function, READ COMMITTED): the rollout read after the service lock sees a rollout committed
while it waited, as two statements did. The order (service, then rollout) is every
transition's. No row when the service has none: its first writer creates it, then calls
again. PostgreSQL only: SQLite runs the same reads one by one.

Revision ID: 0017
Revises: 0016
Create Date: 2026-11-30
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PG_FUNCTION = r"""CREATE FUNCTION transition_lock(
  p_service text, p_outbox boolean, p_safety boolean
) RETURNS TABLE (
  service_row service, rollout_row rollout, outbox_rows outbox[],
  rejected text[], incidents incident[], freezes freeze_window[]
)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
  s service;
  r rollout;
BEGIN
  SELECT * INTO s FROM service WHERE name = p_service FOR UPDATE;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  SELECT * INTO r FROM rollout WHERE rollout.service = p_service
    ORDER BY id DESC LIMIT 1 FOR UPDATE;
  service_row := s;
  rollout_row := CASE WHEN r.id IS NULL THEN NULL ELSE r END;
  IF p_outbox AND r.id IS NOT NULL THEN
    outbox_rows := ARRAY(SELECT o FROM outbox o WHERE o.rollout_id = r.id ORDER BY o.id);
  END IF;
  IF p_safety THEN
    rejected := ARRAY(SELECT v.version FROM rejected_version v
                      WHERE v.service = p_service AND v.lifted_at IS NULL);
    incidents := ARRAY(SELECT i FROM incident i
                       WHERE i.service = p_service AND i.resolved_at IS NULL
                       ORDER BY i.opened_at);
    freezes := ARRAY(SELECT f FROM freeze_window f WHERE f.deleted_at IS NULL ORDER BY f.id);
  END IF;
  RETURN NEXT;
END $$"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION transition_lock(text, boolean, boolean)")
