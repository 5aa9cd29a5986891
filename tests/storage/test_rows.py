"""Plain SQL reads (`opsapi.storage.rows`): the same records as an ORM load, in the session's
own transaction, and a lost connection fails as the database being unavailable."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import DBAPIError
from sqlmodel import SQLModel, select

from opsapi.audit import chain
from opsapi.audit import service as audit
from opsapi.audit.models import AuditEvent, Outcome, Source
from opsapi.canary.machine import State
from opsapi.canary.models import FreezeRecord, Incident, RolloutRecord, ServiceRecord
from opsapi.gates.models import GateEvaluation
from opsapi.pagerduty.models import OutboxMessage
from opsapi.storage import rows
from opsapi.storage.db import SessionFactory, create_engine, is_unavailable, session_factory
from opsapi.storage.migrate import upgrade

NOW = datetime(2026, 11, 30, 6, 0, 0, 123456, tzinfo=UTC)


def _records() -> list[SQLModel]:
    rollout = RolloutRecord(
        service="checkout", state=State.PAUSED, canary_version="v2", stable_version=None,
        steps=[{"weight": 10, "wait_seconds": 1.5}], step_index=0, desired_weight=10,
        step_started_at=NOW, paused_at=NOW + timedelta(seconds=1), auto_promote=True,
        router={"name": "pull", "nested": {"a": [1, None, "ü"]}}, triggered_by="user",
        created_by="alice", created_at=NOW, updated_at=NOW, lease_seconds=None,
        time_to_safe={"detected_at": NOW.isoformat()},
    )  # fmt: skip
    return [
        ServiceRecord(name="checkout", policy={"bake": "1h"}, updated_at=NOW, updated_by="a"),
        rollout,
        Incident(
            id="P1",
            service="checkout",
            number=7,
            title="down",
            status="triggered",
            opened_at=NOW,
            updated_at=NOW,
        ),
        FreezeRecord(
            name="xmas",
            services=["checkout"],
            reason="code freeze",
            starts_at=NOW,
            ends_at=NOW + timedelta(days=1),
            created_by="admin",
            created_at=NOW,
        ),
    ]


QUERIES: list[tuple[type[SQLModel], str, tuple[Any, ...]]] = [
    (ServiceRecord, "SELECT * FROM service WHERE name = $1", ("checkout",)),
    (RolloutRecord, "SELECT * FROM rollout WHERE service = $1 ORDER BY id DESC", ("checkout",)),
    (Incident, "SELECT * FROM incident WHERE service = $1 AND resolved_at IS NULL", ("checkout",)),
    (FreezeRecord, "SELECT * FROM freeze_window WHERE deleted_at IS NULL", ()),
]


async def test_plain_reads_give_what_the_orm_loads(sessions: SessionFactory) -> None:
    # given rows of every kind the hot paths read, written through the ORM
    async with sessions() as session, session.begin():
        session.add_all(_records())
    for model, sql, args in QUERIES:
        # when each is read through the ORM and as plain SQL
        async with sessions() as session:
            loaded = (await session.exec(select(model))).all()
        async with sessions() as session:
            read = await rows.fetch_records(session, model, sql, *args)
        # then the records are equal, column by column and type by type
        assert [r.model_dump() for r in read] == [r.model_dump() for r in loaded], model
        for ours, theirs in zip(read, loaded, strict=True):
            assert {k: type(v) for k, v in ours.model_dump().items()} == {
                k: type(v) for k, v in theirs.model_dump().items()
            }
    async with sessions() as session:
        (rollout,) = await rows.fetch_records(
            session, RolloutRecord, "SELECT * FROM rollout WHERE service = $1", "checkout"
        )
    assert rollout.state is State.PAUSED
    assert rollout.step_started_at == NOW
    assert rollout.step_started_at.tzinfo is not None
    assert rollout.auto_promote is True


async def test_a_plain_read_belongs_to_the_sessions_transaction(sessions: SessionFactory) -> None:
    async with sessions() as session, session.begin():
        # given a row written but not committed by this session
        session.add(_records()[0])
        await session.flush()
        # when the same session reads it as plain SQL (FOR UPDATE is SQLite-safe)
        found = await rows.fetch_records(
            session, ServiceRecord, "SELECT * FROM service WHERE name = $1 FOR UPDATE",
            "checkout",
        )  # fmt: skip
        # then it sees its own write
        assert [record.name for record in found] == ["checkout"]
        await session.rollback()
    async with sessions() as session:
        assert await rows.fetch_records(session, ServiceRecord, "SELECT * FROM service") == []


async def test_a_first_plain_read_begins_the_transaction(pg_url: str) -> None:
    # (without it a read first in a session would run outside the transaction that follows)
    engine = create_engine(pg_url, pool_size=2)
    try:
        async with session_factory(engine)() as session:
            found, _ = await rows.fetch(session, "SELECT pg_backend_pid() AS pid")
            pid = found[0]["pid"]
            async with engine.connect() as other:
                state = await other.scalar(
                    text("SELECT state FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
                )
            assert state == "idle in transaction"
    finally:
        await engine.dispose()


async def test_a_write_alone_commits_by_itself_unless_a_transaction_is_open(pg_url: str) -> None:
    engine = create_engine(pg_url, pool_size=2)
    await upgrade(engine)
    sessions = session_factory(engine)
    update = "UPDATE service SET updated_by = $1 WHERE name = $2"
    read = "SELECT updated_by FROM service WHERE name = $1"
    try:
        # given a stored service
        async with sessions() as session, session.begin():
            await rows.save(session, _records()[0])
        # when a session writes alone and is closed without a commit
        async with sessions() as session:
            await rows.execute_alone(session, update, "bob", "checkout")
        # then the write is kept (one statement, committed by itself)
        async with sessions() as other:
            assert (await rows.fetch(other, read, "checkout"))[0] == [{"updated_by": "bob"}]
        # but inside a transaction the session began, it is that transaction's
        async with sessions() as session:
            await rows.fetch(session, read, "checkout")  # begins the transaction
            await rows.execute_alone(session, update, "carol", "checkout")
            await session.rollback()
        async with sessions() as other:
            assert (await rows.fetch(other, read, "checkout"))[0] == [{"updated_by": "bob"}]
    finally:
        await engine.dispose()


async def test_a_lost_connection_is_unavailable_and_never_reused(pg_url: str) -> None:
    engine = create_engine(pg_url, pool_size=1)
    sessions = session_factory(engine)
    try:
        async with sessions() as session:
            (row,), _ = await rows.fetch(session, "SELECT pg_backend_pid() AS pid")
        before = row["pid"]
        # given the pooled connection's backend killed behind its back
        async with engine.connect() as other:
            await other.execute(text("SELECT 1"))  # the same pooled connection: pool_size=1
        killer = create_engine(pg_url, pool_size=1)
        async with killer.connect() as connection:
            await connection.execute(text(f"SELECT pg_terminate_backend({before})"))
        await killer.dispose()
        # when a plain read runs on it
        with pytest.raises(DBAPIError) as raised:
            async with sessions() as session:
                await rows.fetch(session, "SELECT 1 AS one")
        # then the failure says the database is unavailable (503, not 500) …
        assert is_unavailable(raised.value)
        # … and the next read gets a new connection
        async with sessions() as session:
            (row,), _ = await rows.fetch(session, "SELECT pg_backend_pid() AS pid")
        assert row["pid"] != before
    finally:
        await engine.dispose()


async def test_a_locked_read_is_tracked_and_its_change_written(sessions: SessionFactory) -> None:
    sql = "SELECT * FROM service WHERE name = $1 FOR UPDATE"
    async with sessions() as session, session.begin():
        session.add(_records()[0])
    # given a row read with its lock after the session had loaded it without one
    async with sessions() as session, session.begin():
        held = await session.get(ServiceRecord, "checkout")
        assert held is not None
        # (the row changed since: the session's instance still shows what it read)
        await session.exec(text("UPDATE service SET stable_version = 'v1'"))  # type: ignore[call-overload]
        assert held.stable_version is None
        (locked,) = await rows.lock_records(session, ServiceRecord, sql, "checkout")
        # then the session's own instance carries what the locked read saw
        assert locked is held
        assert locked.stable_version == "v1"
        # and a change to it is written by the flush, nothing else
        locked.previous_version = "v0"
    async with sessions() as session, session.begin():
        (fresh,) = await rows.lock_records(session, ServiceRecord, sql, "checkout")
        assert (fresh.stable_version, fresh.previous_version) == ("v1", "v0")
        fresh.updated_by = "bob"
    async with sessions() as session:
        stored = await session.get(ServiceRecord, "checkout")
        assert stored is not None
        assert (stored.updated_by, stored.policy) == ("bob", {"bake": "1h"})


def test_a_fresh_process_can_read_before_any_orm_query(tmp_path: Path) -> None:
    # (the ORM sets its mappers up on its first query; a server's first request may read here
    # first, and building a record then must not fail)
    script = tmp_path / "first.py"
    script.write_text(
        "import asyncio\n"
        "from opsapi.canary.models import ServiceRecord\n"
        "from opsapi.storage import rows\n"
        "from opsapi.storage.db import create_engine, session_factory\n"
        "from opsapi.storage.migrate import upgrade\n"
        "async def main():\n"
        f"    engine = create_engine({f'sqlite+aiosqlite:///{tmp_path}/db.sqlite'!r})\n"
        "    await upgrade(engine)\n"
        "    async with engine.begin() as c:\n"
        '        await c.exec_driver_sql("INSERT INTO service (name, policy, updated_at, '
        "updated_by) VALUES ('a', '{}', '2026-01-01 00:00:00.000000', 'x')\")\n"
        "    async with session_factory(engine)() as session:\n"
        "        (record,) = await rows.fetch_records(session, ServiceRecord, "
        "'SELECT * FROM service')\n"
        "    print(record.name, record.updated_at.isoformat())\n"
        "asyncio.run(main())\n"
    )
    command = [sys.executable, str(script)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["a", "2026-01-01T00:00:00+00:00"]


async def test_save_writes_what_a_flush_would(sessions: SessionFactory) -> None:
    sql = "SELECT * FROM rollout WHERE service = $1 FOR UPDATE"
    # given a new rollout saved (inserted) with plain SQL
    async with sessions() as session, session.begin():
        rollout = _records()[1]
        assert isinstance(rollout, RolloutRecord)
        await rows.save(session, rollout)
        # then it has its generated id and is stored, without being the session's (the
        # commit's flush has nothing to walk); a change is written by the next save
        assert rollout.id == 1
        assert inspect(rollout).key is not None
        assert rollout not in session
        rollout.generation += 1
        await rows.save(session, rollout)
    # when a locked read of it changes some columns and saves
    async with sessions() as session, session.begin():
        (locked,) = await rows.lock_records(session, RolloutRecord, sql, "checkout")
        await rows.save(session, locked)  # nothing changed: no statement, no failure
        locked.state = State.ROLLED_BACK
        locked.desired_weight = 0
        locked.finished_at = NOW + timedelta(minutes=5)
        locked.time_to_safe = {"decided_at": "now"}
        await rows.save(session, locked)
        # (saved: the commit's own flush has nothing left to write)
        assert not session.is_modified(locked)
    # then the ORM reads back exactly that, and the other columns as they were
    async with sessions() as session:
        stored = await session.get(RolloutRecord, 1)
    assert stored is not None
    assert stored.state is State.ROLLED_BACK
    assert (stored.desired_weight, stored.generation) == (0, 1)
    assert stored.finished_at == NOW + timedelta(minutes=5)
    assert stored.time_to_safe == {"decided_at": "now"}
    assert stored.router == {"name": "pull", "nested": {"a": [1, None, "ü"]}}
    assert stored.paused_at == NOW + timedelta(seconds=1)


def _rollout_values() -> dict[str, Any]:
    return dict(
        service="checkout", state=State.PROGRESSING, canary_version="v2", steps=[{"weight": 10}],
        step_index=0, desired_weight=10, step_started_at=NOW, router={"name": "pull"},
        triggered_by="user", created_by="alice", created_at=NOW, updated_at=NOW,
    )  # fmt: skip


async def test_a_new_record_built_without_validation_is_what_the_model_builds(
    sessions: SessionFactory,
) -> None:
    # given the same values built by the model (validated) and by rows.new (trusted)
    built = RolloutRecord(**_rollout_values())
    fast = rows.new(RolloutRecord, **_rollout_values())
    # then every field is the same, defaults included (fresh ones from a default factory)
    assert fast.model_dump() == built.model_dump()
    assert fast.gates == []
    assert fast.gates is not rows.new(RolloutRecord, **_rollout_values()).gates
    # and saving it inserts it as a flush would
    async with sessions() as session, session.begin():
        await rows.save(session, fast)
        assert fast.id is not None
        assert inspect(fast).key is not None
    async with sessions() as session:
        stored = await session.get(RolloutRecord, fast.id)
    assert stored is not None
    assert stored.model_dump() == fast.model_dump()


@pytest.mark.parametrize(
    ("change", "message"),
    [({"service": None}, "is required"), ({"colour": "red"}, "has no field colour")],
    ids=["missing", "unknown"],
)
def test_a_new_record_refuses_a_missing_or_unknown_field(
    change: dict[str, Any], message: str
) -> None:
    values = {**_rollout_values(), **change}
    values = {name: value for name, value in values.items() if value is not None}
    with pytest.raises(TypeError, match=message):
        rows.new(RolloutRecord, **values)


def test_an_update_numbers_its_parameters_from_where_it_is_placed() -> None:
    update = rows.Update("rollout", ["state", "reason"], "id", ["rolled_back", "why", 7])
    assert update.sql() == "UPDATE rollout SET state = $1, reason = $2 WHERE id = $3"
    assert update.sql(13) == "UPDATE rollout SET state = $13, reason = $14 WHERE id = $15"


async def _stored_rollout(sessions: SessionFactory) -> int:
    """The id of a rollout stored (committed) with `_rollout_values`."""
    async with sessions() as session, session.begin():
        rollout = RolloutRecord(**_rollout_values())
        await rows.save(session, rollout)
    assert rollout.id is not None
    return rollout.id


def _evaluations_of(rollout_id: int, count: int) -> list[dict[str, Any]]:
    return [
        {
            "rollout_id": rollout_id, "at": NOW + timedelta(seconds=i), "gate": f"gate-{i}",
            "step_index": 0, "weight": 10, "phase": "passing" if i % 2 else "failing",
            "value": i / 3 if i % 3 else None, "threshold": 0.05, "breached": i % 2 == 0,
            "detail": None if i % 2 else f"détail {i}",
        }
        for i in range(count)
    ]  # fmt: skip


async def _changed(
    session: Any, rollout_id: int, **values: Any
) -> tuple[RolloutRecord, rows.Update]:
    """The stored rollout, read and changed in `session`, with its pending UPDATE."""
    (locked,) = await rows.fetch_records(
        session, RolloutRecord, "SELECT * FROM rollout WHERE id = $1", rollout_id
    )
    rows.persistent(locked)
    rows.assign(locked, **values)
    update = await rows.pending_update(session, locked)
    assert update is not None
    return locked, update


async def _stored_evaluations(sessions: SessionFactory, names: Any) -> list[dict[str, Any]]:
    async with sessions() as session:
        stored = (await session.exec(select(GateEvaluation).order_by(GateEvaluation.id))).all()  # type: ignore[arg-type]
    return [{name: getattr(row, name) for name in names} for row in stored]


# 40 evaluations x 10 columns: more parameters than one statement carries (written before).
@pytest.mark.parametrize("evaluations", [0, 3, 40], ids=["alone", "with-3-rows", "with-40-rows"])
async def test_a_change_written_with_its_audit_event_lands_with_it(
    sessions: SessionFactory, evaluations: int
) -> None:
    # given a stored rollout, changed, its UPDATE pending, and evaluations of it pending
    async with sessions() as session, session.begin():
        rollout = _records()[1]
        assert isinstance(rollout, RolloutRecord)
        await rows.save(session, rollout)
    assert rollout.id is not None
    measured = _evaluations_of(rollout.id, evaluations)
    async with sessions() as session, session.begin():
        locked, update = await _changed(
            session, rollout.id, state=State.ROLLED_BACK, reason="bad canary"
        )
        assert list(update.columns) == ["state", "reason"]
        insert = await rows.pending_insert(session, GateEvaluation, measured)
        # when the audit event is appended alongside them (one statement on PostgreSQL)
        await audit.record(
            session=session, alongside=[insert, update], at=NOW, actor="alice",
            source=Source.API, action="canary.rollback", outcome=Outcome.SUCCESS,
            service="checkout", rollout_id=locked.id, details={"reason": "bad canary"},
        )  # fmt: skip
        # (nothing is left for a later save)
        assert await rows.pending_update(session, locked) is None
    # then all are stored, and the chain holds the event
    async with sessions() as session:
        stored = await session.get(RolloutRecord, rollout.id)
        events = (await session.exec(select(AuditEvent))).all()
    assert stored is not None
    assert (stored.state, stored.reason) == (State.ROLLED_BACK, "bad canary")
    assert [(event.action, event.rollout_id) for event in events] == [
        ("canary.rollback", rollout.id)
    ]
    assert events[0].hash == chain.link(chain.GENESIS, events[0].model_dump())
    if measured:
        assert await _stored_evaluations(sessions, measured[0]) == measured


@pytest.mark.parametrize("evaluations", [0, 3, 40], ids=["none", "3-rows", "40-rows"])
async def test_writes_run_together_all_land(sessions: SessionFactory, evaluations: int) -> None:
    # given a stored rollout, changed, and evaluations of it, all pending
    rollout_id = await _stored_rollout(sessions)
    measured = _evaluations_of(rollout_id, evaluations)
    async with sessions() as session, session.begin():
        _, update = await _changed(session, rollout_id, desired_weight=25, reason="promoted")
        # when they run together (one statement on PostgreSQL when they fit in one)
        insert = await rows.pending_insert(session, GateEvaluation, measured)
        await rows.run_together(session, [insert, update])
    # then each landed with its own values
    async with sessions() as session:
        stored = await session.get(RolloutRecord, rollout_id)
    assert stored is not None
    assert (stored.desired_weight, stored.reason) == (25, "promoted")
    if measured:
        assert await _stored_evaluations(sessions, measured[0]) == measured


def test_writes_carried_by_a_statement_number_their_parameters_after_its_own() -> None:
    table = GateEvaluation.__table__  # type: ignore[attr-defined]
    insert = rows.Insert(table, ("gate", "value"), [("a", 1.0), ("b", None)])
    update = rows.Update("rollout", ["state"], "id", ["rolled_back", 7])
    carried = rows.carried([insert, update], 4)
    assert carried == (
        "WITH w0 AS (INSERT INTO gate_evaluation (gate, value) VALUES ($4, $5), ($6, $7)), "
        "w1 AS (UPDATE rollout SET state = $8 WHERE id = $9) ",
        ["a", 1.0, "b", None, "rolled_back", 7],
    )
    # an insert of more rows than one statement takes is not carried (it runs on its own)
    many = rows.Insert(table, ("gate", "value"), [("x", 0.0)] * 101)
    assert rows.carried([many, update], 4) is None


@pytest.mark.parametrize("orm_pending", [False, True], ids=["plain-sql-only", "orm-pending"])
async def test_commit_makes_every_write_of_the_transaction_durable(
    sessions: SessionFactory, orm_pending: bool
) -> None:
    # given a transaction that wrote with plain SQL, and perhaps left an ORM object to flush
    service, rollout = _records()[:2]
    async with sessions() as session:
        await rows.save(session, rollout)
        if orm_pending:
            session.add(service)
        # when it is committed, and the session then closed
        await rows.commit(session)
    # then what it wrote is there for everyone (the close undid nothing)
    async with sessions() as session:
        stored = (await session.exec(select(RolloutRecord))).all()
        services = (await session.exec(select(ServiceRecord))).all()
    assert [record.service for record in stored] == ["checkout"]
    assert [record.name for record in services] == (["checkout"] if orm_pending else [])


REFUSE_AT_COMMIT = (
    "CREATE FUNCTION test_refuse_at_commit() RETURNS trigger AS $$ "
    "BEGIN RAISE EXCEPTION 'refused at commit'; END $$ LANGUAGE plpgsql",
    "CREATE CONSTRAINT TRIGGER test_refuse_at_commit AFTER INSERT ON rollout "
    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION test_refuse_at_commit()",
)


@pytest.mark.parametrize("commit", ["rows.commit", "session.commit"])
async def test_a_commit_the_database_refuses_raises_and_keeps_nothing(
    pg_url: str, commit: str
) -> None:
    # given a database that refuses, at COMMIT, any transaction that inserted a rollout
    engine = create_engine(pg_url)
    sessions = session_factory(engine)
    async with engine.begin() as connection:
        for statement in REFUSE_AT_COMMIT:
            await connection.exec_driver_sql(statement)
    try:
        # when a transaction that inserted one is committed on the driver
        async with sessions() as session:
            await rows.save(session, _records()[1])
            with pytest.raises(DBAPIError, match="refused at commit"):
                await (rows.commit(session) if commit == "rows.commit" else session.commit())
        # then it raised as SQLAlchemy raises, and nothing was kept; the pool is usable
        async with sessions() as session:
            assert (await session.exec(select(RolloutRecord))).all() == []
    finally:
        async with engine.begin() as connection:
            await connection.exec_driver_sql("DROP TRIGGER test_refuse_at_commit ON rollout")
            await connection.exec_driver_sql("DROP FUNCTION test_refuse_at_commit()")
        await engine.dispose()


@pytest.mark.parametrize(
    ("finish", "kept"),
    [("rows.commit", True), ("session.commit", True), ("session.rollback", False),
     ("close", False)],
)  # fmt: skip
async def test_plain_sql_and_the_orm_in_one_session_are_one_transaction(
    pg_url: str, finish: str, kept: bool
) -> None:
    # (the session checks a connection out itself for plain SQL; the ORM must join it)
    engine = create_engine(pg_url, pool_size=2)
    sessions = session_factory(engine)
    service, rollout = _records()[:2]
    try:
        async with sessions() as session:
            # given a plain-SQL write, then an ORM write and an ORM read in the same session
            await rows.save(session, rollout)
            (plain,), _ = await rows.fetch(session, "SELECT pg_backend_pid() AS pid")
            session.add(service)
            await session.flush()
            orm_pid = (await session.exec(text("SELECT pg_backend_pid()"))).one()[0]
            # then both ran on one connection
            assert orm_pid == plain["pid"]
            # when the session ends one way or another
            if finish == "rows.commit":
                await rows.commit(session)
            elif finish == "session.commit":
                await session.commit()
            elif finish == "session.rollback":
                await session.rollback()
        # then both writes were kept, or neither
        async with sessions() as session:
            stored = (await session.exec(select(RolloutRecord))).all()
            services = (await session.exec(select(ServiceRecord))).all()
        assert (len(stored), len(services)) == ((1, 1) if kept else (0, 0))
        # and the connection went back to the pool with no transaction open
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        observer = create_engine(pg_url, pool_size=1)
        async with observer.connect() as other:
            states = (
                (
                    await other.execute(
                        text("SELECT state FROM pg_stat_activity WHERE pid = :pid"),
                        {"pid": plain["pid"]},
                    )
                )
                .scalars()
                .all()
            )
        await observer.dispose()
        assert states == ["idle"]
    finally:
        await engine.dispose()


async def test_many_sessions_share_the_pool_and_return_every_connection(pg_url: str) -> None:
    # given a pool of 2 (+1 overflow) and 20 sessions writing at once, each with plain SQL
    engine = create_engine(pg_url, pool_size=2)
    sessions = session_factory(engine)

    async def write(n: int) -> None:
        async with sessions() as session:
            record = ServiceRecord(name=f"svc-{n}", policy={}, updated_at=NOW, updated_by="a")
            await rows.save(session, record)
            await asyncio.sleep(0.01)  # hold the connection a moment
            await rows.commit(session)

    try:
        # when they all finish
        await asyncio.gather(*(write(n) for n in range(20)))
        # then every write is there and every connection is back
        async with sessions() as session:
            names = (await session.exec(select(ServiceRecord.name))).all()
        assert sorted(names) == sorted(f"svc-{n}" for n in range(20))
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await engine.dispose()


async def test_a_rollback_undoes_plain_sql_and_the_session_goes_on(
    sessions: SessionFactory,
) -> None:
    service, rollout = _records()[:2]
    async with sessions() as session:
        # given a plain-SQL write rolled back (no ORM work in the session)
        await rows.save(session, rollout)
        await session.rollback()
        # when the session writes again and commits
        await rows.insert(session, ServiceRecord, [service.model_dump()])
        await session.commit()
    # then only the second write is there
    async with sessions() as session:
        assert (await session.exec(select(RolloutRecord))).all() == []
        assert [r.name for r in (await session.exec(select(ServiceRecord))).all()] == ["checkout"]


@pytest.mark.parametrize("orm_first", [False, True], ids=["plain-sql-first", "orm-first"])
async def test_after_a_database_restart_only_the_request_in_flight_fails(
    pg_url: str, orm_first: bool
) -> None:
    engine = create_engine(pg_url, pool_size=3)
    sessions = session_factory(engine)

    async def backend_pid(hold: asyncio.Event | None = None) -> int:
        async with sessions() as session:
            if orm_first:
                await session.connection()  # the ORM's transaction, then plain SQL in it
            (row,), _ = await rows.fetch(session, "SELECT pg_backend_pid() AS pid")
            if hold is not None:
                await hold.wait()
            return int(row["pid"])

    try:
        # given three pooled connections, all opened before the "restart"
        release = asyncio.Event()
        held = [asyncio.create_task(backend_pid(release)) for _ in range(3)]
        await asyncio.sleep(0.2)
        release.set()
        before = set(await asyncio.gather(*held))
        assert len(before) == 3
        killer = create_engine(pg_url, pool_size=1)
        async with killer.connect() as connection:
            for pid in before:
                await connection.execute(text(f"SELECT pg_terminate_backend({pid})"))
        await killer.dispose()
        # when the first request after it fails on a dead connection
        with pytest.raises(DBAPIError) as raised:
            await backend_pid()
        assert is_unavailable(raised.value)
        # then the next requests all succeed, each on a new connection
        after = [await backend_pid() for _ in range(5)]
        assert not before & set(after)
    finally:
        await engine.dispose()


@pytest.mark.parametrize("count", [1, 3, 40], ids=["one-row", "one-statement", "pipelined"])
async def test_inserted_rows_are_what_the_orm_reads_back_in_order(
    sessions: SessionFactory, count: int
) -> None:
    # given a rollout, and `count` evaluations of it (40 x 10 columns: more parameters than
    # one statement takes, so they go row by row)
    rollout_id = await _stored_rollout(sessions)
    evaluations = _evaluations_of(rollout_id, count)
    # when they are inserted in one call
    async with sessions() as session, session.begin():
        await rows.insert(session, GateEvaluation, evaluations)
    # then each row holds its own values, as the ORM reads them back
    assert await _stored_evaluations(sessions, evaluations[0]) == evaluations


def _closed_in_place(session: Any) -> bool:
    """Whether leaving the session's `async with` finished without suspending (no task, no
    trip through the loop): what SQLAlchemy's own exit never does."""
    exit_ = session.__aexit__(None, None, None)
    try:
        exit_.send(None)
    except StopIteration:
        return True
    exit_.close()
    return False


