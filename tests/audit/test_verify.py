"""GET /internal/ops/audit/verify: an intact chain is reported intact; every edit made behind
the application's back (triggers disabled) is reported at the right event."""

from __future__ import annotations

import asyncio
import importlib
import re
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import sqlalchemy as sa

from opsapi.audit import chain
from opsapi.audit.chain import GENESIS, link
from opsapi.audit.models import Outcome, Source
from opsapi.audit.service import event_row
from opsapi.audit.verify import verify_chain
from opsapi.storage.db import create_engine
from opsapi.storage.migrate import upgrade
from tests.audit.test_review_api import audit_get, insert_events
from tests.support.app import Harness, running_app
from tests.support.databases import PG_ADMIN_DSN

_MIGRATION = importlib.import_module("opsapi.migrations.versions.0003_audit_chain")


async def tamper(api: Harness, *statements: str) -> None:
    """Run `statements` with the append-only triggers out of the way, then restore them."""
    engine = api.runtime.engine
    async with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            await connection.execute(
                sa.text("ALTER TABLE audit_event DISABLE TRIGGER audit_event_append_only")
            )
            for statement in statements:
                await connection.execute(sa.text(statement))
            await connection.execute(
                sa.text("ALTER TABLE audit_event ENABLE TRIGGER audit_event_append_only")
            )
        else:
            for trigger in ("audit_event_no_update", "audit_event_no_delete"):
                await connection.execute(sa.text(f"DROP TRIGGER {trigger}"))
            for statement in statements:
                await connection.execute(sa.text(statement))
            for statement in _MIGRATION.SQLITE_TRIGGERS:
                await connection.execute(sa.text(statement))


async def verify(api: Harness, **params: Any) -> dict[str, Any]:
    response = await audit_get(api, "/audit/verify", **params)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def _activity(api: Harness) -> None:
    await api.post("/canary/promote", {"service": "checkout", "version": "v2"})
    await api.get("/canary/checkout")
    await api.post("/canary/promote", {"service": "checkout"})  # 409, audited
    await api.client.get("/internal/ops/canary")  # 401, audited
    await asyncio.gather(*(api.get(f"/canary/svc-{i}") for i in range(20)))  # grouped writes
    await api.put("/services/payments", {"steps": [{"weight": 100, "wait": "1m"}]})
    await api.post("/canary/rollback", {"service": "checkout", "reason": "test"})
    await audit_get(api, "/audit", service="checkout")


async def test_an_untouched_chain_is_intact(api_any_db: Harness) -> None:
    # given normal API activity
    await _activity(api_any_db)
    events = await api_any_db.audit_events()

    # when an auditor verifies the chain
    report = await verify(api_any_db)

    # then every event was checked and the tip is the newest event, published as the head
    head = {"id": events[-1].id, "hash": events[-1].hash}
    assert report == {
        "intact": True,
        "events": len(events),
        "last_id": events[-1].id,
        "last_hash": events[-1].hash,
        "head": head,
    }
    # and the verification itself is on the record
    [event] = await api_any_db.audit_events(action="audit.verify")
    assert event.details == {
        "status": 200, "intact": True, "events": len(events), "last_id": events[-1].id,
        "head": head,
    }  # fmt: skip


async def test_an_empty_log_is_intact(api: Harness) -> None:
    assert await verify(api) == {
        "intact": True, "events": 0, "last_id": None, "last_hash": None, "head": None
    }  # fmt: skip


EDITS = [
    pytest.param("actor = 'someone-else'", id="actor"),
    pytest.param('details = \'{"status": 200, "reason": "nothing to see"}\'', id="details"),
    pytest.param("outcome = 'success', roles = '[\"admin\"]'", id="outcome+roles"),
]


