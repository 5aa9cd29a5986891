"""Every audit event is chained to the one before it, and the database refuses edits."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

from opsapi.audit.chain import GENESIS, link
from tests.support.app import Harness


async def _activity(api: Harness) -> None:
    await api.post("/canary/promote", {"service": "checkout", "version": "v2"})
    await api.get("/canary/checkout")
    await api.post("/canary/promote", {"service": "checkout"})  # 409, audited
    await api.client.get("/internal/ops/canary")  # 401, audited
    await asyncio.gather(*(api.get(f"/canary/svc-{i}") for i in range(20)))  # grouped writes
    await api.post("/canary/rollback", {"service": "checkout", "reason": "test"})


async def test_events_form_one_unbroken_chain(api_any_db: Harness) -> None:
    await _activity(api_any_db)

    events = await api_any_db.audit_events()

    assert len(events) == 25
    previous = GENESIS
    for event in events:
        assert event.prev_hash == previous
        assert event.hash == link(previous, event.model_dump())
        previous = event.hash


@pytest.mark.parametrize(
    "statement",
    ["UPDATE audit_event SET actor = 'someone-else'", "DELETE FROM audit_event"],
)
async def test_the_database_refuses_update_and_delete(api_any_db: Harness, statement: str) -> None:
    await _activity(api_any_db)
    before = await api_any_db.audit_events()

    with pytest.raises(sa.exc.DBAPIError, match="append-only"):
        async with api_any_db.runtime.engine.begin() as connection:
            await connection.execute(sa.text(statement))

    assert await api_any_db.audit_events() == before
