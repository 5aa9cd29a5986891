"""Our column types convert a stored value the same way through the ORM and through the plain
reads' one-call converters (`result_converter`, used by `opsapi.storage.rows`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy.dialects import postgresql, sqlite

from opsapi.canary.machine import State
from opsapi.storage.types import StrEnumText, UTCDateTime

INSTANT = datetime(2026, 12, 1, 18, 0, 0, 123456, tzinfo=UTC)


@pytest.mark.parametrize(
    "stored",
    [
        INSTANT,  # what asyncpg gives for every timestamptz
        INSTANT.replace(tzinfo=None),  # what SQLite gives
        INSTANT.astimezone(timezone(timedelta(hours=-5))),  # another offset, same instant
        INSTANT.replace(tzinfo=timezone(timedelta(0))),  # UTC, but not the same tzinfo object
        datetime.min.replace(tzinfo=UTC),
    ],
    ids=["utc", "naive", "offset", "zero-offset", "min"],
)
@pytest.mark.parametrize("dialect", [postgresql.asyncpg.dialect(), sqlite.dialect()])
def test_a_timestamp_reads_aware_utc_either_way(stored: datetime, dialect: Any) -> None:
    column = UTCDateTime()
    by_orm = column.process_result_value(stored, dialect)
    by_plain_read = column.result_converter()(stored)
    assert by_plain_read == by_orm
    assert by_plain_read.tzinfo is UTC
    assert by_plain_read.utcoffset() == timedelta(0)


@pytest.mark.parametrize("stored", [state.value for state in State])
def test_a_state_reads_as_its_member_either_way(stored: str) -> None:
    column = StrEnumText(State)
    by_orm = column.process_result_value(stored, postgresql.asyncpg.dialect())
    assert column.result_converter()(stored) is by_orm
    assert by_orm is State(stored)


def test_a_value_no_state_has_fails_either_way() -> None:
    column = StrEnumText(State)
    with pytest.raises(ValueError, match="not a valid State"):
        column.process_result_value("exploded", sqlite.dialect())
    with pytest.raises(ValueError, match="not a valid State"):
        column.result_converter()("exploded")
