"""The PostgreSQL pool a server process runs with keeps the connections it opened: under a
steady load of concurrent requests no connection is opened and closed per use (a connection
handshake per request, which made one status read in a hundred take 60 ms)."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from opsapi.config import Settings
from opsapi.storage.db import create_engine

# More than the old 30 kept connections, what 32 clients plus the server's own workers use.
CONCURRENT = 36


async def _burst(engine: AsyncEngine) -> None:
    async def one() -> None:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT pg_sleep(0.05)"))

    await asyncio.gather(*(one() for _ in range(CONCURRENT)))


async def test_a_steady_load_opens_no_connection_after_the_first_burst(pg_url: str) -> None:
    # Given the server's default pool
    limits = Settings(database_url=pg_url).database_limits()
    engine = create_engine(pg_url, limits=limits)
    opened: list[object] = []

    @event.listens_for(engine.sync_engine, "connect")
    def _connected(*_args: Any) -> None:
        opened.append(object())

    try:
        # When the same concurrency comes back after the first burst
        await _burst(engine)
        first = len(opened)
        for _ in range(3):
            await _burst(engine)
        # Then it is served by the connections already open
        assert first == CONCURRENT
        assert len(opened) == first
        assert engine.pool.checkedin() == CONCURRENT  # type: ignore[attr-defined]
    finally:
        await engine.dispose()


def test_the_default_pool_holds_no_more_connections_than_before() -> None:
    # max_connections planning (docs/operations.md) counts 40 per replica.
    limits = Settings().database_limits()
    assert limits.pool_size + limits.max_overflow == 40
