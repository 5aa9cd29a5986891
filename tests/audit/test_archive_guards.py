"""Only the archive path removes audit events, and only those a checkpoint covers.

On PostgreSQL the application runs as the role docs/audit.md sets up (not a superuser): it can
archive, and it cannot UPDATE, DELETE or TRUNCATE events or checkpoints, call the privileged
function beyond the latest checkpoint, or record a checkpoint that does not match the events.
On SQLite the triggers refuse every change but the removal of covered events.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa

from opsapi.audit import chain
from opsapi.audit.archive import archive
from opsapi.audit.chain import GENESIS
from opsapi.audit.checkpoint import CheckpointKey
from opsapi.audit.verify import verify_chain
from opsapi.storage.db import create_engine
from opsapi.storage.migrate import upgrade
from tests.audit.test_archive import CUTOFF, OLD, RECENT
from tests.audit.test_review_api import synthetic_rows
from tests.audit.test_verify import DOC, _dsn, _statements
from tests.support.databases import PG_ADMIN_DSN, unavailable


def _checkpoint_insert(**values: Any) -> str:
    """An INSERT of a checkpoint row (no signature check happens in the database)."""
    row = {"created_at": "'2026-07-01T00:00:00Z'", "archived_before": "'2026-07-01T00:00:00Z'",
           "anchor_id": "NULL", "anchor_hash": f"'{GENESIS}'", "archive_name": "'x.ndjson'",
           "archive_sha256": f"'{'0' * 64}'", "key_id": f"'{'0' * 64}'", "public_key": "'AA=='",
           "signature": "'AA=='"}  # fmt: skip
    row.update({name: str(value) for name, value in values.items()})
    return f"INSERT INTO audit_checkpoint ({', '.join(row)}) VALUES ({', '.join(row.values())})"


async def _append(url: str, rows: list[dict[str, Any]]) -> None:
    engine = create_engine(url)
    try:
        for first in range(0, len(rows), 500):
            async with engine.begin() as connection:
                await chain.append(connection, rows[first : first + 500])
    finally:
        await engine.dispose()


async def _archive(url: str, tmp_path: Path) -> dict[str, Any]:
    engine = create_engine(url)
    try:
        key = CheckpointKey.load_or_create(tmp_path / "key.pem")
        return await archive(engine, before=CUTOFF, out=tmp_path / "a.ndjson", key=key)
    finally:
        await engine.dispose()


async def _verify(url: str) -> dict[str, Any]:
    engine = create_engine(url)
    try:
        return await verify_chain(engine)
    finally:
        await engine.dispose()


# --- PostgreSQL, as the documented application role ---------------------------------------


@pytest.fixture
async def roles() -> AsyncIterator[dict[str, str]]:
    """A database set up exactly as docs/audit.md says: DSNs of the migrator, the app, and of
    a careless role granted every privilege on audit_event."""
    suffix = uuid.uuid4().hex[:8]
    names = {"opsapi_migrator": f"opsapi_mig_{suffix}", "opsapi_app": f"opsapi_app_{suffix}",
             "opsapi": f"opsapi_archive_{suffix}"}  # fmt: skip
    careless = f"opsapi_careless_{suffix}"
    setup, grants, _ = re.findall(r"```sql\n(.*?)```", DOC.read_text(), re.S)
    try:
        admin = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as error:
        unavailable(f"PostgreSQL ({error.__class__.__name__})")
        raise
    try:
        for statement in _statements(setup, names):
            await admin.execute(statement)
        await admin.execute(f"CREATE ROLE {careless} LOGIN PASSWORD 'change-me'")
        await admin.execute(f'GRANT CONNECT ON DATABASE "{names["opsapi"]}" TO {careless}')
        migrator = _dsn(names["opsapi_migrator"], names["opsapi"])
        engine = create_engine(migrator.replace("postgresql://", "postgresql+asyncpg://"))
        await upgrade(engine)
        await engine.dispose()
        owner = await asyncpg.connect(migrator)
        try:
            for statement in _statements(grants, names):
                await owner.execute(statement)
            await owner.execute(f"GRANT USAGE ON SCHEMA public TO {careless}")
            await owner.execute(f"GRANT ALL ON audit_event, audit_checkpoint TO {careless}")
        finally:
            await owner.close()
        yield {
            "migrator": migrator,
            "app": _dsn(names["opsapi_app"], names["opsapi"]),
            "careless": _dsn(careless, names["opsapi"]),
        }
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{names["opsapi"]}" WITH (FORCE)')
        for role in (careless, names["opsapi_app"], names["opsapi_migrator"]):
            await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.close()


def _url(dsn: str) -> str:
    return dsn.replace("postgresql://", "postgresql+asyncpg://")


async def _refused(dsn: str, cases: list[tuple[str, str]]) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        for statement, refusal in cases:
            with pytest.raises(asyncpg.PostgresError, match=refusal):
                await connection.execute(statement)
    finally:
        await connection.close()


async def test_the_application_role_removes_events_only_through_the_archive(
    roles: dict[str, str], tmp_path: Path
) -> None:
    # given events written by the application role
    app = _url(roles["app"])
    await _append(app, synthetic_rows(300, start=OLD) + synthetic_rows(40, seed=2, start=RECENT))

    # then before any checkpoint, nothing can be removed or changed, not even by the function
    await _refused(roles["app"], [
        ("UPDATE audit_event SET actor = 'x'", "permission denied"),
        ("DELETE FROM audit_event WHERE id = 1", "permission denied"),
        ("TRUNCATE audit_event", "permission denied"),
        ("SELECT audit_archive_delete(10, 100)", "not covered by a checkpoint"),
    ])  # fmt: skip

    # when the application role archives the old events
    result = await _archive(app, tmp_path)

    # then they were removed through the privileged function, and the rest verifies
    assert (result["checkpoint"]["last_id"], result["removed"]) == (300, 300)
    assert (await _verify(app))["intact"] is True
    kept = await _count(roles["app"])

    # and nothing beyond the checkpoint can be removed, nor the checkpoint changed
    await _refused(roles["app"], [
        ("SELECT audit_archive_delete(301, 100)", "not covered by a checkpoint"),
        ("DELETE FROM audit_event WHERE id = 301", "permission denied"),
        ("UPDATE audit_checkpoint SET last_id = 1000", "permission denied"),
        ("DELETE FROM audit_checkpoint", "permission denied"),
        ("TRUNCATE audit_checkpoint", "permission denied"),
        # a checkpoint that does not match the events it claims is refused by the database
        (_checkpoint_insert(anchor_id=300, anchor_hash=f"'{result['checkpoint']['last_hash']}'",
                            first_id=301, last_id=310, events=10, last_hash=f"'{'a' * 64}'"),
         "last_hash is not the hash of event 310"),
        (_checkpoint_insert(first_id=1, last_id=320, events=320, last_hash=f"'{'a' * 64}'"),
         "the anchor must be the latest checkpoint"),
    ])  # fmt: skip
    assert await _count(roles["app"]) == kept


async def test_covered_events_are_removed_by_nobody_but_the_function(
    roles: dict[str, str], tmp_path: Path
) -> None:
    # given events, and a checkpoint recorded by hand (valid for the database, but signed by
    # no key: someone with the application role's password and no archive key)
    app = _url(roles["app"])
    await _append(app, synthetic_rows(50, start=OLD))
    connection = await asyncpg.connect(roles["app"])
    try:
        last_hash = await connection.fetchval("SELECT hash FROM audit_event WHERE id = 20")
        await connection.execute(
            _checkpoint_insert(first_id=1, last_id=20, events=20, last_hash=f"'{last_hash}'")
        )
    finally:
        await connection.close()

    # then covered events are still refused to a DELETE outside the function: to the owner
    # and to a role granted every privilege, even when it sets the function's marker
    refusals = [
        ("DELETE FROM audit_event WHERE id = 1", "append-only"),
        ("UPDATE audit_event SET actor = 'x' WHERE id = 1", "append-only"),
        ("TRUNCATE audit_event", "append-only"),
        ("UPDATE audit_checkpoint SET archive_name = 'y'", "append-only"),
        ("DELETE FROM audit_checkpoint", "append-only"),
        ("TRUNCATE audit_checkpoint", "append-only"),
    ]
    await _refused(roles["migrator"], refusals)
    # (the function's marker does not help a role that is not the table's owner)
    marked = ("BEGIN; SELECT set_config('opsapi.audit_archive_upto', '20', true);"
              " DELETE FROM audit_event WHERE id = 1", "append-only")  # fmt: skip
    await _refused(roles["careless"], [*refusals, marked])
    assert await _count(roles["app"]) == 50

    # and verification reports the checkpoint that no archive key signed
    report = await _verify(app)
    assert report["intact"] is False
    assert report["first_broken"] == {
        "id": 20, "checkpoint_id": 1,
        "reason": "checkpoint key_id is not the sha256 of its public key",
    }  # fmt: skip


async def _count(dsn: str) -> int:
    connection = await asyncpg.connect(dsn)
    try:
        return int(await connection.fetchval("SELECT count(*) FROM audit_event"))
    finally:
        await connection.close()


# --- SQLite -------------------------------------------------------------------------------


async def test_sqlite_triggers_refuse_every_change_but_removing_covered_events(
    sqlite_url: str, tmp_path: Path
) -> None:
    # given events and an archive of the old ones
    engine = create_engine(sqlite_url)
    await upgrade(engine)
    await engine.dispose()
    await _append(
        sqlite_url, synthetic_rows(120, start=OLD) + synthetic_rows(10, seed=2, start=RECENT)
    )
    result = await _archive(sqlite_url, tmp_path)
    assert (result["checkpoint"]["last_id"], result["removed"]) == (120, 120)
    last_hash = result["checkpoint"]["last_hash"]

    # then events beyond the checkpoint and the checkpoint itself cannot be changed
    engine = create_engine(sqlite_url)
    try:
        for statement, refusal in [
            ("DELETE FROM audit_event WHERE id = 121", "append-only: DELETE refused"),
            ("DELETE FROM audit_event", "append-only: DELETE refused"),
            ("UPDATE audit_event SET actor = 'x' WHERE id = 121", "append-only: UPDATE refused"),
            ("UPDATE audit_checkpoint SET last_id = 125", "append-only: UPDATE refused"),
            ("DELETE FROM audit_checkpoint", "append-only: DELETE refused"),
            (_checkpoint_insert(anchor_id=120, anchor_hash=f"'{last_hash}'", first_id=121,
                                last_id=125, events=5, last_hash=f"'{'a' * 64}'"),
             "last_hash is not the hash of event last_id"),
            (_checkpoint_insert(first_id=1, last_id=125, events=5, last_hash=f"'{'a' * 64}'"),
             "the anchor must be the latest checkpoint"),
        ]:  # fmt: skip
            with pytest.raises(sa.exc.IntegrityError, match=refusal):
                async with engine.begin() as connection:
                    await connection.execute(sa.text(statement))
        async with engine.connect() as connection:
            assert await connection.scalar(sa.text("SELECT count(*) FROM audit_event")) == 11
    finally:
        await engine.dispose()
    assert (await _verify(sqlite_url))["intact"] is True
