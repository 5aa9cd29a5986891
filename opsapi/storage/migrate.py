"""Run the Alembic migrations shipped inside the package."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
# Replicas started together must not migrate concurrently (PostgreSQL advisory lock key).
_MIGRATION_LOCK = 724_113_001


def alembic_config(url: str) -> Config:
    """An Alembic config pointing at the packaged migrations and `url`."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url)
    return config


async def upgrade(engine: AsyncEngine) -> None:
    """Bring the database behind `engine` to the latest revision."""
    async with engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            await connection.execute(text(f"SELECT pg_advisory_lock({_MIGRATION_LOCK})"))
        try:
            await connection.run_sync(_upgrade, str(engine.url))
            await connection.commit()
        finally:
            if connection.dialect.name == "postgresql":
                await connection.execute(text(f"SELECT pg_advisory_unlock({_MIGRATION_LOCK})"))
                await connection.commit()


def _upgrade(connection: Connection, url: str) -> None:
    config = alembic_config(url)
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
