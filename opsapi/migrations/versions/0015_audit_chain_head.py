"""The audit chain's head in one round trip: `audit_chain_head()` takes the append lock and
then reads the last event's hash (NULL before the first event).

The lock and the read must be two queries: a query's snapshot is taken when it starts, so a
head read in the same query as the lock could miss an event committed while it waited. A
VOLATILE function's queries each take a fresh snapshot (READ COMMITTED), so its read, made
after the lock is held, sees every event committed before. The lock is the advisory lock every
appender takes (`opsapi.audit.chain`), held until the caller's transaction ends. PostgreSQL
only: SQLite serialises write transactions.

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-30
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# 724113002: opsapi.audit.chain's append lock (written out: a migration is frozen).
PG_FUNCTION = """CREATE FUNCTION audit_chain_head() RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  PERFORM pg_advisory_xact_lock(724113002);
  RETURN (SELECT hash FROM audit_event ORDER BY id DESC LIMIT 1);
END $$"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION audit_chain_head()")
