"""Concurrent requests against one PostgreSQL database: no transition happens twice."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path

from sqlmodel.ext.asyncio.session import AsyncSession

from opsapi.audit.models import Source
from opsapi.canary import machine
from opsapi.canary.effects import Cause, Effects
from opsapi.canary.service import Locked
from tests.support.app import Harness, running_app


async def test_fifty_concurrent_promotes_advance_exactly_once(api: Harness) -> None:
    # given a rollout whose 10 % step is ready
    started = await api.post("/canary/promote", {"service": "checkout", "version": "v2"})
    assert started.status_code == 200
    api.clock.advance(minutes=30)

    # when 50 operators promote at the same moment
    responses = await asyncio.gather(
        *(
            api.post("/canary/promote", {"service": "checkout"}, subject=f"op-{i}")
            for i in range(50)
        )
    )

    # then exactly one advanced, 49 were told why not, and all 50 were audited
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [409] * 49
    assert (await api.get("/canary/checkout")).json()["desired_weight"] == 25
    events = await api.audit_events(action="canary.promote")
    assert len(events) == 51  # the start and the 50 concurrent promotes
    assert sorted(e.outcome for e in events[1:]) == ["conflict"] * 49 + ["success"]


async def test_two_concurrent_starts_open_one_rollout(api: Harness) -> None:
    responses = await asyncio.gather(
        api.post("/canary/promote", {"service": "checkout", "version": "v2"}),
        api.post("/canary/promote", {"service": "checkout", "version": "v2"}),
    )

    assert sorted(r.status_code for r in responses) == [200, 409]
    assert len(await api.rollouts("checkout")) == 1
    outcomes = sorted(e.outcome for e in await api.audit_events(action="canary.promote"))
    assert outcomes == ["conflict", "success"]


async def test_concurrent_starts_of_many_services_each_open_one(api: Harness) -> None:
    bodies = [{"service": f"svc-{i % 5}", "version": "v2"} for i in range(25)]

    responses = await asyncio.gather(*(api.post("/canary/promote", b) for b in bodies))

    assert sum(r.status_code == 200 for r in responses) == 5
    for i in range(5):
        assert len(await api.rollouts(f"svc-{i}")) == 1


async def test_concurrent_idempotent_replays_act_once(api: Harness) -> None:
    body = {"service": "checkout", "version": "v2"}
    responses = await asyncio.gather(
        *(api.post("/canary/promote", body, **{"Idempotency-Key": "k-1"}) for _ in range(10))
    )

    assert {r.status_code for r in responses} == {200}
    assert len({r.json()["id"] for r in responses}) == 1
    assert len(await api.rollouts("checkout")) == 1


async def test_two_replicas_share_the_work(pg_url: str, key_file: Path) -> None:
    # given two app replicas (each with its controller) on one database and 20 ready rollouts
    async with running_app(pg_url, key_file) as one, running_app(pg_url, key_file) as two:
        for i in range(20):
            await one.post("/canary/promote", {"service": f"svc-{i}", "version": "v2"})
        one.clock.advance(minutes=30)
        two.clock.advance(minutes=30)

        # when both controllers run at once
        done = await asyncio.gather(one.tick(), two.tick(), one.tick(), two.tick())

        # then every rollout moved once: 20 transitions, 20 audit events
        assert sum(done) == 20
        events = await one.audit_events(action="rollout.ready")
        assert sorted(e.service or "" for e in events) == sorted(f"svc-{i}" for i in range(20))


async def test_a_transition_that_waited_for_the_service_lock_sees_the_rollout_committed_meanwhile(
    api: Harness,
) -> None:
    """The service is locked, then its latest rollout read, in one round trip on PostgreSQL
    (`transition_lock`): the read must start after the lock is held, or a rollout started
    while it waited would be missed and a second one decided on the old row."""
    # given a finished rollout of checkout
    await api.post("/canary/promote", {"service": "checkout", "version": "v2"})
    await api.post("/canary/rollback", {"service": "checkout", "reason": "bad"})
    [finished] = await api.rollouts("checkout")
    effects, now = api.runtime.effects, api.clock()
    async with api.runtime.sessions() as first, api.runtime.sessions() as second:
        # and a first transaction holding the service's lock while it starts a new rollout
        await first.begin()
        locked = await effects.lock("checkout", now=now, session=first, safety=True)
        assert locked.record is not None
        assert locked.record.id == finished.id
        start = machine.Start(
            service="checkout", canary_version="v3", stable_version=None,
            steps=api.runtime.default_policy.machine_steps(), actor=machine.Actor(
                machine.Trigger.USER, "alice"),
        )  # fmt: skip
        cause = Cause(actor="alice", source=Source.API)
        started = await effects.apply(locked, start, now=now, cause=cause, session=first)
        # when a second transaction locks the service meanwhile
        waiting = asyncio.create_task(_lock(effects, second, now))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        await first.commit()
        seen = await asyncio.wait_for(waiting, 5)

    # then it decides on the rollout the first one committed, not on the one before
    assert seen.record is not None
    assert seen.record.id == started.record.id
    assert seen.record.canary_version == "v3"


async def _lock(effects: Effects, session: AsyncSession, now: datetime) -> Locked:
    async with session.begin():
        return await effects.lock("checkout", now=now, session=session, outbox=True, safety=True)
