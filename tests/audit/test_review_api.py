"""GET /internal/ops/audit: filters, newest-first keyset pages, an opaque cursor, refusals.

Thousands of events are appended straight through the chain (as the application does), not
through HTTP; the expected answers are computed from the table itself.
"""

from __future__ import annotations

import asyncio
import base64
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from opsapi.audit import chain
from opsapi.audit.models import AuditEvent, Outcome, Source
from opsapi.audit.query import Filters, Position, page_query, timestamp
from opsapi.audit.service import event_row
from tests.support.app import API, Harness

START = datetime(2026, 10, 1, tzinfo=UTC)
ACTORS = ["alice", "bob", "carol", "controller", "pagerduty"]
ACTIONS = ["canary.promote", "canary.rollback", "service.put", "router.apply"]
SERVICES = ["checkout", "payments", "search", "cart", "login", None]


def synthetic_rows(count: int, *, seed: int = 1, start: datetime = START) -> list[dict[str, Any]]:
    """`count` varied event rows; times climb but not strictly, and some share an instant."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        at = start + timedelta(seconds=index * 10 + rng.choice([0, 0, 3, -7]))
        if index % 50 == 0:
            at = start + timedelta(seconds=(index // 50) * 500)  # ties with earlier events
        actor = rng.choice(ACTORS)
        rows.append(
            event_row(
                at=at,
                actor=actor,
                roles=[] if actor in ("controller", "pagerduty") else [rng.choice(["operator",
                                                                                   "admin"])],
                source=rng.choices(list(Source), weights=[68, 25, 4, 3])[0],
                action=rng.choice(ACTIONS),
                outcome=rng.choice(list(Outcome)),
                service=rng.choice(SERVICES),
                rollout_id=rng.choice([None, *range(1, 15)]),
                request_id=f"req-{seed}-{index}",
                client_address=rng.choice([None, "10.0.0.7", "2001:db8::1"]),
                details={"reason": rng.choice(["error rate", "manual", "é ünïcode, \"q\""]),
                         "n": index, "nested": {"ok": index % 2 == 0}},
            )
        )  # fmt: skip
    return rows


async def insert_events(
    api: Harness, count: int, *, seed: int = 1, start: datetime = START, batch: int = 500
) -> None:
    """Append `count` synthetic events to the chain through the app's engine, in batches."""
    rows = synthetic_rows(count, seed=seed, start=start)
    for first in range(0, len(rows), batch):
        async with api.runtime.engine.begin() as connection:
            await chain.append(connection, rows[first : first + batch])


async def audit_get(api: Harness, path: str, **params: Any) -> Any:
    """GET an audit route as an auditor with the given query parameters."""
    query = f"?{urlencode(params)}" if params else ""
    return await api.client.get(API + path + query, headers=api.auth("auditor"))


async def walk(
    api: Harness, between: Callable[[], Any] | None = None, **params: Any
) -> tuple[list[dict[str, Any]], int]:
    """Every page of a query; returns the items in order and the number of pages."""
    items: list[dict[str, Any]] = []
    pages = 0
    cursor = None
    while True:
        response = await audit_get(
            api, "/audit", **params, **({"cursor": cursor} if cursor else {})
        )
        assert response.status_code == 200, response.text
        page = response.json()
        items.extend(page["items"])
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            return items, pages
        if between is not None:
            await between()


def newest_first(events: list[AuditEvent]) -> list[AuditEvent]:
    return sorted(events, key=lambda e: (e.at, e.id), reverse=True)


def document(event: AuditEvent) -> dict[str, Any]:
    """What the API should answer for `event`."""
    return {**event.model_dump(), "at": timestamp(event.at)}


