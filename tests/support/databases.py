"""Real databases for tests: a fresh PostgreSQL database per test session, SQLite files."""

from __future__ import annotations

import os
import uuid

import asyncpg
import pytest

PG_ADMIN_DSN = os.environ.get("OPSAPI_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
TABLES = (
    "audit_event",
    "rollout",
    "service",
    "idempotency_key",
    "gate_evaluation",
    "outbox",
    "pagerduty_event",
    "rejected_version",
    "incident",
    "freeze_window",
    "audit_checkpoint",
)


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


def unavailable(what: str) -> None:
    """Skip locally, fail in CI: CI must never silently skip a real-component test."""
    if in_ci():
        pytest.fail(f"{what} is required in CI but unavailable")
    pytest.skip(f"{what} unavailable")


async def create_pg_database() -> tuple[str, str]:
    """Create an empty database; return (its name, its SQLAlchemy URL)."""
    name = f"opsapi_test_{uuid.uuid4().hex[:10]}"
    try:
        connection = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as error:
        unavailable(f"PostgreSQL ({error.__class__.__name__})")
        raise
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    return name, f"{base}/{name}"


async def drop_pg_database(name: str) -> None:
    connection = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()