@pytest.mark.parametrize("assignment", EDITS)
async def test_an_edited_event_is_reported_at_its_id(api_any_db: Harness, assignment: str) -> None:
    # given a chain of API activity and bulk events, one of which is edited behind the app
    await _activity(api_any_db)
    await insert_events(api_any_db, 200)
    target = (await api_any_db.audit_events())[100]
    await tamper(api_any_db, f"UPDATE audit_event SET {assignment} WHERE id = {target.id}")
    [edited] = await api_any_db.audit_events(id=target.id)

    newest = (await api_any_db.audit_events())[-1]

    report = await verify(api_any_db)

    assert report == {
        "intact": False,
        "events_checked": 101,
        "first_broken": {
            "id": target.id,
            "reason": "hash mismatch",
            "expected": link(target.prev_hash, edited.model_dump()),
            "found": target.hash,
        },
        "head": {"id": newest.id, "hash": newest.hash},
    }
    [event] = await api_any_db.audit_events(action="audit.verify")
    assert (event.details["intact"], event.details["first_broken_id"]) == (False, target.id)


async def test_a_deleted_event_is_reported_at_the_next_one(api_any_db: Harness) -> None:
    await _activity(api_any_db)
    events = await api_any_db.audit_events()
    gone = events[10]
    await tamper(api_any_db, f"DELETE FROM audit_event WHERE id = {gone.id}")

    report = await verify(api_any_db)

    assert report["intact"] is False
    assert report["first_broken"] == {
        "id": events[11].id,
        "reason": "prev_hash mismatch",
        "expected": events[9].hash,
        "found": gone.hash,
    }


async def test_a_deleted_first_event_is_reported(api: Harness) -> None:
    await _activity(api)
    events = await api.audit_events()
    await tamper(api, f"DELETE FROM audit_event WHERE id = {events[0].id}")

    report = await verify(api)

    assert report["first_broken"] == {
        "id": events[1].id,
        "reason": "prev_hash mismatch",
        "expected": GENESIS,
        "found": events[0].hash,
    }


async def test_an_edit_with_a_recomputed_hash_breaks_the_next_link(api: Harness) -> None:
    # given an attacker who edits an event and recomputes that event's own hash
    await insert_events(api, 50)
    events = await api.audit_events()
    target = events[20]
    forged = link(target.prev_hash, {**target.model_dump(), "actor": "someone-else"})
    await tamper(
        api,
        f"UPDATE audit_event SET actor = 'someone-else', hash = '{forged}' WHERE id = {target.id}",
    )

    report = await verify(api)

    assert report["first_broken"] == {
        "id": events[21].id,
        "reason": "prev_hash mismatch",
        "expected": forged,
        "found": target.hash,
    }


async def test_a_rewritten_chain_needs_an_external_anchor(api: Harness) -> None:
    # given an anchor copied elsewhere, then an attacker with full write access who edits an
    # event, re-chains everything after it and drops the newest event
    await insert_events(api, 30)
    anchor = await verify(api)
    events = (await api.audit_events())[:-1]
    statements = [f"DELETE FROM audit_event WHERE id > {events[-1].id}"]
    previous = events[9].prev_hash
    for index, event in enumerate(events[9:]):
        fields = {**event.model_dump(), **({"actor": "someone-else"} if index == 0 else {})}
        digest = link(previous, fields)
        statements.append(
            f"UPDATE audit_event SET actor = '{fields['actor']}', prev_hash = '{previous}', "
            f"hash = '{digest}' WHERE id = {event.id}"
        )
        previous = digest
    await tamper(api, *statements)

    # when the chain is verified again
    report = await verify(api)

    # then the chain alone looks intact: only the anchor shows that history changed
    assert report["intact"] is True
    tail = await verify(api, since_id=anchor["last_id"])
    assert tail["intact"] is True
    assert tail["since_hash"] != anchor["last_hash"]


