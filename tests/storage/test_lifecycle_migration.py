"""Migration 0007 turns turn-1 router parameters (fixed stable/canary addresses) into slots, and
places each service's stable version in the slot its traffic really went to."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.engine import Connection

from opsapi.storage.db import create_engine
from opsapi.storage.migrate import alembic_config, upgrade
from opsapi.storage.types import JSONDocument
from tests.support.databases import create_pg_database, drop_pg_database

ROLLOUT = (
    "INSERT INTO rollout (service, state, canary_version, stable_version, steps, step_index,"
    " desired_weight, applied_weight, step_started_at, paused_seconds, auto_promote,"
    " interval_seconds, router, gates, gate_policy, triggered_by, created_by, created_at,"
    " updated_at) VALUES (:service, :state, 'v2', 'v1', '[]', 0, :weight, :weight, '2026-01-01',"
    " 0, false, 60, :router, '[]', '{}', 'user', 'u', '2026-01-01', '2026-01-01')"
)
NGINX = {"name": "edge", "upstream": "shop", "stable": "10.0.0.1:80", "canary": "10.0.0.2:80"}
HAPROXY = {"name": "lb", "backend": "pay", "stable_server": "s1", "canary_server": "s2"}


def _to(revision: str) -> Any:
    def run(connection: Connection, url: str) -> None:
        config = alembic_config(url)
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

    return run


@pytest.fixture(params=["postgres", "sqlite"])
async def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A database with no schema yet (the session's PostgreSQL database is already migrated)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'turn-one.db'}"
        return
    name, url = await create_pg_database()
    yield url
    await drop_pg_database(name)


async def test_turn_one_parameters_become_slots(empty_url: str) -> None:
    engine = create_engine(empty_url)
    try:
        # given a database at revision 0006 with turn-1 policies and rollouts
        async with engine.connect() as connection:
            await connection.run_sync(_to("0006"), str(engine.url))
            await connection.commit()
        async with engine.begin() as connection:
            for name, router in (("shop", NGINX), ("pay", HAPROXY), ("pulled", {"name": "pull"})):
                await connection.execute(
                    sa.text("INSERT INTO service (name, policy, updated_at, updated_by) VALUES "
                            "(:name, :policy, '2026-01-01', 'admin')").bindparams(
                        sa.bindparam("policy", type_=JSONDocument)),
                    {"name": name, "policy": {"router": router}},
                )  # fmt: skip
            # shop's last release succeeded: its traffic stayed on the canary address
            rollout = sa.text(ROLLOUT).bindparams(sa.bindparam("router", type_=JSONDocument))
            await connection.execute(
                rollout, {"service": "shop", "state": "succeeded", "weight": 100, "router": NGINX}
            )
            await connection.execute(
                rollout, {"service": "pay", "state": "rolled_back", "weight": 0, "router": HAPROXY}
            )

        # when the migrations run to the head
        await upgrade(engine)

        # then every router names two slots, blue (was stable) and green (was canary)
        async with engine.connect() as connection:
            services = {
                row.name: (json.loads(row.policy) if isinstance(row.policy, str) else row.policy,
                           row.stable_slot)
                for row in await connection.execute(
                    sa.text("SELECT name, policy, stable_slot FROM service"))
            }  # fmt: skip
            rollouts = {
                row.service: (json.loads(row.router) if isinstance(row.router, str) else row.router,
                              row.stable_slot, row.canary_slot)
                for row in await connection.execute(
                    sa.text("SELECT service, router, stable_slot, canary_slot FROM rollout"))
            }  # fmt: skip
    finally:
        await engine.dispose()
    assert services["shop"][0]["router"] == {
        "name": "edge", "upstream": "shop",
        "slots": {"blue": "10.0.0.1:80", "green": "10.0.0.2:80"},
    }  # fmt: skip
    assert services["pay"][0]["router"] == {
        "name": "lb", "backend": "pay", "slots": {"blue": "s1", "green": "s2"},
    }  # fmt: skip
    assert services["pulled"][0]["router"] == {"name": "pull"}
    # and the stable version is where traffic went: green after a success, blue otherwise
    assert (services["shop"][1], services["pay"][1], services["pulled"][1]) == (
        "green", "blue", "blue",
    )  # fmt: skip
    assert rollouts["shop"] == (services["shop"][0]["router"], "green", "green")
    assert rollouts["pay"] == (services["pay"][0]["router"], "blue", "green")
