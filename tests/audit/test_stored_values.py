"""What an audit event holds is what its hash covers, on PostgreSQL and SQLite alike.

PostgreSQL's jsonb renders numbers its own way (1e23 comes back as 100000000000000000000000,
-0.0 as 0.0), refuses NaN, NUL and lone surrogates; SQLite keeps Python's text. Whatever a
caller sends, the event is stored, its hash matches what is read back, and one bad event
never fails the events that share its group commit.
"""

from __future__ import annotations

import asyncio
import json
import math
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opsapi.audit import chain
from opsapi.audit.chain import GENESIS, link
from opsapi.audit.models import AuditEvent, Outcome, Source
from opsapi.audit.query import AUDIT
from opsapi.audit.service import event_row
from opsapi.audit.verify import verify_chain
from opsapi.storage.db import create_engine
from opsapi.storage.migrate import upgrade
from tests.audit.test_review_api import audit_get
from tests.support.app import API, Harness

AT = datetime(2026, 11, 22, 12, 0, 0, 123456, tzinfo=UTC)


def encode(value: Any) -> bytes:
    """Canonical JSON (sorted, compact): compares documents whatever their key order."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8", "surrogatepass")


async def verify(api: Harness) -> dict[str, Any]:
    response = await audit_get(api, "/audit/verify")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def post_raw(api: Harness, path: str, body: str, role: str) -> int:
    """POST a body exactly as written (JSON literals Python would write differently)."""
    headers = {**api.auth(role), "content-type": "application/json"}
    response = await api.client.post(API + path, content=body.encode(), headers=headers)
    return response.status_code


def row(details: dict[str, Any], **fields: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "at": AT, "actor": "tester", "source": Source.API, "action": "test.values",
        "outcome": Outcome.ERROR, "details": details, **fields,
    }  # fmt: skip
    return event_row(**values)


async def append(api: Harness, rows: list[dict[str, Any]]) -> None:
    async with api.runtime.engine.begin() as connection:
        await chain.append(connection, rows)


# --- item 1: numbers are stored as they are hashed ------------------------------------------

# (JSON literal a caller sends, the value the event keeps): documented in docs/audit.md.
NUMBERS = [
    pytest.param("1e23", 10**23, id="1e23"),
    pytest.param("1e300", 10**300, id="1e300"),
    pytest.param("-1.7976931348623157e308", -17976931348623157 * 10**292, id="-max-float"),
    pytest.param("-0.0", 0.0, id="negative-zero"),
    pytest.param("1e16", 10**16, id="1e16"),
    pytest.param("1.5e-07", 1.5e-07, id="small"),
    pytest.param("5e-324", 5e-324, id="subnormal"),
    pytest.param("0.1", 0.1, id="0.1"),
    pytest.param("123456789012345678901234567890", 123456789012345678901234567890, id="big-int"),
    pytest.param("NaN", "NaN", id="nan"),
    pytest.param("-Infinity", "-Infinity", id="-infinity"),
]


@pytest.mark.parametrize(("literal", "kept"), NUMBERS)
async def test_a_viewer_cannot_fake_a_tamper_alarm_with_numbers(
    api_any_db: Harness, literal: str, kept: Any
) -> None:
    # given a viewer whose /execute call carries a number each database renders its own way
    body = f'{{"operation": "health-check", "params": {{"n": {literal}}}}}'

    # when the refused call is audited and the chain verified
    status = await post_raw(api_any_db, "/execute", body, "viewer")
    report = await verify(api_any_db)

    # then the call got its answer, the chain is intact, and the event keeps the number
    assert status in (400, 422)
    assert report["intact"] is True, report
    events = await api_any_db.audit_events(action="execute.health-check")
    if events:  # the request pipeline may refuse some literals before parsing params
        [event] = events
        assert encode(event.details["params"]) == encode({"n": kept})


async def test_admin_policy_updates_with_extreme_numbers_verify(api_any_db: Harness) -> None:
    # given an admin policy whose gate thresholds PostgreSQL renders differently from Python
    gates = ",".join(
        f'{{"name": "g{i}", "query": "up", "op": ">", "threshold": {value}}}'
        for i, value in enumerate(["1e23", "-0.0", "1.2345678901234567e+20", "2.5e-300", "1e16"])
    )
    status = await post_raw_put(api_any_db, "/services/payments", f'{{"gates": [{gates}]}}')
    assert status == 200

    # then the change's audit event (before/after) verifies
    assert (await verify(api_any_db))["intact"] is True


async def post_raw_put(api: Harness, path: str, body: str) -> int:
    headers = {**api.auth("admin"), "content-type": "application/json"}
    response = await api.client.put(API + path, content=body.encode(), headers=headers)
    return response.status_code


def json_values() -> st.SearchStrategy[Any]:
    """Arbitrary JSON documents as Python holds them, with the values that trip databases."""
    text = st.text(st.characters(codec=None, exclude_categories=()), max_size=20) | st.sampled_from(
        ["\ud800", "\udfff", "a\x00b", "\U0001f600", "é", "\\u0000", "\u2028"]
    )
    numbers = (
        st.floats(allow_nan=True, allow_infinity=True)
        | st.integers()
        | st.integers(min_value=-(10**400), max_value=10**400)
        | st.sampled_from([1e23, 1e300, -0.0, 1e16, 5e-324, 2**63, -(2**64), 10**40])
    )
    leaves = st.none() | st.booleans() | numbers | text
    return st.recursive(
        leaves,
        lambda children: (
            st.lists(children, max_size=5) | st.dictionaries(text, children, max_size=5)
        ),
        max_leaves=25,
    )


async def _round_trip(url: str, document: dict[str, Any]) -> None:
    engine = create_engine(url)
    try:
        written = row({"params": document})
        async with engine.begin() as connection:
            await chain.append(connection, [written])
        async with engine.connect() as connection:
            stored = (
                (await connection.execute(sa.select(AUDIT).order_by(AUDIT.c.id.desc()).limit(1)))
                .mappings()
                .one()
            )
        assert stored["hash"] == link(stored["prev_hash"], stored)
        assert encode(stored["details"]) == encode(written["details"])
    finally:
        await engine.dispose()


async def _migrated(url: str) -> None:
    engine = create_engine(url)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()


async def _verified(url: str) -> dict[str, Any]:
    engine = create_engine(url)
    try:
        return await verify_chain(engine)
    finally:
        await engine.dispose()


def test_any_json_document_is_stored_as_hashed(db_url: str) -> None:
    # given arbitrary JSON documents (floats of every magnitude, big integers, any unicode),
    # each written as an event's details on a real database, then read back
    asyncio.run(_migrated(db_url))
    examples = 0

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(document=st.dictionaries(st.text(max_size=8), json_values(), max_size=6))
    def stored_as_hashed(document: dict[str, Any]) -> None:
        nonlocal examples
        examples += 1
        # then what is read back is what was hashed (checked inside the round trip)
        asyncio.run(_round_trip(db_url, document))

    stored_as_hashed()

    # and the whole chain of them verifies
    report = asyncio.run(_verified(db_url))
    assert (report["intact"], report["events"]) == (True, examples)


# --- existing chains keep verifying ----------------------------------------------------------


def test_the_canonical_form_of_earlier_events_is_unchanged() -> None:
    # an event as earlier versions hashed it (value computed by the version before this one)
    event = {
        "at": datetime(2026, 11, 22, 12, 0, 0, 123456, tzinfo=UTC), "actor": "alice",
        "roles": ["operator", "admin"], "source": "api", "action": "canary.promote",
        "service": "checkout", "rollout_id": 7, "outcome": "success", "request_id": "req-1",
        "client_address": "10.0.0.7",
        "details": {"status": 200, "reason": 'é "q"', "n": 1e16, "x": 0.5,
                    "nested": {"ok": True, "l": [1, None, "z"]}},
    }  # fmt: skip
    assert (
        link(GENESIS, event) == "58d6bed4fcc53823e1853ab4fea8c48533c870fa0db5ccce6b9167a9d4de184f"
    )


async def test_events_written_by_earlier_versions_still_verify(api_any_db: Harness) -> None:
    # given events appended the way earlier versions did: details with Python floats, not
    # made storable first (on PostgreSQL their hashes never matched what is stored)
    legacy = [
        {**row({}), "details": {"threshold": 1e23, "zero": -0.0, "list": [1e300, -0.0, 0.0]}},
        {**row({}), "details": {"n": 1e16, "x": 2.5}},
        {**row({}), "details": {"many": [1e23] * 12}},
    ]
    await append(api_any_db, [legacy[0]])
    await append(api_any_db, [row({"after": "the upgrade"}), legacy[1], legacy[2]])

    # when the chain is verified
    report = await verify(api_any_db)

    # then it is intact; on PostgreSQL the events are matched in their earlier reading
    assert report["intact"] is True, report
    assert report["events"] == 4
    if api_any_db.runtime.engine.dialect.name == "postgresql":
        assert report["legacy_number_events"] == 2
    else:
        assert "legacy_number_events" not in report


async def test_a_legacy_reading_does_not_excuse_an_edit(api: Harness) -> None:
    legacy = {**row({}), "details": {"threshold": 1e23, "note": "original"}}
    await append(api, [legacy])
    async with api.runtime.engine.begin() as connection:
        await connection.execute(sa.text("ALTER TABLE audit_event DISABLE TRIGGER USER"))
        await connection.execute(
            sa.text("""UPDATE audit_event SET details = jsonb_set(details, '{note}', '"edited"')""")
        )
        await connection.execute(sa.text("ALTER TABLE audit_event ENABLE TRIGGER USER"))

    report = await verify(api)

    assert report["intact"] is False
    assert report["first_broken"]["reason"] == "hash mismatch"


# --- item 2: any value is storable, and one bad event fails alone ----------------------------

# (details given, details kept): the documented storable forms.
VALUES = [
    pytest.param({"s": "\ud800"}, {"s": "\\ud800"}, id="lone-surrogate"),
    pytest.param({"s": "a\udfffb\ud83d"}, {"s": "a\\udfffb\\ud83d"}, id="lone-surrogates"),
    pytest.param({"s": "a\x00b"}, {"s": "a\\u0000b"}, id="nul"),
    pytest.param({"a\x00": 1, "\ud800": 2}, {"a\\u0000": 1, "\\ud800": 2}, id="keys"),
    pytest.param({"n": math.nan, "p": math.inf, "m": -math.inf},
                 {"n": "NaN", "p": "Infinity", "m": "-Infinity"}, id="non-finite"),
    pytest.param({"n": 2**13_500}, {"n": f"{2**13_500:#x}"}, id="int-beyond-str-limit"),
    pytest.param({"t": datetime(2026, 1, 2, tzinfo=UTC), "s": {3}, "u": (1, 2)},
                 {"t": "2026-01-02T00:00:00+00:00", "s": [3], "u": [1, 2]}, id="non-json"),
    pytest.param({"1": "a", 1: "b"}, {"1": "a", "1'": "b"}, id="colliding-keys"),
]  # fmt: skip


@pytest.mark.parametrize(("given", "kept"), VALUES)
async def test_any_value_is_stored_in_a_documented_form(
    api_any_db: Harness, given: dict[str, Any], kept: dict[str, Any]
) -> None:
    # given an event whose details hold values no database takes as they are
    await append(api_any_db, [row(given)])

    # then it is stored in the documented form and verifies
    [event] = await api_any_db.audit_events()
    assert encode(event.details) == encode(kept)
    assert (await verify(api_any_db))["intact"] is True


async def test_over_long_and_unstorable_columns_are_stored(api_any_db: Harness) -> None:
    await append(
        api_any_db,
        [row({}, actor="\x00" + "a" * 400, action="x" * 100, service="s" * 80,
             request_id="r\ud800" * 50, client_address="c" * 99, roles=["ad\x00min"])],
    )  # fmt: skip

    [event] = await api_any_db.audit_events()
    assert (event.actor, len(event.action), len(event.service or "")) == (
        "\\u0000" + "a" * 249, 64, 63)  # fmt: skip
    assert event.roles == ["ad\\u0000min"]
    assert (await verify(api_any_db))["intact"] is True


def test_deep_nesting_is_cut_with_a_marker() -> None:
    deep: Any = "bottom"
    for _ in range(200):
        deep = [deep]
    details = row({"deep": deep})["details"]
    text = json.dumps(details)
    assert "[nested too deep]" in text
    assert text.count("[") < 70


# Rows that reach the writer without `event_row` (a bug elsewhere): the database or the
# hashing refuses them.
POISON = [
    pytest.param({"details": {"n": math.nan}}, "postgres", id="nan-on-postgres"),
    pytest.param({"at": datetime(2026, 11, 22, 12, 0)}, None, id="naive-time"),
    pytest.param({"details": {"o": object()}}, None, id="not-json"),
    pytest.param({"action": "x" * 65}, "postgres", id="over-long-on-postgres"),
]


@pytest.mark.parametrize(("poison", "fails_on"), POISON)
async def test_one_bad_event_fails_alone_in_a_group_commit(
    api_any_db: Harness, poison: dict[str, Any], fails_on: str | None
) -> None:
    # given 40 good events and one bad one handed to the writer together (one group commit)
    api = api_any_db
    dialect = "postgres" if api.runtime.engine.dialect.name == "postgresql" else "sqlite"
    good = [row({"i": i}) for i in range(40)]
    bad = {**row({"bad": True}), **poison}
    writes = [api.runtime.audit_writer.write(r) for r in good[:20]]
    writes.append(api.runtime.audit_writer.write(bad))
    writes += [api.runtime.audit_writer.write(r) for r in good[20:]]

    results = await asyncio.gather(*writes, return_exceptions=True)

    # then every good event is committed, and only the bad one failed (if its database refuses it)
    failed = [r for r in results if isinstance(r, BaseException)]
    expected_failures = 1 if fails_on in (None, dialect) else 0
    assert len(failed) == expected_failures
    assert results.index(failed[0]) == 20 if failed else True
    events = await api.audit_events()
    assert [e.details.get("i") for e in events if "i" in e.details] == list(range(40))
    assert (await verify(api))["intact"] is True


async def test_poisoned_execute_calls_do_not_fail_other_users_reads(api_any_db: Harness) -> None:
    # given two attacker loops sending /execute params that no database stores as they are
    api = api_any_db
    poison = [
        '{"operation": "health-check", "params": {"n": NaN}}',
        '{"operation": "health-check", "params": {"s": "\\ud800"}}',
        '{"operation": "health-check", "params": {"n": Infinity, "s": "a\\ud800"}}',
    ]
    stop = asyncio.Event()

    async def attacker() -> list[int]:
        statuses = []
        while not stop.is_set():
            for body in poison:
                statuses.append(await post_raw(api, "/execute", body, "viewer"))
        return statuses

    async def reader() -> list[int]:
        statuses = []
        for _ in range(6):
            pages = await asyncio.gather(*(api.get(f"/canary/svc-{i}") for i in range(10)))
            statuses += [page.status_code for page in pages]
        stop.set()
        return statuses

    # when another user reads meanwhile (their audit events share the attackers' batches)
    *attacks, reads = await asyncio.gather(attacker(), attacker(), reader())

    # then every read is answered, every attack is refused, and nothing failed for lack of audit
    assert set(reads) <= {200, 404}
    assert all(status in (400, 422) for statuses in attacks for status in statuses)
    assert (await verify(api))["intact"] is True


async def test_audit_events_read_back_through_the_api_unchanged(api_any_db: Harness) -> None:
    await append(api_any_db, [row({"n": 1e23, "s": "\ud800", "z": -0.0})])

    page = await audit_get(api_any_db, "/audit", action="test.values")

    [item] = page.json()["items"]
    assert item["details"] == {"n": 10**23, "s": "\\ud800", "z": 0.0}
    assert link(GENESIS, item) == item["hash"]


async def test_event_rows_are_plain_table_rows() -> None:
    # the table model accepts what event_row builds (nothing beyond its columns)
    assert set(row({})) <= {c.name for c in AuditEvent.__table__.columns}  # type: ignore[attr-defined]
