"""Stored first responses for `Idempotency-Key` replays."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from opsapi.storage import rows
from opsapi.storage.types import UTCDateTime


class IdempotencyRecord(SQLModel, table=True):
    """The first response to a (caller, key) pair; a replay gets it back unchanged."""

    __tablename__ = "idempotency_key"
    __table_args__ = (sa.Index("ix_idempotency_created", "created_at"),)

    subject: str = Field(primary_key=True, max_length=255)
    key: str = Field(primary_key=True, max_length=255)
    method: str = Field(max_length=8)
    path: str = Field(max_length=512)
    request_hash: str = Field(max_length=64)
    status_code: int
    response_body: str = Field(sa_type=sa.Text)
    # False from the commit until the answer after the router's apply is stored: a replay in
    # between waits for it, so that it answers exactly what the first call answered.
    complete: bool = Field(default=True, sa_column_kwargs={"server_default": sa.true()})
    created_at: datetime = Field(sa_type=UTCDateTime)


async def stored(session: AsyncSession, subject: str, key: str) -> IdempotencyRecord | None:
    """The first response stored for (`subject`, `key`), if any: one plain read (on PostgreSQL
    a single statement outside any transaction)."""
    found, dialect = await rows.fetch_alone(session, _STORED, subject, key)
    return rows.record_of(IdempotencyRecord, found[0], dialect) if found else None


async def remember(session: AsyncSession, **values: Any) -> None:
    """Store a first response (`IdempotencyRecord`'s columns) in the caller's transaction; a
    concurrent first call with the same key makes one of the two fail with IntegrityError."""
    await rows.insert(session, IdempotencyRecord, [values])


async def pending(session: AsyncSession, **values: Any) -> rows.Insert:
    """`remember`'s INSERT, not yet run: to run with the writes of the change it answers."""
    return await rows.pending_insert(session, IdempotencyRecord, [values])


async def complete(
    session: AsyncSession, subject: str, key: str, *, status_code: int, response_body: str
) -> None:
    """Replace a stored response by the final one (built after the commit), marked complete:
    one statement on its own on PostgreSQL, else in the transaction the caller commits."""
    await rows.execute_alone(session, _COMPLETE, subject, key, status_code, response_body)


_STORED = "SELECT * FROM idempotency_key WHERE subject = $1 AND key = $2"
_COMPLETE = (
    "UPDATE idempotency_key SET status_code = $3, response_body = $4, complete = TRUE "
    "WHERE subject = $1 AND key = $2"
)
