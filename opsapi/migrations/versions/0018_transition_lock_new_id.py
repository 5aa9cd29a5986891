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
DECLARE
  s service;
  r rollout;
BEGIN
  -- 0017's body (not a call to it: a nested set-returning call cost half as much again).
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
  IF p_new_rollout THEN
    -- Drawn once the locks are held, and only for a service that has a row.
    next_rollout_id := nextval(pg_get_serial_sequence('rollout', 'id'));
  END IF;
  RETURN NEXT;
END $$"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION transition_lock(text, boolean, boolean, boolean)")
