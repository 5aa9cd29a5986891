"""Every audit event is chained to the one before it, and the database refuses edits."""

from __future__ import annotations

import asyncio
import itertools
import json
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from sqlmodel.ext.asyncio.session import AsyncSession

from opsapi.audit import chain
from opsapi.audit.chain import GENESIS, link
from opsapi.audit.models import Outcome, Source
from opsapi.audit.service import event_row
from tests.support.app import Harness


async def _activity(api: Harness) -> None:
    await api.post("/canary/promote", {"service": "checkout", "version": "v2"})
    await api.get("/canary/checkout")
    await api.post("/canary/promote", {"service": "checkout"})  # 409, audited
    await api.client.get("/internal/ops/canary")  # 401, audited
    await asyncio.gather(*(api.get(f"/canary/svc-{i}") for i in range(20)))  # grouped writes
    await api.post("/canary/rollback", {"service": "checkout", "reason": "test"})


async def test_events_form_one_unbroken_chain(api_any_db: Harness) -> None:
    await _activity(api_any_db)

    events = await api_any_db.audit_events()

    assert len(events) == 25
    previous = GENESIS
    for event in events:
        assert event.prev_hash == previous
        assert event.hash == link(previous, event.model_dump())
        previous = event.hash


@pytest.mark.parametrize(
    "statement",
    ["UPDATE audit_event SET actor = 'someone-else'", "DELETE FROM audit_event"],
)
async def test_the_database_refuses_update_and_delete(api_any_db: Harness, statement: str) -> None:
    await _activity(api_any_db)
    before = await api_any_db.audit_events()

    with pytest.raises(sa.exc.DBAPIError, match="append-only"):
        async with api_any_db.runtime.engine.begin() as connection:
            await connection.execute(sa.text(statement))

    assert await api_any_db.audit_events() == before


@pytest.mark.parametrize("batch", [1, 2], ids=["one-event", "batch"])
async def test_an_appender_that_waited_for_the_lock_chains_to_the_event_committed_meanwhile(
    api: Harness, batch: int
) -> None:
    """Two transactions append at once: the second waits for the first's lock, then must read
    the head the first committed (not the head as it was when its own query started). One
    event is appended in one statement (`audit_append`), a batch after `audit_chain_head`."""

    def row(actor: str) -> dict[str, object]:
        return event_row(at=api.clock(), actor=actor, source=Source.SYSTEM, action="test.append",
                         outcome=Outcome.SUCCESS)  # fmt: skip

    async with api.runtime.sessions() as first, api.runtime.sessions() as second:
        # given a first appender holding the chain's lock in an open transaction
        await first.begin()
        await chain.append(first, [row("first")] * batch)
        # when a second appender starts and waits for it
        waiting = asyncio.create_task(_append_and_commit(second, [row("second")] * batch))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        await first.commit()
        await asyncio.wait_for(waiting, 5)

    # then the second event is chained to the first
    events = await api.audit_events(action="test.append")
    assert [e.actor for e in events] == ["first"] * batch + ["second"] * batch
    for earlier, later in itertools.pairwise(events):
        assert later.prev_hash == earlier.hash
        assert later.hash == link(earlier.hash, later.model_dump())


async def _append_and_commit(session: AsyncSession, events: list[dict[str, object]]) -> None:
    async with session.begin():
        await chain.append(session, events)


def _plain_canonical(event: dict[str, object]) -> bytes:
    # The definition: every chained field as one sorted, compact JSON document.
    fields = {name: event.get(name) for name in chain.CHAINED_FIELDS}
    fields["at"] = "2026-11-30T06:00:00.000001Z"
    fields["roles"] = sorted(event["roles"])  # type: ignore[call-overload]
    fields["details"] = event.get("details") or {}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8", "surrogatepass")


AT = datetime(2026, 11, 30, 6, 0, 0, 1, tzinfo=UTC)
ODD = '","outcome":"x"}, ,"outcome": \\" \u00fc \U0001f600 \x00 \ud800'


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"details": {"a": 1, "outcome": {"outcome": [ODD]}, "z": [1.5, None, True]}},
        {"actor": ODD, "client_address": ODD, "action": ODD, "service": ODD},
        {"roles": [ODD, "admin", ","], "request_id": ODD, "details": {ODD: ODD}},
        {"details": {"big": "x" * 200_000}},  # cut to its budget: the cut is what is hashed
        {"outcome": Outcome.DENIED, "details": {"n": 10**30, "f": 1e23, "nested": {"b": {}}}},
    ],
)
def test_canonical_bytes_are_the_chained_fields_as_one_sorted_document(
    fields: dict[str, object],
) -> None:
    # given an event built as every caller builds one (odd text that looks like the JSON
    # around it included)
    given = {"actor": "alice", "action": "canary.promote", "outcome": Outcome.SUCCESS, **fields}
    row = event_row(at=AT, source=Source.API, **given)  # type: ignore[arg-type]
    # then its canonical bytes are the definition's, and so are those of the same event read
    # back as plain values
    expected = _plain_canonical(row)
    assert chain.canonical(row) == expected
    read_back = {**json.loads(json.dumps({**row, "at": None})), "at": AT}
    assert chain.canonical(read_back) == expected
