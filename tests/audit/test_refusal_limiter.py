"""Refusals past a per-caller rate are counted into one aggregated event per caller and
minute instead of one row each: bounded growth, and no refusal silently dropped."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from opsapi.audit.limiter import RefusalLimiter
from opsapi.audit.models import Outcome, Source
from opsapi.audit.service import event_row
from opsapi.audit.writer import AuditWriter
from tests.audit.test_verify import verify
from tests.support.app import Harness

T0 = datetime(2026, 11, 22, 12, 0, 10, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# (calls as (caller, seconds after T0), expected allow() answers), with per_minute=2.
LIMITS = [
    pytest.param([("a", 0), ("a", 1), ("a", 2)], [True, True, False], id="third-in-a-minute"),
    pytest.param([("a", 0), ("a", 1), ("b", 2), ("b", 3)], [True] * 4, id="per-caller"),
    pytest.param([("a", 0), ("a", 1), ("a", 2), ("a", 50)], [True, True, False, True],
                 id="next-minute-starts-afresh"),  # T0 is 12:00:10; +50 s is 12:01:00
    pytest.param([("a", 49), ("a", 51), ("a", 52), ("a", 49.9)], [True, True, True, False],
                 id="late-request-counts-in-the-newer-minute"),
]  # fmt: skip


@pytest.mark.parametrize(("calls", "expected"), LIMITS)
def test_refusal_limiter_admits_per_caller_and_minute(
    calls: list[tuple[str, float]], expected: list[bool]
) -> None:
    limiter = RefusalLimiter(per_minute=2)
    assert [limiter.allow(caller, at(s)) for caller, s in calls] == expected


def refusal(caller: str, seconds: float, **fields: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "at": at(seconds), "actor": caller, "roles": ["viewer"], "source": Source.API,
        "action": "execute", "outcome": Outcome.DENIED, "service": "checkout",
        "client_address": "192.0.2.1", "request_id": f"r-{seconds}",
        "details": {"status": 403, "detail": "no"}, **fields,
    }  # fmt: skip
    return event_row(**values)


def test_refusals_over_the_limit_become_one_aggregated_event_per_caller_and_minute() -> None:
    limiter = RefusalLimiter(per_minute=2)
    for second in range(10):
        limiter.allow("mallory", at(second), refusal("mallory", second))
    limiter.allow("mallory", at(11), refusal("mallory", 11, outcome=Outcome.ERROR,
                                               details={"status": 422}))  # fmt: skip

    # nothing is due while the minute lasts
    assert limiter.due(at(40)) == []
    assert limiter.pending() == 9

    # then once it is over, one event says how many refusals it stands for, and which
    [aggregate] = limiter.due(at(50))
    assert (aggregate["actor"], aggregate["action"], aggregate["outcome"]) == (
        "mallory", "audit.refusals", "denied")  # fmt: skip
    assert aggregate["at"] == at(11)
    details = aggregate["details"]
    assert details["count"] == 9
    assert details["limit_per_minute"] == 2
    assert details["window"] == {"start": "2026-11-22T12:00:00.000000Z",
                                 "end": "2026-11-22T12:01:00.000000Z"}  # fmt: skip
    assert (details["first_at"], details["last_at"]) == (
        "2026-11-22T12:00:12.000000Z", "2026-11-22T12:00:21.000000Z")  # fmt: skip
    assert details["statuses"] == {"403": 8, "422": 1}
    assert details["outcomes"] == {"denied": 8, "error": 1}
    assert details["services"] == {"checkout": 9}
    assert details["request_ids"] == {"first": "r-2", "last": "r-11"}
    assert limiter.pending() == 0
    assert limiter.due(at(200)) == []


def test_callers_beyond_the_tracked_number_share_one_aggregate() -> None:
    # given a limiter tracking at most 3 callers, and 10 callers refused 3 times each
    limiter = RefusalLimiter(per_minute=1, max_callers=3)
    admitted = 0
    for caller in range(10):
        for second in range(3):
            admitted += limiter.allow(f"c{caller}", at(second), refusal(f"c{caller}", second))

    # then every refusal is accounted for: admitted, or counted in an aggregate
    aggregates = limiter.drain()
    assert admitted + sum(a["details"]["count"] for a in aggregates) == 30
    shared = [a for a in aggregates if a["details"]["caller"] == "*"]
    assert len(shared) == 1
    assert shared[0]["actor"] == "(other callers)"
    assert len(aggregates) <= 3 + 1


def test_breakdowns_are_bounded() -> None:
    limiter = RefusalLimiter(per_minute=0)
    for i in range(500):
        limiter.allow("k", at(0), refusal("k", 0, client_address=f"10.0.{i // 250}.{i % 250}"))
    [aggregate] = limiter.drain()
    addresses = aggregate["details"]["client_addresses"]
    assert len(addresses) == 21
    assert addresses["(other)"] == 480
    assert sum(addresses.values()) == 500


async def test_the_writer_audits_refusals_under_the_limit_and_aggregates_the_rest(
    api_any_db: Harness,
) -> None:
    # given a writer with a limit of 5 refusals per caller and minute, on the app's clock
    api = api_any_db
    writer = AuditWriter(api.runtime.engine, refusals=RefusalLimiter(per_minute=5),
                         clock=api.clock, metrics=api.runtime.metrics)  # fmt: skip
    writer.start()
    try:
        # when one caller is refused 50 times within a minute, and another twice
        now = api.clock()
        written = []
        for i in range(50):
            row = refusal("mallory", 0, at=now + timedelta(milliseconds=i), request_id=f"m{i}")
            written.append(await writer.write_refusal("mallory", row))
        for _ in range(2):
            written.append(await writer.write_refusal("alice", refusal("alice", 0, at=now)))

        # then only 5 + 2 rows are written while the minute lasts
        assert written.count(True) == 7
        assert await writer.flush_refusals() == 0
        assert len(await api.audit_events()) == 7

        # and once it is over, one aggregated event accounts for the other 45
        api.clock.advance(minutes=1)
        assert await writer.flush_refusals() == 1
    finally:
        await writer.stop()
    [aggregate] = await api.audit_events(action="audit.refusals")
    assert (aggregate.actor, aggregate.details["count"]) == ("mallory", 45)
    assert aggregate.details["request_ids"] == {"first": "m5", "last": "m49"}
    assert (await verify(api))["intact"] is True


async def test_aggregates_of_the_current_minute_are_written_at_shutdown(api: Harness) -> None:
    writer = AuditWriter(api.runtime.engine, refusals=RefusalLimiter(per_minute=1),
                         clock=api.clock)  # fmt: skip
    writer.start()
    for _ in range(4):
        await writer.write_refusal("mallory", refusal("mallory", 0, at=api.clock()))

    await writer.stop()

    [aggregate] = await api.audit_events(action="audit.refusals")
    assert aggregate.details["count"] == 3
    assert len(await api.audit_events()) == 2