async def test_verifying_the_tail_from_an_anchor(api: Harness) -> None:
    # given an anchor taken earlier, then more events
    await insert_events(api, 40)
    anchor = await verify(api)
    await insert_events(api, 25, seed=2)

    events = await api.audit_events()

    # when only the tail is verified
    tail = await verify(api, since_id=anchor["last_id"])

    # then the anchor event and everything after it were checked, starting from the anchor
    assert tail == {
        "intact": True,
        "events": len(events) - anchor["last_id"] + 1,
        "last_id": events[-1].id,
        "last_hash": events[-1].hash,
        "head": {"id": events[-1].id, "hash": events[-1].hash},
        "since_id": anchor["last_id"],
        "since_hash": anchor["last_hash"],
    }
    # an edit after the anchor is found; one before it is out of the tail's scope
    await tamper(api, "UPDATE audit_event SET actor = 'x' WHERE id IN (5, 50)")
    assert (await verify(api, since_id=anchor["last_id"]))["first_broken"]["id"] == 50
    assert (await verify(api))["first_broken"]["id"] == 5


@pytest.mark.parametrize(
    "params",
    [{"since_id": "abc"}, {"since_id": "0"}, {"since_id": "999999"}, {"from": "3"}],
)
async def test_invalid_verify_parameters_are_422(api: Harness, params: dict[str, Any]) -> None:
    await insert_events(api, 5)

    response = await audit_get(api, "/audit/verify", **params)

    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"


async def test_breaks_at_batch_boundaries_are_found(api: Harness) -> None:
    # given a chain read in batches of 7
    await insert_events(api, 60)
    engine = api.runtime.engine
    assert (await verify_chain(engine, batch_size=7))["events"] == 60

    # then a missing first event of a batch, and an edited last event of one, are found
    await tamper(api, "DELETE FROM audit_event WHERE id = 15")
    report = await verify_chain(engine, batch_size=7)
    assert report["first_broken"]["id"] == 16
    assert report["first_broken"]["reason"] == "prev_hash mismatch"
    await tamper(api, "UPDATE audit_event SET action = 'x' WHERE id = 14")
    assert (await verify_chain(engine, batch_size=7))["first_broken"]["id"] == 14


async def test_concurrent_writers_keep_one_linear_chain(api_any_db: Harness) -> None:
    # given 50 concurrent API requests (state changes, reads, refusals) while the audit
    # writer's group commits and direct appends run alongside
    api = api_any_db
    requests = []
    for i in range(50):
        if i % 3 == 0:
            requests.append(api.post("/canary/promote", {"service": f"svc-{i}", "version": "v2"}))
        elif i % 3 == 1:
            requests.append(api.get(f"/canary/svc-{i - 1}"))
        else:
            # (each refused by its own caller: under the per-caller refusal limit)
            requests.append(
                api.post("/canary/promote", {"service": "x"}, role="viewer", subject=f"v-{i}")
            )
    writer_rows = [
        event_row(at=api.clock(), actor="controller", source=Source.CONTROLLER, action="tick",
                  outcome=Outcome.SUCCESS, details={"n": i})
        for i in range(120)
    ]  # fmt: skip

    async def direct_appends() -> None:
        for first in range(0, 60, 6):
            async with api.runtime.engine.begin() as connection:
                await chain.append(connection, writer_rows[first : first + 6])

    responses, *_ = await asyncio.gather(
        asyncio.gather(*requests),
        asyncio.gather(*(api.runtime.audit_writer.write(row) for row in writer_rows[60:])),
        direct_appends(),
    )
    assert sorted({r.status_code for r in responses}) == [200, 403, 404]

    # then the events form one chain: intact, each event the successor of exactly one other
    events = await api.audit_events()
    assert len(events) == 50 + 120
    report = await verify(api)
    assert (report["intact"], report["events"]) == (True, 170)
    async with api.runtime.engine.connect() as connection:
        shared = (
            await connection.execute(
                sa.text("SELECT prev_hash FROM audit_event GROUP BY prev_hash HAVING count(*) > 1")
            )
        ).all()
    assert shared == []


