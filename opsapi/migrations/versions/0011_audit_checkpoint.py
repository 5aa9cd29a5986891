"""Audit retention: signed checkpoints, and the one way archived events may be removed.

`audit_checkpoint` records each archive (`opsapi audit archive`): the last archived event's id
and hash, how many events, the archive file's name and sha256, an Ed25519 signature. It is
append-only (triggers), and on insert the database checks it: `last_hash` must be event
`last_id`'s hash, the anchor must be the latest checkpoint (or the chain's start), `first_id`
and `events` must describe the events between them.

`audit_event` stays append-only, with one exception: events a checkpoint covers may be deleted

- on PostgreSQL, only through `audit_archive_delete(upto, max_rows)`, a SECURITY DEFINER
  function owned by the migration role: it refuses `upto` beyond the latest checkpoint and marks
  its own transaction, and the row trigger lets a DELETE through only when it runs as the
  table's owner inside that mark, for an event a checkpoint covers. A DELETE by the application
  role is refused (by privileges, and by the trigger too); UPDATE and TRUNCATE stay refused for
  everyone;
- on SQLite (no roles, no functions), by any DELETE, but only of events a checkpoint covers.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_CHECKPOINT_LOCK = 724_113_003  # serialises checkpoint inserts (PostgreSQL advisory lock)
_GENESIS = "0" * 64

PG_APPEND_ONLY = """CREATE OR REPLACE FUNCTION audit_event_append_only() RETURNS trigger AS $$
BEGIN
  -- The one way through: audit_archive_delete() runs as the table's owner and marks its
  -- transaction with how far it may remove; only events a checkpoint covers go.
  IF TG_OP = 'DELETE'
     AND current_user = (SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = TG_RELID)
     AND OLD.id <= nullif(current_setting('opsapi.audit_archive_upto', true), '')::bigint
     AND EXISTS (SELECT 1 FROM {schema}.audit_checkpoint WHERE last_id >= OLD.id)
  THEN
    RETURN OLD;
  END IF;
  RAISE EXCEPTION 'audit_event is append-only: % refused', TG_OP;
END $$ LANGUAGE plpgsql"""

PG_APPEND_ONLY_BEFORE = """CREATE OR REPLACE FUNCTION audit_event_append_only() RETURNS trigger AS $$
       BEGIN RAISE EXCEPTION 'audit_event is append-only: % refused', TG_OP; END
       $$ LANGUAGE plpgsql"""

PG_DELETE_FUNCTION = """CREATE FUNCTION audit_archive_delete(upto bigint, max_rows integer)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = {schema}, pg_temp AS $$
DECLARE
  covered bigint;
  removed bigint;
BEGIN
  SELECT max(last_id) INTO covered FROM {schema}.audit_checkpoint;
  IF upto IS NULL OR covered IS NULL OR upto > covered THEN
    RAISE EXCEPTION 'audit_archive_delete: events up to % are not covered by a checkpoint (the latest covers events up to %)',
          upto, coalesce(covered::text, 'none') USING ERRCODE = 'insufficient_privilege';
  END IF;
  IF max_rows IS NULL OR max_rows < 1 THEN
    RAISE EXCEPTION 'audit_archive_delete: max_rows must be at least 1';
  END IF;
  PERFORM set_config('opsapi.audit_archive_upto', upto::text, true);
  DELETE FROM {schema}.audit_event WHERE id IN (
    SELECT id FROM {schema}.audit_event WHERE id <= upto ORDER BY id LIMIT max_rows);
  GET DIAGNOSTICS removed = ROW_COUNT;
  PERFORM set_config('opsapi.audit_archive_upto', '', true);
  RETURN removed;
END $$"""

PG_CHECKPOINT_GUARD = """CREATE FUNCTION audit_checkpoint_guard() RETURNS trigger AS $$
DECLARE
  latest record;
  stored text;
  covered bigint;
  first bigint;
BEGIN
  IF TG_OP <> 'INSERT' THEN
    RAISE EXCEPTION 'audit_checkpoint is append-only: % refused', TG_OP;
  END IF;
  PERFORM pg_advisory_xact_lock({lock});
  SELECT last_id, last_hash INTO latest FROM {schema}.audit_checkpoint
   ORDER BY last_id DESC LIMIT 1;
  IF FOUND THEN
    IF NEW.anchor_id IS DISTINCT FROM latest.last_id
       OR NEW.anchor_hash IS DISTINCT FROM latest.last_hash THEN
      RAISE EXCEPTION 'audit_checkpoint: the anchor must be the latest checkpoint (event %)',
                      latest.last_id;
    END IF;
  ELSIF NEW.anchor_id IS NOT NULL OR NEW.anchor_hash <> '{genesis}' THEN
    RAISE EXCEPTION 'audit_checkpoint: the first checkpoint starts at the chain''s start';
  END IF;
  SELECT hash INTO stored FROM {schema}.audit_event WHERE id = NEW.last_id;
  IF stored IS DISTINCT FROM NEW.last_hash THEN
    RAISE EXCEPTION 'audit_checkpoint: last_hash is not the hash of event %', NEW.last_id;
  END IF;
  SELECT count(*), min(id) INTO covered, first FROM {schema}.audit_event
   WHERE id <= NEW.last_id AND (NEW.anchor_id IS NULL OR id > NEW.anchor_id);
  IF covered <> NEW.events OR first IS DISTINCT FROM NEW.first_id THEN
    RAISE EXCEPTION 'audit_checkpoint: % events from id % are covered, not % from id %',
                    covered, first, NEW.events, NEW.first_id;
  END IF;
  RETURN NEW;
