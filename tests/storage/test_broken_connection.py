"""A connection asyncpg reports stuck mid-operation ("another operation is in progress", seen
when PostgreSQL restarts under load) is closed, never handed out again, and counts as the
database being unavailable (503 with Retry-After, one log line), not as a server error."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from opsapi.storage.db import create_engine, is_unavailable

STUCK = "cannot switch to state 15; another operation (2) is in progress"


async def _backend_after_a_stuck_statement(engine: AsyncEngine) -> tuple[int, int, Exception]:
    """The backend pid before and after one statement fails as a stuck connection does."""
    async with engine.connect() as connection:
        before = await connection.scalar(text("SELECT pg_backend_pid()"))
    stuck = {"once": True}

    # The fault is injected where asyncpg raises it: while SQLAlchemy runs the statement.
    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def _stuck(*_args: Any) -> None:
        if stuck.pop("once", False):
            raise asyncpg.exceptions.InternalClientError(STUCK)

    with pytest.raises(asyncpg.exceptions.InternalClientError) as raised:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
    async with engine.connect() as connection:
        after = await connection.scalar(text("SELECT pg_backend_pid()"))
    return int(before), int(after), raised.value


async def test_a_stuck_connection_is_closed_not_returned_to_the_pool(pg_url: str) -> None:
    engine = create_engine(pg_url, pool_size=1)
    try:
        before, after, error = await _backend_after_a_stuck_statement(engine)
    finally:
        await engine.dispose()
    assert before != after  # a new connection: the stuck one was discarded
    assert is_unavailable(error)


async def test_without_the_guard_the_pool_would_hand_it_out_again(pg_url: str) -> None:
    # (what the guard prevents: a bare engine puts the same connection back in the pool)
    engine = create_async_engine(pg_url, pool_size=1)
    try:
        before, after, _ = await _backend_after_a_stuck_statement(engine)
    finally:
        await engine.dispose()
    assert before == after


def test_other_client_errors_are_not_taken_for_an_outage() -> None:
    assert not is_unavailable(asyncpg.exceptions.InternalClientError("a bug of ours"))
    assert not is_unavailable(ValueError("another operation is in progress"))