async def test_a_session_with_nothing_open_closes_in_place_and_the_pool_stays_whole(
    pg_url: str,
) -> None:
    # given a pool of one connection (+1 overflow)
    engine = create_engine(pg_url, pool_size=2)
    await upgrade(engine)
    sessions = session_factory(engine)
    service = ServiceRecord(name="checkout", policy={}, updated_at=NOW, updated_by="a")
    try:
        # when a session's plain SQL is committed, then a session with nothing done at all
        session = sessions()
        await rows.save(session, service)
        await rows.commit(session)
        # then each closes in place, its connection back in the pool
        assert _closed_in_place(session)
        assert _closed_in_place(sessions())
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]

        # when a session leaves its transaction open, or the ORM's, they close the slow way:
        # rolled back, the connection back in the pool
        service.updated_by = "b"
        async with sessions() as open_plain:
            await rows.save(open_plain, service)
            assert not open_plain.sync_session.closes_at_once()  # type: ignore[attr-defined]
        async with sessions() as open_orm:
            await open_orm.exec(select(ServiceRecord))
            assert not open_orm.sync_session.closes_at_once()  # type: ignore[attr-defined]
        async with sessions() as session:
            assert (await rows.fetch(session, "SELECT updated_by FROM service"))[0] == [
                {"updated_by": "a"}
            ]
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]

        # when three sessions hold connections (one past the pool's size) and close
        held = [sessions() for _ in range(3)]
        for session in held:
            await rows.fetch(session, "SELECT 1")
            await rows.commit(session)
        in_place = []
        for session in held:
            in_place.append(session.sync_session.closes_at_once())  # type: ignore[attr-defined]
            await session.close()
        # then the first two go back into the pool in place; the third, for which the full pool
        # has no room, is closed through SQLAlchemy (closing the connection waits on it)
        assert in_place == [True, True, False]
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert engine.pool.checkedin() == 2  # type: ignore[attr-defined]
    finally:
        await engine.dispose()


