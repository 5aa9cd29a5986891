"""Database engine and session factory for PostgreSQL (asyncpg) and SQLite (aiosqlite)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlmodel.ext.asyncio.session import AsyncSession

SessionFactory = async_sessionmaker[AsyncSession]


def create_engine(url: str, *, pool_size: int = 20) -> AsyncEngine:
    """An async engine; on SQLite every transaction takes the write lock up front."""
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30})
        _serialize_sqlite(engine)
        return engine
    # Overflow connections are closed on return; a pool big enough for the usual concurrency
    # avoids reconnecting under load (each connect is several round trips).
    return create_async_engine(
        url, pool_size=pool_size, max_overflow=pool_size // 2, pool_recycle=300
    )


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


def session_factory(engine: AsyncEngine) -> SessionFactory:
    """Sessions that keep loaded objects usable after commit."""
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)
