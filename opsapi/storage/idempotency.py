"""Stored first responses for `Idempotency-Key` replays."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

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
