"""Durations as ops engineers write them; anything else is a clear ValueError, never a crash."""

from __future__ import annotations

from datetime import timedelta

import pytest

from opsapi.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [("30s", timedelta(seconds=30)), ("1h30m", timedelta(minutes=90)), ("250ms",
     timedelta(milliseconds=250)), ("30d", timedelta(days=30))],
)  # fmt: skip
def test_durations_parse(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected
    assert parse_duration(format_duration(expected)) == expected


@pytest.mark.parametrize(
    "text", ["", "30", "m", "1h 30m", "-5s", "31d", "99999999999d", "9" * 30 + "h", "1e3s"]
)
def test_anything_else_is_a_value_error(text: str) -> None:
    # "99999999999d" is beyond timedelta's range: refused as too long, not an OverflowError
    with pytest.raises(ValueError, match=r"duration|longer than 30 days"):
        parse_duration(text)