# (query parameters, predicate over an event)
FILTER_CASES = [
    pytest.param({}, lambda e: True, id="none"),
    pytest.param({"actor": "alice"}, lambda e: e.actor == "alice", id="actor"),
    pytest.param({"action": "service.put"}, lambda e: e.action == "service.put", id="action"),
    pytest.param({"service": "payments"}, lambda e: e.service == "payments", id="service"),
    pytest.param({"rollout_id": 7}, lambda e: e.rollout_id == 7, id="rollout_id"),
    pytest.param({"outcome": "denied"}, lambda e: e.outcome == "denied", id="outcome"),
    pytest.param({"source": "pagerduty"}, lambda e: e.source == "pagerduty", id="source"),
    pytest.param({"since": "2026-10-02T00:00:00Z"},
                 lambda e: e.at >= datetime(2026, 10, 2, tzinfo=UTC), id="since"),
    pytest.param({"until": "2026-10-01T03:00:00+02:00"},
                 lambda e: e.at < datetime(2026, 10, 1, 1, tzinfo=UTC), id="until-offset"),
    pytest.param({"actor": "bob", "outcome": "success", "service": "search"},
                 lambda e: (e.actor, e.outcome, e.service) == ("bob", "success", "search"),
                 id="actor+outcome+service"),
    pytest.param({"source": "api", "action": "canary.rollback", "since": "2026-10-01T02:00:00Z",
                  "until": "2026-10-01T07:30:00.5Z"},
                 lambda e: e.source == "api" and e.action == "canary.rollback"
                 and datetime(2026, 10, 1, 2, tzinfo=UTC) <= e.at
                 < datetime(2026, 10, 1, 7, 30, 0, 500000, tzinfo=UTC),
                 id="source+action+since+until"),
    pytest.param({"rollout_id": 3, "outcome": "error"},
                 lambda e: e.rollout_id == 3 and e.outcome == "error", id="rollout_id+outcome"),
    pytest.param({"actor": "nobody"}, lambda e: False, id="no-match"),
]  # fmt: skip