async def test_large_floats_in_details_survive_verification(api: Harness) -> None:
    async with api.runtime.engine.begin() as connection:
        await chain.append(
            connection,
            [event_row(at=api.clock(), actor="controller", source=Source.CONTROLLER,
                       action="gate.check", outcome=Outcome.SUCCESS,
                       details={"value": 1e16})],
        )  # fmt: skip

    assert (await verify(api))["intact"] is True


# --- the documented PostgreSQL grants --------------------------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "audit.md"


def _statements(block: str, names: dict[str, str]) -> list[str]:
    for placeholder, name in names.items():
        block = re.sub(rf"\b{placeholder}\b", name, block)
    lines = [line.split("--")[0] for line in block.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def _dsn(user: str, database: str) -> str:
    base = urlsplit(PG_ADMIN_DSN)
    netloc = f"{user}:change-me@{base.hostname}:{base.port or 5432}"
    return urlunsplit((base.scheme, netloc, f"/{database}", "", ""))


async def test_the_documented_grants_make_the_table_append_only(key_file: Path) -> None:
    # given the roles, database and grants exactly as docs/audit.md writes them
    suffix = uuid.uuid4().hex[:8]
    names = {
        "opsapi_migrator": f"opsapi_mig_{suffix}",
        "opsapi_app": f"opsapi_app_{suffix}",
        "opsapi": f"opsapi_grants_{suffix}",
    }
    setup, grants, checks = re.findall(r"```sql\n(.*?)```", DOC.read_text(), re.S)
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        for statement in _statements(setup, names):
            await admin.execute(statement)
        migrator_dsn = _dsn(names["opsapi_migrator"], names["opsapi"])
        engine = create_engine(migrator_dsn.replace("postgresql://", "postgresql+asyncpg://"))
        await upgrade(engine)
        await engine.dispose()
        migrator = await asyncpg.connect(migrator_dsn)
        try:
            for statement in _statements(grants, names):
                await migrator.execute(statement)
            listed, denied = _statements(checks, names)
            assert [r[0] for r in await migrator.fetch(listed)] == ["INSERT", "SELECT"]
            assert await migrator.fetchval(denied) is False
            # the owner is still stopped by the (statement-level) trigger
            with pytest.raises(asyncpg.RaiseError, match="append-only"):
                await migrator.execute("TRUNCATE audit_event")
        finally:
            await migrator.close()

        # then the application role can append and read, and nothing else
        app_dsn = _dsn(names["opsapi_app"], names["opsapi"])
        app = await asyncpg.connect(app_dsn)
        try:
            for statement, refusal in [
                ("UPDATE audit_event SET actor = 'x'", "permission denied"),
                ("DELETE FROM audit_event", "permission denied"),
                ("TRUNCATE audit_event", "permission denied"),
                ("SELECT setval('audit_event_id_seq', 1)", "permission denied"),
                ("ALTER TABLE audit_event DISABLE TRIGGER audit_event_append_only", "owner"),
                ("DROP TABLE audit_event", "owner"),
                ("SET session_replication_role = replica", "permission denied"),
            ]:
                with pytest.raises(asyncpg.PostgresError, match=refusal):
                    await app.execute(statement)
        finally:
            await app.close()

        # and the server runs normally as that role
        app_url = app_dsn.replace("postgresql://", "postgresql+asyncpg://")
        async with running_app(app_url, key_file, migrate_on_start=False) as api:
            started = await api.post("/canary/promote", {"service": "checkout", "version": "v2"})
            assert started.status_code == 200, started.text
            page = await audit_get(api, "/audit", service="checkout")
            assert [item["action"] for item in page.json()["items"]] == ["canary.promote"]
            assert (await verify(api))["intact"] is True
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{names["opsapi"]}" WITH (FORCE)')
        for role in ("opsapi_app", "opsapi_migrator"):
            await admin.execute(f'DROP ROLE IF EXISTS "{names[role]}"')
        await admin.close()
