"""Timestamps in answers: `iso` writes what `isoformat` writes, with Z for UTC, whatever the
way it takes (orjson for UTC timestamps, the standard library for every other offset)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from opsapi.http.params import iso


def _expected(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


TABLE = [
    datetime(2026, 12, 1, 22, 33, 38, 123456, tzinfo=UTC),
    datetime(2026, 12, 1, 22, 33, 38, tzinfo=UTC),  # no microseconds: none written
    datetime(2026, 12, 1, 22, 33, 38, 5, tzinfo=UTC),
    datetime(1, 1, 1, tzinfo=UTC),
    datetime(999, 1, 1, tzinfo=UTC),
    datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(2026, 1, 1, tzinfo=timezone(timedelta(0))),  # offset zero, not the UTC object
    datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=-5))),
    datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=5, seconds=15))),  # orjson drops :15
    datetime(2026, 1, 1, 1, 2, 3, 4),  # naive
]


def test_iso_writes_what_isoformat_writes() -> None:
    assert [iso(value) for value in TABLE] == [_expected(value) for value in TABLE]
    assert iso(None) is None


@given(st.datetimes(timezones=st.just(UTC)))
def test_any_utc_timestamp_is_written_as_isoformat_writes_it(value: datetime) -> None:
    assert iso(value) == _expected(value)
