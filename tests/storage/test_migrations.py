"""The Alembic migrations build exactly the schema the models describe, on both databases."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

from opsapi.storage import tables  # noqa: F401
from opsapi.storage.db import create_engine
from opsapi.storage.migrate import upgrade


async def test_migrations_match_the_models(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        await upgrade(engine)
        await upgrade(engine)  # running it again is a no-op
        async with engine.connect() as connection:
            diff = await connection.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync), SQLModel.metadata)
            )
    finally:
        await engine.dispose()
    # server defaults exist only to fill rows of older revisions
    assert [d for d in diff if "server_default" not in str(d)] == []


async def test_one_open_rollout_per_service_is_enforced_by_the_database(db_url: str) -> None:
    import sqlalchemy as sa

    engine = create_engine(db_url)
    row = (
        "INSERT INTO rollout (service, state, canary_version, steps, step_index, desired_weight,"
        " step_started_at, paused_seconds, auto_promote, interval_seconds, router, gates,"
        " gate_policy, triggered_by, created_by, created_at, updated_at) VALUES ('s', '{state}',"
        " 'v', '[]', 0, 10, '2026-01-01', 0, false, 60, '{{}}', '[]', '{{}}', 'user', 'u',"
        " '2026-01-01', '2026-01-01')"
    )
    try:
        await upgrade(engine)
        async with engine.begin() as connection:
            await connection.execute(sa.text(row.format(state="rolled_back")))
            await connection.execute(sa.text(row.format(state="succeeded")))
            await connection.execute(sa.text(row.format(state="progressing")))
        refused = False
        try:
            async with engine.begin() as connection:
                await connection.execute(sa.text(row.format(state="paused")))
        except sa.exc.IntegrityError:
            refused = True
        assert refused
    finally:
        await engine.dispose()
