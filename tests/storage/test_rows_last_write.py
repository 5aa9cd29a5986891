"""A transaction's last write sent with its COMMIT (`rows.execute_last`): one message, so that
the locks it takes (the audit chain's, which every write waits for) are held for no round trip
to the application; what comes after it in the transaction still sees it, a refusal still
raises and keeps nothing, and its values reach the database as the prepared statement's do."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from opsapi.audit import service as audit
from opsapi.audit.models import AuditEvent, Outcome, Source
from opsapi.audit.verify import verify_chain
from opsapi.canary.models import ServiceRecord
from opsapi.storage import rows
from opsapi.storage.db import SessionFactory, create_engine, session_factory
from opsapi.storage.migrate import upgrade

NOW = datetime(2026, 12, 1, 6, 0, 0, 123456, tzinfo=UTC)
INSERT = "INSERT INTO service (name, policy, updated_at, updated_by) VALUES ($1, $2, $3, $4)"
CHAIN_LOCK = 724113002  # opsapi.audit.chain's append lock


def _service(name: str) -> tuple[Any, ...]:
    return (name, '{"bake": "1h"}', NOW, "alice")


@pytest.fixture
async def pg_sessions(pg_url: str) -> AsyncIterator[SessionFactory]:
    engine = create_engine(pg_url, pool_size=3)
    await upgrade(engine)
    yield session_factory(engine)
    await engine.dispose()


async def _logged(session: Any) -> tuple[list[str], Any]:
    """The messages the session's connection sends from now on (asyncpg's query log)."""
    found, _ = await rows.fetch(session, "SELECT 1 AS one")  # begins the transaction
    assert found == [{"one": 1}]
    link = rows._current_link(session)
    assert link is not None
    messages: list[str] = []
    link.adapted._connection.add_query_logger(lambda query: messages.append(query.query))
    return messages, link.adapted._connection


async def test_a_last_write_goes_with_the_commit_in_one_message(
    pg_sessions: SessionFactory, pg_url: str
) -> None:
    # given a transaction begun by a read
    async with pg_sessions() as session:
        messages, driver = None, None
        async with rows.transaction(session):
            messages, driver = await _logged(session)
            # when its last write is made
            await rows.execute_last(session, INSERT, *_service("checkout"))
            # then nothing is sent until the block ends
            assert messages == []
        await asyncio.sleep(0.05)  # asyncpg calls its query loggers soon after, not at once
    # and then the write and the COMMIT went as one message, nothing else
    assert len(messages) == 1
    assert messages[0].startswith("EXECUTE ")
    assert messages[0].endswith(";\nCOMMIT")
    # and the write is durable, the connection idle and back in the pool
    async with pg_sessions() as other:
        stored = (await other.exec(select(ServiceRecord))).all()
    assert [(s.name, s.policy, s.updated_at, s.updated_by) for s in stored] == [
        ("checkout", {"bake": "1h"}, NOW, "alice")
    ]
    assert not driver.is_in_transaction()


async def test_the_chain_lock_is_free_until_the_commit_is_sent(pg_url: str) -> None:
    engine = create_engine(pg_url, pool_size=3)
    await upgrade(engine)
    try:
        await _two_appenders(session_factory(engine))
        # and the chain verifies
        assert (await verify_chain(engine))["intact"] is True
    finally:
        await engine.dispose()


async def _two_appenders(pg_sessions: SessionFactory) -> None:
    # given a request's transaction that has appended its audit event
    async with pg_sessions() as session, rows.transaction(session):
        await rows.fetch(session, "SELECT 1 AS one")
        await audit.record(session=session, **_event("first"))
        # when another writer appends while this one still works on
        async with pg_sessions() as other, rows.transaction(other):
            free = await rows.fetch(other, "SELECT pg_try_advisory_xact_lock($1) AS free",
                                    CHAIN_LOCK)  # fmt: skip
            # then the chain's lock is free (were it held, this append would wait forever)
            assert free[0] == [{"free": True}]
            await audit.record(session=other, **_event("second"))
        # and the other's event is already durable
        async with pg_sessions() as reader:
            durable = (await reader.exec(select(AuditEvent.action))).all()
        assert durable == ["second"]
    # and both events are chained, in the order they were committed
    async with pg_sessions() as reader:
        events = (await reader.exec(select(AuditEvent).order_by(AuditEvent.id))).all()
    assert [e.action for e in events] == ["second", "first"]
    assert events[1].prev_hash == events[0].hash


def _event(action: str) -> dict[str, Any]:
    return {
        "at": NOW, "actor": "alice", "roles": ("operator",), "source": Source.API,
        "action": action, "outcome": Outcome.SUCCESS, "service": "checkout",
        "rollout_id": None, "request_id": f"req-{action}", "client_address": None,
        "details": {"quote": "it's", "backslash": "a\\b", "unicode": "ü—✓"},
    }  # fmt: skip


async def test_of_two_last_writes_the_first_goes_alone_and_the_second_with_the_commit(
    pg_sessions: SessionFactory,
) -> None:
    # given a transaction that appends two audit events (a webhook rolling back two services)
    async with pg_sessions() as session:
        async with rows.transaction(session):
            messages, _ = await _logged(session)
            await audit.record(session=session, **_event("first"))
            await audit.record(session=session, **_event("second"))
            await asyncio.sleep(0.05)
            # then the first was sent when the second came, as prepared
            assert len(messages) == 1
            assert "audit_append" in messages[0]
        await asyncio.sleep(0.05)  # asyncpg calls its query loggers soon after, not at once
    # and the second went with the COMMIT
    assert len(messages) == 2
    assert messages[1].endswith(";\nCOMMIT")
    # and both are chained in the order they were written
    async with pg_sessions() as reader:
        events = (await reader.exec(select(AuditEvent).order_by(AuditEvent.id))).all()
    assert [e.action for e in events] == ["first", "second"]
    assert events[1].prev_hash == events[0].hash


FOLLOWERS = ["plain read", "plain write", "orm read", "orm flush"]


@pytest.mark.parametrize("follower", FOLLOWERS)
async def test_what_follows_a_held_back_write_sees_it(
    sessions: SessionFactory, follower: str
) -> None:
    # (on SQLite the write is simply made: the same behaviour is asked of both)
    async with sessions() as session, rows.transaction(session):
        await rows.fetch(session, "SELECT 1 AS one")
        # given a write held back for the commit
        await rows.execute_last(session, INSERT, *_service("checkout"))
        # when something else comes before the commit, it sees the write
        if follower == "plain read":
            found, _ = await rows.fetch(session, "SELECT name FROM service")
            assert found == [{"name": "checkout"}]
        elif follower == "plain write":
            await rows.execute(session, INSERT, *_service("payments"))
        elif follower == "orm read":
            names = (await session.exec(select(ServiceRecord.name))).all()
            assert names == ["checkout"]
        else:
            session.add(ServiceRecord(name="payments", policy={}, updated_at=NOW,
                                      updated_by="bob"))  # fmt: skip
            await session.flush()
    # then each write was made once, all committed together
    async with sessions() as reader:
        names = sorted((await reader.exec(select(ServiceRecord.name))).all())
    assert names == (["checkout", "payments"] if "write" in follower or "flush" in follower
                     else ["checkout"])  # fmt: skip


async def test_a_held_back_write_the_database_refuses_raises_and_keeps_nothing(
    pg_sessions: SessionFactory,
) -> None:
    # given a stored service
    async with pg_sessions() as session, rows.transaction(session):
        await rows.fetch(session, "SELECT 1 AS one")
        await rows.execute(session, INSERT, *_service("checkout"))
    # when a transaction writes, then holds back a write the database refuses (a duplicate)
    async with pg_sessions() as session:
        with pytest.raises(IntegrityError, match="duplicate key"):
            await _write(session, ("payments", "checkout"))
        # then it raised at the commit as SQLAlchemy raises, and the session goes on
        found, _ = await rows.fetch(session, "SELECT count(*) AS n FROM service")
        assert found == [{"n": 1}]
    # and nothing of that transaction was kept
    async with pg_sessions() as reader:
        names = (await reader.exec(select(ServiceRecord.name))).all()
    assert names == ["checkout"]


async def _write(session: Any, names: tuple[str, str]) -> None:
    """A transaction that writes one service, then holds back the write of another."""
    async with rows.transaction(session):
        await rows.fetch(session, "SELECT 1 AS one")
        await rows.execute(session, INSERT, *_service(names[0]))
        await rows.execute_last(session, INSERT, *_service(names[1]))


async def _fail_after_last_write(session: Any) -> int:
    async with rows.transaction(session):
        found, _ = await rows.fetch(session, "SELECT pg_backend_pid() AS pid")
        await rows.execute_last(session, INSERT, *_service("checkout"))
        raise RuntimeError(f"handler failed on backend {found[0]['pid']}")


async def test_a_block_that_raises_after_a_held_back_write_keeps_nothing(
    pg_sessions: SessionFactory, pg_url: str
) -> None:
    # given a transaction whose last write is held back, when the block fails before its end
    async with pg_sessions() as session:
        with pytest.raises(RuntimeError, match="handler failed") as failed:
            await _fail_after_last_write(session)
    pid = int(str(failed.value).rsplit(" ", 1)[1])
    # then nothing was written and the connection has no transaction open
    async with pg_sessions() as reader:
        assert (await reader.exec(select(ServiceRecord.name))).all() == []
    observer = await asyncpg.connect(pg_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        state = await observer.fetchval("SELECT state FROM pg_stat_activity WHERE pid = $1", pid)
    finally:
        await observer.close()
    assert state == "idle"


@pytest.mark.parametrize(
    ("name", "value"),
    [("a list (a text[] parameter)", ["a", "b"]), ("text holding NUL", "a\x00b"),
     ("a lone surrogate", "a\udc80b"), ("a naive timestamp", datetime(2026, 12, 1, 6, 0))],
)  # fmt: skip
async def test_a_value_with_no_literal_here_goes_as_prepared(
    pg_url: str, name: str, value: Any
) -> None:
    # given a value this module writes no literal for
    assert rows.literal_of(value) is None
    column = {"a list (a text[] parameter)": "text[]",
              "a naive timestamp": "timestamp"}.get(name, "text")  # fmt: skip
    engine = create_engine(pg_url, pool_size=2)
    sessions = session_factory(engine)
    table = f"test_last_write_{column.replace('[]', '_array')}"
    try:
        async with engine.begin() as connection:
            await connection.exec_driver_sql(f"CREATE TABLE {table} (value {column})")

        async def write(how: str) -> str | None:
            async with sessions() as session:
                try:
                    async with rows.transaction(session):
                        await rows.fetch(session, "SELECT 1 AS one")
                        write = rows.execute_last if how == "last" else rows.execute
                        await write(session, f"INSERT INTO {table} VALUES ($1)", value)
                except Exception as error:
                    return type(error).__name__
            return None

        # when it is written as a transaction's last write, and as an ordinary write
        outcomes = [await write("last"), await write("plain")]
        # then both end alike: kept twice, or refused twice as the driver refuses it
        assert outcomes[0] == outcomes[1]
        async with engine.connect() as connection:
            stored = (await connection.exec_driver_sql(f"SELECT value FROM {table}")).all()
        assert [row[0] for row in stored] == ([] if outcomes[0] else [value, value])
    finally:
        async with engine.begin() as connection:
            await connection.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
        await engine.dispose()


OFFSETS = [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
TYPES = {
    "text": st.text(),
    "float8": st.floats(allow_nan=True, allow_infinity=True),
    "int8": st.integers(min_value=-(2**63), max_value=2**63 - 1),
    "bool": st.booleans(),
    "timestamptz": st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.sampled_from(OFFSETS),
    ),
    "bytea": st.binary(),
    "jsonb": JSON.map(json.dumps),
}


def _writable(value: Any) -> bool:
    return rows.literal_of(value) is not None


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_a_literal_is_read_as_the_prepared_parameter_would_be(pg_url: str, data: Any) -> None:
    # given values of each type a write binds (text with quotes, backslashes, any Unicode;
    # NaN, infinities and -0.0; timestamps in any offset; any bytes; JSON)
    values = {name: data.draw(strategy.filter(_writable), label=name)
              for name, strategy in TYPES.items()}  # fmt: skip

    async def compare() -> None:
        connection = await asyncpg.connect(pg_url.replace("postgresql+asyncpg", "postgresql"))
        try:
            for name, value in values.items():
                # when a statement prepared with a parameter of that type is EXECUTEd with the
                # value as a literal, and run with it bound as a parameter
                statement = await connection.prepare(f"SELECT $1::{name} AS value")
                literal = rows.literal_of(value)
                as_literal = await _outcome(
                    connection.fetchval(f"EXECUTE {statement.get_name()}({literal})")
                )
                as_parameter = await _outcome(statement.fetchval(value))
                # then the database read the same value (or refused both alike: JSON's \u0000)
                assert _same(as_literal, as_parameter), (name, value, literal)
        finally:
            await connection.close()

    asyncio.run(compare())


async def _outcome(read: Any) -> Any:
    try:
        return await read
    except asyncpg.PostgresError as error:
        return type(error)


def _same(one: Any, other: Any) -> bool:
    if isinstance(one, float) and isinstance(other, float):
        if math.isnan(one) or math.isnan(other):
            return math.isnan(one) and math.isnan(other)
        return (one, math.copysign(1, one)) == (other, math.copysign(1, other))
    return bool(one == other)