@pytest.mark.parametrize(("params", "matches"), FILTER_CASES)
async def test_filters_walk_every_page_newest_first(
    api: Harness, params: dict[str, Any], matches: Callable[[AuditEvent], bool]
) -> None:
    # given 3,000 events
    await insert_events(api, 3000)
    expected = newest_first([e for e in await api.audit_events() if matches(e)])

    # when an auditor walks every page of the filtered query
    items, pages = await walk(api, limit=97, **params)

    # then exactly the matching events come back, newest first, each once, every column
    assert [item["id"] for item in items] == [e.id for e in expected]
    assert pages == max(1, -(-len(expected) // 97))
    assert items == [document(e) for e in expected]


async def test_since_is_inclusive_and_until_exclusive(api: Harness) -> None:
    await insert_events(api, 300)
    events = await api.audit_events()
    edge = events[150].at
    at_edge = {e.id for e in events if e.at == edge}

    since = {item["id"] for item in (await walk(api, since=timestamp(edge)))[0]}
    until = {item["id"] for item in (await walk(api, until=timestamp(edge)))[0]}

    assert at_edge <= since
    assert not at_edge & until
    assert since | until == {e.id for e in events}


async def test_default_and_maximum_limit(api: Harness) -> None:
    await insert_events(api, 1500)

    default = (await audit_get(api, "/audit")).json()
    largest = (await audit_get(api, "/audit", limit=1000)).json()
    rest = (await audit_get(api, "/audit", limit=1000, cursor=largest["next_cursor"])).json()

    assert len(default["items"]) == 100
    assert default["next_cursor"] is not None
    assert len(largest["items"]) == 1000
    # 1,500 events and the first request's own audit event; the second request's event sorts
    # above the cursor, so it is not part of this walk
    assert len(rest["items"]) == 501
    assert rest["next_cursor"] is None


async def test_a_full_last_page_has_no_next_cursor(api: Harness) -> None:
    await insert_events(api, 200)

    first = (await audit_get(api, "/audit", limit=100)).json()
    second = (await audit_get(api, "/audit", limit=100, cursor=first["next_cursor"])).json()

    assert len(second["items"]) == 100
    assert second["next_cursor"] is None


async def test_pages_stay_exact_while_events_keep_arriving(api: Harness) -> None:
    # given 2,000 events, and a writer that keeps appending: new events, and late ones whose
    # time falls inside the range already being paged (a slow request committing late)
    await insert_events(api, 2000)
    before = await api.audit_events()
    appended = 0
    stop = asyncio.Event()

    async def writer() -> None:
        nonlocal appended
        seed = 100
        while not stop.is_set():
            seed += 1
            late = START + timedelta(seconds=random.Random(seed).randint(0, 20_000))
            rows = synthetic_rows(5, seed=seed, start=late if seed % 2 else START.replace(
                year=2027))  # fmt: skip
            async with api.runtime.engine.begin() as connection:
                await chain.append(connection, rows)
            appended += 1
            await asyncio.sleep(0)

    async def let_some_arrive() -> None:
        target = appended + 1
        while appended < target:
            await asyncio.sleep(0.001)

    # when an auditor walks every page while the writer runs
    task = asyncio.create_task(writer())
    try:
        items, pages = await walk(api, between=let_some_arrive, limit=50)
    finally:
        stop.set()
        await task

    # then no event came twice, none that existed at the start is missing, the order held,
    # and whatever else appeared is one of the events appended meanwhile
    ids = [item["id"] for item in items]
    assert len(ids) == len(set(ids))
    assert {e.id for e in before} <= set(ids)
    keys = [(item["at"], item["id"]) for item in items]
    assert keys == sorted(keys, reverse=True)
    everything = {e.id: e for e in await api.audit_events()}
    assert set(ids) <= everything.keys()
    assert pages >= 40
    assert appended >= pages - 1


BAD_PARAMS = [
    pytest.param({"cursor": "garbage"}, "cursor", id="cursor-garbage"),
    pytest.param({"cursor": "!!!!"}, "cursor", id="cursor-not-base64"),
    pytest.param({"cursor": ""}, "cursor", id="cursor-empty"),
    pytest.param({"cursor": base64.urlsafe_b64encode(b"\x01" * 25).decode()}, "cursor",
                 id="cursor-bad-check"),
    pytest.param({"cursor": "A" * 500}, "cursor", id="cursor-long"),
    pytest.param({"limit": 0}, "limit", id="limit-0"),
    pytest.param({"limit": 1001}, "limit", id="limit-1001"),
    pytest.param({"limit": "ten"}, "limit", id="limit-text"),
    pytest.param({"limit": -5}, "limit", id="limit-negative"),
    pytest.param({"since": "yesterday"}, "since", id="since-word"),
    pytest.param({"since": "2026-11-22"}, "since", id="since-date-only"),
    pytest.param({"since": "2026-11-22T12:00:00"}, "since", id="since-no-offset"),
    pytest.param({"since": "2026-02-30T00:00:00Z"}, "since", id="since-no-such-day"),
    pytest.param({"until": "2026-11-22T12:00:00 01:00"}, "until", id="until-unencoded-plus"),
    pytest.param({"since": "2026-11-22T00:00:00Z", "until": "2026-11-21T00:00:00Z"}, "since",
                 id="since-after-until"),
    pytest.param({"outcome": "maybe"}, "outcome", id="outcome-unknown"),
    pytest.param({"source": "cron"}, "source", id="source-unknown"),
    pytest.param({"rollout_id": "x1"}, "rollout_id", id="rollout-id-text"),
    pytest.param({"rollout_id": "99999999999"}, "rollout_id", id="rollout-id-too-big"),
    pytest.param({"actor": ""}, "actor", id="actor-empty"),
    pytest.param({"service": "s" * 64}, "service", id="service-too-long"),
    pytest.param({"servce": "checkout"}, "servce", id="unknown-parameter"),
]  # fmt: skip


@pytest.mark.parametrize(("params", "named"), BAD_PARAMS)
async def test_invalid_parameters_are_422_problems(
    api: Harness, params: dict[str, Any], named: str
) -> None:
    response = await audit_get(api, "/audit", **params)

    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 422
    assert named in problem["detail"]
    [event] = await api.audit_events(action="audit.query")
    assert (event.outcome, event.details["status"]) == ("error", 422)


async def test_a_repeated_filter_is_refused(api: Harness) -> None:
    response = await api.client.get(
        API + "/audit?actor=alice&actor=bob", headers=api.auth("auditor")
    )

    assert response.status_code == 422
    assert "once" in response.json()["detail"]


async def test_a_cursor_only_works_with_its_own_filters(api: Harness) -> None:
    await insert_events(api, 400)
    first = (await audit_get(api, "/audit", service="checkout", limit=10)).json()
    cursor = first["next_cursor"]

    same = await audit_get(api, "/audit", service="checkout", limit=10, cursor=cursor)
    other = await audit_get(api, "/audit", service="payments", limit=10, cursor=cursor)
    unfiltered = await audit_get(api, "/audit", limit=10, cursor=cursor)

    assert same.status_code == 200
    assert other.status_code == 422
    assert unfiltered.status_code == 422
    # and the cursor is opaque: no id or timestamp in plain sight
    assert str(first["items"][-1]["id"]) not in cursor
    assert "2026" not in cursor


async def test_each_query_is_audited_with_its_filters(api: Harness) -> None:
    await insert_events(api, 20)

    response = await audit_get(api, "/audit", actor="alice", since="2026-10-01T00:00:00+00:00")

    assert response.status_code == 200
    [event] = await api.audit_events(action="audit.query")
    assert event.actor == "auditor-user"
    assert event.outcome == "success"
    assert event.details == {
        "status": 200,
        "filters": {"actor": "alice", "since": "2026-10-01T00:00:00.000000Z"},
    }


async def test_filters_and_pages_on_both_databases(api_any_db: Harness) -> None:
    api = api_any_db
    await insert_events(api, 400, batch=100)
    events = await api.audit_events()

    for params, matches in [
        ({}, lambda e: True),
        ({"service": "cart", "outcome": "success"},
         lambda e: e.service == "cart" and e.outcome == "success"),
        ({"since": "2026-10-01T00:30:00Z", "until": "2026-10-01T01:00:00Z", "source": "api"},
         lambda e: e.source == "api"
         and datetime(2026, 10, 1, 0, 30, tzinfo=UTC) <= e.at
         < datetime(2026, 10, 1, 1, tzinfo=UTC)),
    ]:  # fmt: skip
        items, _ = await walk(api, limit=33, **params)
        assert items == [document(e) for e in newest_first(list(filter(matches, events)))]

    garbage = await audit_get(api, "/audit", cursor="garbage")
    assert garbage.status_code == 422


async def _plan(api: Harness, query: sa.Select[Any]) -> str:
    sql = query.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})
    async with api.runtime.engine.connect() as connection:
        rows = (await connection.execute(sa.text(f"EXPLAIN {sql}"))).all()
    return "\n".join(row[0] for row in rows)


