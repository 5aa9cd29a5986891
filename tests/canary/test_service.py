"""The controller's claim (`service.claim_due`): what is due, leased, and never taken twice."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from opsapi.canary import service
from opsapi.canary.machine import State
from opsapi.canary.models import RolloutRecord, ServiceRecord
from opsapi.canary.policy import Policy
from opsapi.storage import rows
from opsapi.storage.db import SessionFactory

NOW = datetime(2026, 11, 30, 6, 0, tzinfo=UTC)
LEASE_UNTIL = NOW + timedelta(seconds=30)


async def given_rollouts(
    sessions: SessionFactory, due: dict[str, tuple[State, int | None]]
) -> None:
    """One rollout per service: its state, and how many seconds ago it was due (None: never)."""
    async with sessions() as session, session.begin():
        for name, (state, seconds_ago) in due.items():
            rollout = RolloutRecord(
                service=name, state=state, canary_version="v2", steps=[{"weight": 10}],
                step_index=0, desired_weight=10, step_started_at=NOW, router={"name": "pull"},
                triggered_by="user", created_by="alice", created_at=NOW, updated_at=NOW,
                next_evaluation_at=None if seconds_ago is None
                else NOW - timedelta(seconds=seconds_ago),
            )  # fmt: skip
            await rows.save(session, rollout)


async def claim(sessions: SessionFactory, limit: int) -> dict[str, float]:
    async with sessions() as session, session.begin():
        claimed = await service.claim_due(
            now=NOW, limit=limit, lease_until=LEASE_UNTIL, session=session
        )
    return {record.service: (NOW - due_at).total_seconds() for record, due_at in claimed}


async def test_the_most_overdue_open_rollouts_are_claimed_and_leased(
    sessions: SessionFactory,
) -> None:
    # given open rollouts due 1, 5 and 9 s ago, one due later, one never, and closed ones
    await given_rollouts(
        sessions,
        {
            "a": (State.PROGRESSING, 1), "b": (State.PAUSED, 5), "c": (State.PROGRESSING, 9),
            "later": (State.PROGRESSING, -10), "never": (State.PROGRESSING, None),
            "done": (State.SUCCEEDED, 20), "undone": (State.ROLLED_BACK, 30),
        },
    )  # fmt: skip
    # when two are claimed, then the rest
    first = await claim(sessions, limit=2)
    second = await claim(sessions, limit=2)
    # then the two most overdue come first, each with how long it was overdue, and the lease
    # keeps them from the next claim, which gets the last one due
    assert first == {"c": 9.0, "b": 5.0}
    assert second == {"a": 1.0}
    assert await claim(sessions, limit=2) == {}
    async with sessions() as session:
        leased = {
            record.service: record.next_evaluation_at
            for record in await rows.fetch_records(
                session, RolloutRecord, "SELECT * FROM rollout WHERE service IN ('a', 'b', 'c')"
            )
        }
    assert leased == dict.fromkeys("abc", LEASE_UNTIL)


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_a_claim_skips_rollouts_another_replica_holds(sessions: SessionFactory) -> None:
    # given three due rollouts, and a replica whose claim of two is not yet committed
    await given_rollouts(
        sessions,
        {"a": (State.PROGRESSING, 1), "b": (State.PROGRESSING, 2), "c": (State.PROGRESSING, 3)},
    )
    async with sessions() as holder, holder.begin():
        held = await service.claim_due(now=NOW, limit=2, lease_until=LEASE_UNTIL, session=holder)
        # when another replica claims meanwhile
        other = await claim(sessions, limit=3)
    # then it gets only the one not held, without waiting for the first to commit
    assert sorted(record.service for record, _ in held) == ["b", "c"]
    assert other == {"a": 1.0}


# --- stored policies (`service.policy_of`) -------------------------------------------------


def _row(policy: dict[str, object]) -> ServiceRecord:
    return ServiceRecord(name="checkout", policy=policy, updated_at=NOW, updated_by="admin")


def test_a_stored_policy_is_validated_once_per_document_and_a_changed_one_read_anew() -> None:
    default = Policy()
    stored = {"steps": [{"weight": 50, "wait": "5m"}, {"weight": 100, "wait": "1h"}]}
    # given the same document read twice (keys in another order the second time)
    document = {**stored, "auto_promote": True}
    first = service.policy_of(_row(document), default)
    again = service.policy_of(_row(dict(reversed(list(document.items())))), default)
    # then it was validated once: the same policy serves both reads
    assert again is first
    assert [step.weight for step in first.steps] == [50, 100]
    assert first.auto_promote is True
    # when the document changes, the next read gives the new policy
    changed = service.policy_of(_row({"steps": [{"weight": 100, "wait": "2h"}]}), default)
    assert [step.weight for step in changed.steps] == [100]
    # a service without a policy of its own gets the default
    assert service.policy_of(_row({}), default) is default
    assert service.policy_of(None, default) is default


def test_a_stored_policy_orjson_cannot_write_or_that_no_longer_validates_is_still_read() -> None:
    default = Policy()
    # an integer past 64 bits (orjson refuses it): validated without the cache, as before
    huge = {"steps": [{"weight": 100, "wait": "1h"}], "router": {"name": "pull", "n": 2**70}}
    assert service.policy_of(_row(huge), default).router.model_extra == {"n": 2**70}
    # a document that does not validate fails every time (never cached as valid)
    for _ in range(2):
        with pytest.raises(ValidationError):
            service.policy_of(_row({"steps": [{"weight": 0, "wait": "1h"}]}), default)
