"""The SQL an in-process app sends to PostgreSQL, as its driver sends it.

A write sent with its transaction's COMMIT (`rows.execute_last`) goes as `EXECUTE <prepared
statement>(<literals>);` + `COMMIT`: it is logged as the prepared statement's own SQL followed
by `;\nCOMMIT` (one message), so that a test reads what the statement does."""

from __future__ import annotations

import asyncio
import contextlib
import re
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
    sent: list[str] = []
    try:
        yield statements
        await asyncio.sleep(0.05)  # asyncpg calls its query loggers soon after, not at once
    finally:
        event.remove(engine, "checkout", on_checkout)
        for driver in loggers:
            driver.remove_query_logger(log)
        sent, statements[:] = statements[:], []
    prepared = {
        entry._statement.name: query
        for driver in loggers
        for (query, *_), entry in driver._stmt_cache._entries.items()
    }
    for sql in sent:
        executed = _EXECUTE.fullmatch(sql)
        if executed is not None and executed["name"] in prepared:
            sql = prepared[executed["name"]] + ";\nCOMMIT"
        statements.append(sql)


_EXECUTE = re.compile(r"EXECUTE (?P<name>\w+)\(.*\);\nCOMMIT", re.DOTALL)