def _outbox_rows(rollout_id: int, causes: list[str], text: str) -> list[dict[str, Any]]:
    return [
        {"kind": "notification", "cause": cause, "service": "checkout", "rollout_id": rollout_id,
         "channel": "ops", "dedup_key": cause, "routing_key": "", "payload": {"text": text},
         "state": "pending", "attempts": 0, "last_error": None, "next_attempt_at": NOW,
         "created_at": NOW, "delivered_at": None}
        for cause in causes
    ]  # fmt: skip


@pytest.mark.parametrize("how", ["alone", "carried", "row-by-row"])
async def test_an_insert_on_a_unique_column_skips_what_is_stored_and_goes_on(
    sessions: SessionFactory, how: str
) -> None:
    # given a rollout with one outbox row stored, for cause c-0
    rollout_id = await _stored_rollout(sessions)
    async with sessions() as session, session.begin():
        await rows.insert(session, OutboxMessage, _outbox_rows(rollout_id, ["c-0"], "first"))
    # when rows for c-0 again and for new causes are inserted skipping stored causes: alone,
    # carried by a rollout's update, or more than one statement takes (row by row)
    causes = [f"c-{i}" for i in range(20 if how == "row-by-row" else 3)]
    async with sessions() as session, session.begin():
        insert = await rows.pending_insert(
            session, OutboxMessage, _outbox_rows(rollout_id, causes, "second"), unique="cause"
        )
        assert insert.joinable is (how != "row-by-row")
        if how == "carried":
            _, update = await _changed(session, rollout_id, reason="carried")
            await rows.run_together(session, [insert, update])
        else:
            await insert.run(session)
    # then the stored row kept its content, each new cause landed once, and the transaction
    # committed whatever else it carried
    async with sessions() as session:
        stored = (await session.exec(select(OutboxMessage).order_by(OutboxMessage.id))).all()
        rollout = await session.get(RolloutRecord, rollout_id)
    assert [(row.cause, row.payload["text"]) for row in stored] == [
        ("c-0", "first"), *((cause, "second") for cause in causes[1:])
    ]  # fmt: skip
    assert rollout is not None
    assert rollout.reason == ("carried" if how == "carried" else None)


async def test_an_insert_refuses_a_unique_column_its_table_lacks(sessions: SessionFactory) -> None:
    async with sessions() as session:
        with pytest.raises(ValueError, match="no column"):
            await rows.pending_insert(session, OutboxMessage, [], unique="cause; DROP TABLE x")
