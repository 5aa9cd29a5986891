"""Freeze windows, judged by a pure function at a given instant: absolute and recurring windows,
time zones (daylight saving included), which services they cover."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from opsapi.canary.freezes import FreezeWindow, check_window, holds_for
from opsapi.canary.machine import HoldKind

FRIDAY_EVENING = FreezeWindow(
    name="weekend", services=("*",), reason="no weekend releases",
    cron="0 17 * * FRI", duration=timedelta(hours=64), timezone="Europe/Berlin",
)  # fmt: skip
NEW_YEAR = FreezeWindow(
    name="new-year", services=("checkout", "payments"), reason="peak",
    starts_at=datetime(2026, 12, 31, 12, tzinfo=UTC), ends_at=datetime(2027, 1, 2, tzinfo=UTC),
)  # fmt: skip
NIGHTLY_NY = FreezeWindow(
    name="nightly", services=("checkout",), reason="batch jobs",
    cron="0 1 * * *", duration=timedelta(hours=2), timezone="America/New_York",
)  # fmt: skip


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("window", "service", "now", "until"),
    [
        # Friday 17:00 in Berlin is 16:00 UTC in winter (CET, +1)
        (FRIDAY_EVENING, "any", utc(2026, 11, 27, 15, 59), None),
        (FRIDAY_EVENING, "any", utc(2026, 11, 27, 16, 0), utc(2026, 11, 30, 8, 0)),
        (FRIDAY_EVENING, "any", utc(2026, 11, 29, 23, 0), utc(2026, 11, 30, 8, 0)),
        (FRIDAY_EVENING, "any", utc(2026, 11, 30, 8, 0), None),  # the end is not inside
        # ... and 15:00 UTC in summer (CEST, +2)
        (FRIDAY_EVENING, "any", utc(2026, 7, 3, 15, 30), utc(2026, 7, 6, 7, 0)),
        (FRIDAY_EVENING, "any", utc(2026, 7, 3, 14, 59), None),
        # an absolute window, for the services it names only
        (NEW_YEAR, "checkout", utc(2026, 12, 31, 11, 59), None),
        (NEW_YEAR, "checkout", utc(2026, 12, 31, 12, 0), utc(2027, 1, 2)),
        (NEW_YEAR, "payments", utc(2027, 1, 1, 23, 0), utc(2027, 1, 2)),
        (NEW_YEAR, "search", utc(2027, 1, 1, 0, 0), None),
        # 01:00 New York: 06:00 UTC in winter (EST), 05:00 UTC in summer (EDT)
        (NIGHTLY_NY, "checkout", utc(2026, 1, 15, 6, 30), utc(2026, 1, 15, 8, 0)),
        (NIGHTLY_NY, "checkout", utc(2026, 1, 15, 5, 30), None),
        (NIGHTLY_NY, "checkout", utc(2026, 7, 15, 5, 30), utc(2026, 7, 15, 7, 0)),
        (NIGHTLY_NY, "payments", utc(2026, 7, 15, 5, 30), None),
    ],
)
def test_which_windows_hold_a_service(
    window: FreezeWindow, service: str, now: datetime, until: datetime | None
) -> None:
    holds = holds_for(service, [window], now)
    if until is None:
        assert holds == []
        return
    [hold] = holds
    assert hold.kind == HoldKind.FROZEN
    assert hold.until == until
    assert window.name in hold.detail
    assert window.reason in hold.detail


def test_each_holding_window_is_a_hold() -> None:
    now = utc(2027, 1, 1, 17, 0)  # a Friday inside both the weekend and the new-year windows
    assert len(holds_for("checkout", [FRIDAY_EVENING, NEW_YEAR, NIGHTLY_NY], now)) == 2


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"cron": "0 17 * * FRI", "duration": timedelta(hours=1), "timezone": "Mars/Olympus"},
         "timezone"),
        ({"cron": "every friday", "duration": timedelta(hours=1)}, "cron"),
        ({"cron": "0 17 * * FRI", "duration": timedelta(0)}, "duration"),
        ({"starts_at": utc(2026, 1, 2), "ends_at": utc(2026, 1, 1)}, "ends_at"),
        ({"starts_at": utc(2026, 1, 1)}, "ends_at"),
        ({}, "either"),
        ({"starts_at": utc(2026, 1, 1), "ends_at": utc(2026, 1, 2), "cron": "* * * * *",
          "duration": timedelta(hours=1)}, "either"),
    ],
)  # fmt: skip
def test_unusable_windows_are_described(fields: dict[str, object], problem: str) -> None:
    arguments: dict[str, object] = {"starts_at": None, "ends_at": None, "cron": None,
                                    "duration": None, "timezone": "UTC", **fields}  # fmt: skip
    problems = check_window(**arguments)  # type: ignore[arg-type]
    assert any(problem in text for text in problems), problems


def test_a_usable_window_has_no_problems() -> None:
    assert check_window(starts_at=None, ends_at=None, cron="0 17 * * FRI",
                        duration=timedelta(hours=64), timezone="Europe/Berlin") == []  # fmt: skip