async def test_pages_are_index_range_scans_on_postgresql(api: Harness) -> None:
    # given enough events for the planner to care, a few by a rare actor on a rare service,
    # and fresh statistics
    await insert_events(api, 20_000, batch=2000)
    rare = [{**row, "actor": "dave", "service": "ledger"} for row in synthetic_rows(600, seed=9)]
    async with api.runtime.engine.begin() as connection:
        await chain.append(connection, rare)
    async with api.runtime.engine.begin() as connection:  # committed, or ANALYZE is undone
        await connection.execute(sa.text("ANALYZE audit_event"))
    events = newest_first(await api.audit_events())
    deep = events[15_000]

    # then first pages and deep cursor pages read an index in order: no sort, no sequential
    # scan; a rare value is found through its own index
    hours = (START + timedelta(hours=5), START + timedelta(hours=9))
    for filters, index in [
        (Filters(), "ix_audit_at"),
        (Filters(service="ledger"), "ix_audit_service_at"),
        (Filters(actor="dave"), "ix_audit_actor_at"),
        (Filters(source="system"), "ix_audit_source_at"),
        (Filters(since=hours[0], until=hours[1]), "ix_audit_at"),
        (Filters(service="payments"), "Index Scan"),
        (Filters(outcome="denied", action="service.put"), "Index Scan"),
    ]:
        for before in (None, Position(deep.at, deep.id)):
            plan = await _plan(api, page_query(filters, before, 101))
            assert index in plan, plan
            assert "Sort" not in plan, plan
            assert "Seq Scan" not in plan, plan


async def test_the_routes_are_in_the_openapi_document(api: Harness) -> None:
    document = (await api.client.get(API + "/openapi.json")).json()

    for path in ("/audit", "/audit/export", "/audit/verify"):
        operation = document["paths"][API + path]["get"]
        assert operation["description"] == "Role: auditor."
