"""One audit event appended to the chain in one round trip: `audit_append(...)` takes the
append lock, reads the head, hashes and inserts.

The hash is the one `opsapi.audit.chain.link` computes, sha256 over the previous hash, a
newline and the event's canonical bytes, which the caller passes (computed in Python, as
verify computes them). As in `audit_chain_head()` (0015), the head is read by a query that
starts after the lock is held, so it sees every event committed before. The lock is held
until the caller's transaction ends: from here to the commit, the shortest critical section
the chain allows. PostgreSQL only: SQLite serialises write transactions.

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-30
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# 724113002: opsapi.audit.chain's append lock (written out: a migration is frozen).
PG_FUNCTION = r"""CREATE FUNCTION audit_append(
  p_at timestamptz, p_actor text, p_roles jsonb, p_source text, p_action text,
  p_service text, p_rollout_id integer, p_outcome text, p_request_id text,
  p_client_address text, p_details jsonb, p_canonical bytea
) RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
  previous text;
  digest text;
BEGIN
  PERFORM pg_advisory_xact_lock(724113002);
  previous := coalesce(
    (SELECT hash FROM audit_event ORDER BY id DESC LIMIT 1), repeat('0', 64));
  digest := encode(sha256(convert_to(previous || E'\n', 'UTF8') || p_canonical), 'hex');
  INSERT INTO audit_event (at, actor, roles, source, action, service, rollout_id, outcome,
                           request_id, client_address, details, prev_hash, hash)
  VALUES (p_at, p_actor, p_roles, p_source, p_action, p_service, p_rollout_id, p_outcome,
          p_request_id, p_client_address, p_details, previous, digest);
  RETURN digest;
END $$"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "DROP FUNCTION audit_append(timestamptz, text, jsonb, text, text, text, integer, "
            "text, text, text, jsonb, bytea)"
        )
