"""Column types that behave the same on PostgreSQL and SQLite."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python (SQLite stores it naive)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: use aware UTC datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else _in_utc(value)

    def result_converter(self) -> Callable[[datetime], datetime]:
        """`process_result_value` of a stored (non-null) value, as one plain call."""
        return _in_utc


def _in_utc(value: datetime) -> datetime:
    if value.tzinfo is UTC:
        return value  # as PostgreSQL's driver gives every timestamptz
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


JSONDocument: Any = sa.JSON().with_variant(JSONB(), "postgresql")


class StrEnumText(sa.TypeDecorator[Any]):
    """A `StrEnum` stored as its value in a VARCHAR (no database enum type to migrate)."""

    impl = sa.String(32)
    cache_ok = True

    def __init__(self, enum: type[Any], length: int = 32) -> None:
        super().__init__(length)
        self.enum = enum

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else str(self.enum(value).value)

    def process_result_value(self, value: str | None, dialect: Dialect) -> Any:
        return None if value is None else self.enum(value)

    def result_converter(self) -> Callable[[str], Any]:
        """`process_result_value` of a stored (non-null) value, as one plain call."""
        members = {member.value: member for member in self.enum}
        enum = self.enum

        def member(value: str) -> Any:
            found = members.get(value)
            return enum(value) if found is None else found  # not a member: the enum's error

        return member
