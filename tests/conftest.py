"""Shared fixtures: real PostgreSQL and SQLite databases, the app harness."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from opsapi.storage.db import SessionFactory, create_engine, session_factory
from opsapi.storage.migrate import upgrade
from tests.support.app import Harness, running_app
from tests.support.databases import (
    PG_ADMIN_DSN,
    TABLES,
    create_pg_database,
    drop_pg_database,
    in_ci,
)
from tests.support.metrics_app import MetricsApp
from tests.support.prometheus import PrometheusServer, require_prometheus, running_prometheus


@pytest.fixture(scope="session")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys") / "signing-key.json"


@pytest.fixture(scope="session")
async def pg_database() -> AsyncIterator[tuple[str, str]]:
    """One migrated PostgreSQL database for the whole session."""
    name, url = await create_pg_database()
    engine = create_engine(url)
    await upgrade(engine)
    await engine.dispose()
    yield name, url
    await drop_pg_database(name)


@pytest.fixture
async def pg_url(pg_database: tuple[str, str]) -> str:
    """The session's PostgreSQL database, emptied before the test."""
    name, url = pg_database
    dsn = PG_ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"
    connection = await asyncpg.connect(dsn)
    try:
        # The audit table refuses DELETE and TRUNCATE by trigger (and foreign keys are
        # triggers): tests may empty the tables with triggers off.
        await connection.execute("SET session_replication_role = replica")
        sequences = [
            row["sequencename"]
            for row in await connection.fetch(
                "SELECT sequencename FROM pg_sequences WHERE schemaname = 'public'"
            )
        ]
        # A module-scoped server (opsctl, console) keeps its controller running between tests;
        # its row locks can meet ours in a deadlock, which PostgreSQL breaks by failing one
        # side: when it fails ours, empty the tables again.
        for attempt in range(5):
            try:
                await _empty(connection, sequences)
                break
            except asyncpg.exceptions.DeadlockDetectedError:
                if attempt == 4:
                    raise
    finally:
        await connection.close()
    return url


# Rows past which a test's tables are truncated rather than deleted from (dead rows would
# slow the next tests' scans until vacuumed).
_MANY_ROWS = 5_000


async def _empty(connection: asyncpg.Connection, sequences: list[str]) -> None:
    """Every table emptied and every id sequence restarted, in one transaction. DELETE, not
    TRUNCATE: a few rows are deleted in about 15 ms, where TRUNCATE took 80-180 ms a test
    (new files for every table, each synced)."""
    async with connection.transaction():
        deleted = 0
        for table in TABLES:
            status = await connection.execute(f"DELETE FROM {table}")
            deleted += int(status.split()[-1])
        if deleted > _MANY_ROWS:
            await connection.execute(f"TRUNCATE {', '.join(TABLES)}")
        for sequence in sequences:
            await connection.execute(f"ALTER SEQUENCE {sequence} RESTART")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'opsapi.db'}"


@pytest.fixture(params=["postgres", "sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Both databases: the test runs once on each."""
    fixture = "pg_url" if request.param == "postgres" else "sqlite_url"
    return str(request.getfixturevalue(fixture))


@pytest.fixture
async def sessions(db_url: str) -> AsyncIterator[SessionFactory]:
    """Sessions on a migrated database (both kinds)."""
    engine = create_engine(db_url)
    await upgrade(engine)
    yield session_factory(engine)
    await engine.dispose()


@pytest.fixture
async def api(pg_url: str, key_file: Path) -> AsyncIterator[Harness]:
    """The application on PostgreSQL with a manual clock and no background controller."""
    async with running_app(pg_url, key_file) as harness:
        yield harness


@pytest.fixture
async def api_any_db(db_url: str, key_file: Path) -> AsyncIterator[Harness]:
    """The application on PostgreSQL and on SQLite."""
    async with running_app(db_url, key_file) as harness:
        yield harness


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    """In CI a skipped test is a failure: real components must be there, never skipped."""
    report = yield
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which must run every test: {report.longrepr}"
    return report


@pytest.fixture(scope="session")
def metrics_app() -> Iterator[MetricsApp]:
    """A small app exposing the documented metric conventions; each test owns its services."""
    with MetricsApp() as app:
        yield app


@pytest.fixture(scope="session")
def prometheus(
    metrics_app: MetricsApp, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrometheusServer]:
    """A real Prometheus scraping `metrics_app` every second, shared by the session."""
    require_prometheus()
    with running_prometheus([metrics_app.target], tmp_path_factory.mktemp("prometheus")) as server:
        yield server
