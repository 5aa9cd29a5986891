"""Database engine and session factory for PostgreSQL (asyncpg) and SQLite (aiosqlite)."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import event, text
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlmodel.ext.asyncio.session import AsyncSession

SessionFactory = async_sessionmaker[AsyncSession]

# SQLSTATEs that say the database could not do the work, as opposed to refusing it
# (constraint violations, serialisation conflicts): lock_not_available, query_canceled
# (statement_timeout), idle_in_transaction_session_timeout, too_many_connections,
# cannot_connect_now, admin/crash shutdown, and the connection exception class.
_UNAVAILABLE_STATES = ("55P03", "57014", "25P03", "53300", "57P03", "57P01", "57P02")
_UNAVAILABLE_CLASSES = ("08", "53", "58")


@dataclass(frozen=True)
class DatabaseLimits:
    """How long database work may wait; every bound is in seconds (0: unbounded)."""

    pool_size: int = 40
    max_overflow: int = 0
    pool_timeout: float = 10.0
    connect_timeout: float = 5.0
    statement_timeout: float = 15.0
    lock_timeout: float = 10.0
    idle_in_transaction_timeout: float = 60.0

    def connect_args(self) -> dict[str, Any]:
        """asyncpg's connect arguments: client-side bounds and the server's own timeouts."""
        return {
            "timeout": self.connect_timeout,
            # The server cancels first (a clean error, the connection stays usable); the
            # client bound only fires when the server itself stopped answering.
            "command_timeout": self.statement_timeout + 1 if self.statement_timeout else None,
            "server_settings": {
                "statement_timeout": _millis(self.statement_timeout),
                "lock_timeout": _millis(self.lock_timeout),
                "idle_in_transaction_session_timeout": _millis(self.idle_in_transaction_timeout),
            },
        }


def _millis(seconds: float) -> str:
    return str(max(1, round(seconds * 1000))) if seconds > 0 else "0"


class DatabaseHealth:
    """Recent outcomes of database work: readiness fails while it keeps failing.

    Not ready once `threshold` operations failed on an unavailable database within `window`
    seconds with no success since the last failure; a quiet window makes it ready again, so a
    replica taken out of the load balancer is retried rather than kept out for good.
    """

    def __init__(
        self,
        *,
        threshold: int = 3,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.window = window
        self._clock = clock
        self._failures: list[float] = []

    def failed(self) -> None:
        """Record database work that failed because the database was unavailable."""
        now = self._clock()
        self._failures = [at for at in self._failures if now - at < self.window]
        self._failures.append(now)

    def succeeded(self) -> None:
        """Record database work that completed."""
        if self._failures:
            self._failures = []

    def failing(self) -> bool:
        """Whether recent database work has been failing (see the class docstring)."""
        now = self._clock()
        recent = [at for at in self._failures if now - at < self.window]
        return len(recent) >= self.threshold


_probes: set[asyncio.Task[None]] = set()


async def answers(engine: AsyncEngine, *, within: float) -> bool:
    """Whether the database answers `SELECT 1` within `within` seconds, checkout included.

    Bounded end to end: a probe still waiting then is abandoned (it ends at its own connect or
    statement bound), because cancelling it would wait for its connection's cleanup, which a
    database that stopped answering never finishes.
    """
    probe = asyncio.create_task(_select_one(engine))
    done, _ = await asyncio.wait({probe}, timeout=within)
    if probe in done:
        return probe.exception() is None
    _probes.add(probe)
    probe.add_done_callback(_forget)
    probe.cancel()
    return False


async def _select_one(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))


def _forget(probe: asyncio.Task[None]) -> None:
    _probes.discard(probe)
    if not probe.cancelled():
        probe.exception()


def is_broken_connection(error: BaseException | None) -> bool:
    """Whether `error` (or its cause) says the connection is stuck mid-operation: asyncpg's
    "another operation is in progress", left behind by an operation cut off while the database
    went away. Such a connection can never be used again."""
    while error is not None:
        kind = type(error).__name__
        if kind in ("InternalClientError", "InterfaceError") and "another operation" in str(error):
            return True
        error = error.__cause__
    return False


def is_unavailable(error: BaseException) -> bool:
    """Whether `error` means the database could not do the work (timeout, lost, overloaded)."""
    if isinstance(error, PoolTimeout | TimeoutError | ConnectionError | OSError):
        return True
    if is_broken_connection(error):
        return True
    if isinstance(error, DBAPIError):
        if error.connection_invalidated:
            return True
        original = error.orig
        state = getattr(original, "sqlstate", None) or getattr(original, "pgcode", None)
        if isinstance(state, str):
            return state in _UNAVAILABLE_STATES or state[:2] in _UNAVAILABLE_CLASSES
        cause = original.__cause__ if original is not None else None
        return cause is not None and is_unavailable(cause)
    return False


def create_engine(
    url: str,
    *,
    pool_size: int = 20,
    limits: DatabaseLimits | None = None,
    health: DatabaseHealth | None = None,
) -> AsyncEngine:
    """An async engine; on SQLite every transaction takes the write lock up front.

    `limits` bounds every wait on PostgreSQL (without it nothing is bounded: migrations wait
    for each other's lock); `health` is told the outcome of every statement.
    """
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30})
        _serialize_sqlite(engine)
    elif limits is None:
        # Overflow connections are closed on return; a pool big enough for the usual
        # concurrency avoids reconnecting under load (each connect is several round trips).
        engine = create_async_engine(
            url,
            json_serializer=dump_json,
            json_deserializer=load_json,
            pool_size=pool_size,
            max_overflow=pool_size // 2,
            pool_recycle=300,
        )
    else:
        # No pre-ping: it costs a round trip on every checkout. A connection found dead is
        # invalidated with every older one in the pool, so a database restart fails only the
        # requests in flight at that moment.
        engine = create_async_engine(
            url,
            json_serializer=dump_json,
            json_deserializer=load_json,
            pool_size=limits.pool_size,
            max_overflow=limits.max_overflow,
            pool_timeout=limits.pool_timeout,
            pool_recycle=300,
            connect_args=limits.connect_args(),
        )
    if not url.startswith("sqlite"):
        _discard_broken(engine)
    if health is not None:
        _track(engine, health)
    return engine


def _discard_broken(engine: AsyncEngine) -> None:
    # Counted as a disconnect, a stuck connection is closed instead of going back to the pool,
    # where every later checkout of it would fail the same way.
    @event.listens_for(engine.sync_engine, "handle_error")
    def _broken(context: ExceptionContext) -> None:
        if is_broken_connection(context.original_exception):
            context.is_disconnect = True


def _track(engine: AsyncEngine, health: DatabaseHealth) -> None:
    @event.listens_for(engine.sync_engine, "handle_error")
    def _failed(context: ExceptionContext) -> None:
        if is_unavailable(context.original_exception) or context.is_disconnect:
            health.failed()

    @event.listens_for(engine.sync_engine, "after_cursor_execute")
    def _succeeded(*_args: Any) -> None:
        health.succeeded()


def _serialize_sqlite(engine: AsyncEngine) -> None:
    # SQLite upgrades a read lock to a write lock mid-transaction and fails under concurrency;
    # BEGIN IMMEDIATE makes each transaction wait its turn instead (embedded mode, one process).
    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout = 30000")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def dump_json(value: Any) -> str:
    """A JSON column's text: orjson's (several times faster), or the standard library's for
    what orjson would write differently or refuses (integers past 64 bits, lone surrogates,
    anything that is not plain JSON data: enums, dates, dataclasses, subclasses)."""
    try:
        text = orjson.dumps(value, option=_PLAIN_JSON_ONLY)
    except TypeError:
        return json.dumps(value)
    if b"null" in text and _holds_non_finite(value):
        # orjson writes NaN and the infinities as null; the standard library writes them as
        # text PostgreSQL refuses, and an audit event's hash covers what was meant, not null.
        return json.dumps(value)
    return text.decode()


def _holds_non_finite(value: Any) -> bool:
    # Only what orjson wrote without refusing reaches here: plain JSON data.
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_holds_non_finite(item) for item in value.values())
    if isinstance(value, list | tuple):
        return any(_holds_non_finite(item) for item in value)
    return False


def load_json(text: str, fallback: Callable[[str], Any] = json.loads) -> Any:
    """A JSON document (a JSON column's value, a request body): read by orjson (several times
    faster), or by `fallback` (the standard library) wherever orjson would read something else
    or refuses (a run of 19 or more digits: an integer past 64 bits, which orjson reads as a
    float; NaN, a number past a double's range, a lone surrogate, nesting past its limit, and
    anything that is not JSON, which `fallback` then refuses in its own words)."""
    if _LONG_DIGITS.search(text) is None:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return fallback(text)


# 19 digits may already be past a signed 64-bit integer (2**63 has 19).
_LONG_DIGITS = re.compile(r"\d{19}")


_PLAIN_JSON_ONLY = (
    orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
    | orjson.OPT_NON_STR_KEYS
)


def session_factory(engine: AsyncEngine) -> SessionFactory:
    """Sessions that keep loaded objects usable after commit."""
    # rows uses this module's failure policy
    from opsapi.storage.rows import ClosingSession, Session

    return async_sessionmaker(
        engine, class_=ClosingSession, sync_session_class=Session, expire_on_commit=False
    )