END $$ LANGUAGE plpgsql"""

PG_CHECKPOINT_TRIGGERS = [
    """CREATE TRIGGER audit_checkpoint_guard BEFORE INSERT OR UPDATE OR DELETE
       ON audit_checkpoint FOR EACH ROW EXECUTE FUNCTION audit_checkpoint_guard()""",
    """CREATE TRIGGER audit_checkpoint_no_truncate BEFORE TRUNCATE ON audit_checkpoint
       FOR EACH STATEMENT EXECUTE FUNCTION audit_checkpoint_guard()""",
]

_COVERED = "SELECT 1 FROM audit_checkpoint WHERE last_id >= OLD.id"
_RANGE = (
    "FROM audit_event WHERE id <= NEW.last_id AND (NEW.anchor_id IS NULL OR id > NEW.anchor_id)"
)
_LATEST = "FROM audit_checkpoint ORDER BY last_id DESC LIMIT 1"
SQLITE_TRIGGERS = [
    f"""CREATE TRIGGER audit_event_no_delete BEFORE DELETE ON audit_event
       WHEN NOT EXISTS ({_COVERED})
       BEGIN SELECT RAISE(ABORT, 'audit_event is append-only: DELETE refused'); END""",
    """CREATE TRIGGER audit_checkpoint_no_update BEFORE UPDATE ON audit_checkpoint
       BEGIN SELECT RAISE(ABORT, 'audit_checkpoint is append-only: UPDATE refused'); END""",
    """CREATE TRIGGER audit_checkpoint_no_delete BEFORE DELETE ON audit_checkpoint
       BEGIN SELECT RAISE(ABORT, 'audit_checkpoint is append-only: DELETE refused'); END""",
    f"""CREATE TRIGGER audit_checkpoint_check BEFORE INSERT ON audit_checkpoint
       BEGIN
         SELECT RAISE(ABORT, 'audit_checkpoint: the anchor must be the latest checkpoint')
          WHERE (SELECT last_id {_LATEST}) IS NOT NEW.anchor_id
             OR coalesce((SELECT last_hash {_LATEST}), '{_GENESIS}') IS NOT NEW.anchor_hash;
         SELECT RAISE(ABORT, 'audit_checkpoint: last_hash is not the hash of event last_id')
          WHERE (SELECT hash FROM audit_event WHERE id = NEW.last_id) IS NOT NEW.last_hash;
         SELECT RAISE(ABORT, 'audit_checkpoint: first_id and events must match what it covers')
          WHERE (SELECT count(*) {_RANGE}) <> NEW.events
             OR (SELECT min(id) {_RANGE}) IS NOT NEW.first_id;
       END""",  # noqa: S608 (constants only)
]
SQLITE_DELETE_BEFORE = """CREATE TRIGGER audit_event_no_delete BEFORE DELETE ON audit_event
       BEGIN SELECT RAISE(ABORT, 'audit_event is append-only: DELETE refused'); END"""


def upgrade() -> None:
    op.create_table(
        "audit_checkpoint",
        sa.Column("id", _ID, primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("archived_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("anchor_id", sa.BigInteger(), nullable=True),
        sa.Column("anchor_hash", sa.String(64), nullable=False),
        sa.Column("first_id", sa.BigInteger(), nullable=False),
        sa.Column("last_id", sa.BigInteger(), nullable=False),
        sa.Column("last_hash", sa.String(64), nullable=False),
        sa.Column("events", sa.BigInteger(), nullable=False),
        sa.Column("archive_name", sa.String(255), nullable=False),
        sa.Column("archive_sha256", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("public_key", sa.String(64), nullable=False),
        sa.Column("signature", sa.String(128), nullable=False),
        sa.CheckConstraint("events > 0", name="ck_audit_checkpoint_events"),
    )
    op.create_index("uq_audit_checkpoint_last_id", "audit_checkpoint", ["last_id"], unique=True)
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS audit_event_no_delete")
        for statement in SQLITE_TRIGGERS:
            op.execute(statement)
        return
    schema = _schema()
    values = {"schema": schema, "lock": _CHECKPOINT_LOCK, "genesis": _GENESIS}
    op.execute(PG_CHECKPOINT_GUARD.format(**values))
    for statement in PG_CHECKPOINT_TRIGGERS:
        op.execute(statement)
    op.execute(PG_APPEND_ONLY.format(**values))
    op.execute(PG_DELETE_FUNCTION.format(**values))
    # Only the roles granted EXECUTE (the application role, see docs/audit.md) may call it.
    op.execute("REVOKE ALL ON FUNCTION audit_archive_delete(bigint, integer) FROM PUBLIC")


def _schema() -> str:
    # The functions name the tables with their schema: a SECURITY DEFINER function must not
    # find its tables through the caller's search_path (a temporary table could shadow them).
    name = op.get_bind().scalar(sa.text("SELECT current_schema()"))
    return '"' + str(name).replace('"', '""') + '"'


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for trigger in ("audit_checkpoint_check", "audit_checkpoint_no_delete",
                        "audit_checkpoint_no_update", "audit_event_no_delete"):  # fmt: skip
            op.execute(f"DROP TRIGGER IF EXISTS {trigger}")
        op.execute(SQLITE_DELETE_BEFORE)
    else:
        op.execute("DROP FUNCTION IF EXISTS audit_archive_delete(bigint, integer)")
        op.execute(PG_APPEND_ONLY_BEFORE)
        op.execute("DROP TRIGGER IF EXISTS audit_checkpoint_no_truncate ON audit_checkpoint")
        op.execute("DROP TRIGGER IF EXISTS audit_checkpoint_guard ON audit_checkpoint")
        op.execute("DROP FUNCTION IF EXISTS audit_checkpoint_guard()")
    op.drop_index("uq_audit_checkpoint_last_id", table_name="audit_checkpoint")
    op.drop_table("audit_checkpoint")
