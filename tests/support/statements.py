"""The SQL an in-process app sends to PostgreSQL, as its driver sends it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import event

from tests.support.app import Harness


@contextlib.asynccontextmanager
async def logged_statements(api: Harness) -> AsyncIterator[list[str]]:
    """The SQL of every statement the app's connections send while the block runs."""
    statements: list[str] = []
    loggers: list[Any] = []

    def log(query: Any) -> None:
        statements.append(query.query)

    def on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        driver = dbapi_connection.driver_connection
        if driver not in loggers:
            driver.add_query_logger(log)
            loggers.append(driver)

    engine = api.runtime.engine.sync_engine
    event.listen(engine, "checkout", on_checkout)
    try:
        yield statements
        await asyncio.sleep(0.05)  # asyncpg calls its query loggers soon after, not at once
    finally:
        event.remove(engine, "checkout", on_checkout)
        for driver in loggers:
            driver.remove_query_logger(log)
