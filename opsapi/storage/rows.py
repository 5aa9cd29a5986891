"""Plain SQL on a session's own connection, for the hot paths.

An ORM query costs several times the database's own work in Python (statement compilation,
cache keys, identity map); the request paths that run hundreds of times a second read through
here instead: the statement goes to the driver as written (asyncpg on PostgreSQL, prepared and
cached per connection), inside the session's transaction, and each row comes back as a record
of the table's model with the same column conversions as an ORM load.

Statements are written once for both databases: `$1`-style parameters (SQLite gets `?1`) and
`FOR UPDATE` (dropped on SQLite, whose write transactions are serialised anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import re
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar, cast

from asyncpg.transaction import TransactionState  # type: ignore[import-untyped]
from sqlalchemy import Table, TypeDecorator
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import configure_mappers, make_transient_to_detached
from sqlalchemy.orm.attributes import (
    instance_state,  # what `inspect` gives for a record, at a sixth of its cost
    manager_of_class,
    set_attribute,
    set_committed_value,
)
from sqlalchemy.pool import QueuePool
from sqlalchemy.types import TypeEngine
from sqlalchemy.util import await_only, greenlet_spawn
from sqlmodel import Session as SQLModelSession
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from opsapi.storage.db import is_broken_connection

ModelT = TypeVar("ModelT", bound=SQLModel)
Row = Mapping[str, Any]

_PARAMETER = re.compile(r"\$(\d+)")
_FOR_UPDATE = re.compile(r"\s+FOR UPDATE\b")


Target = AsyncSession | AsyncConnection


@dataclass
class _Link:
    """The connection a session's current transaction runs on, and its driver connection
    once looked up (each lookup is a trip through SQLAlchemy's greenlet bridge)."""

    # Weakly: the session holds the link, the transaction holds the session; a strong
    # reference would make a cycle that only the garbage collector frees.
    transaction: Callable[[], object] | None
    connection: AsyncConnection | None  # None: a pool connection the session checked out
    dialect: Dialect
    adapted: Any = None
    # A write held back to travel with the transaction's COMMIT (`execute_last`): its SQL and
    # parameters; sent before any other statement that comes first.
    last: tuple[str, Sequence[Any]] | None = field(default=None, kw_only=True)


@dataclass
class _Checkout(_Link):
    """A pool connection a `Session` checked out for this module's statements, without the
    ORM's transaction machinery; the ORM, if the session uses it, joins the same connection
    (`Session.get_bind`), so everything the session writes is one transaction."""

    fairy: Any = None
    bound: Connection | None = None  # the ORM's view of it, made when first asked


_LINK = "opsapi.rows.link"
_CHECKOUT = "opsapi.rows.checkout"
# Set while a `transaction` block runs: its commit is `commit`, which sends a held-back last
# write with the COMMIT.
_COMMITS_HERE = "opsapi.rows.commits_here"


class Session(SQLModelSession):
    """The sessions the application opens (`storage.db.session_factory`). On PostgreSQL, a
    session whose first work is this module's plain SQL checks a connection out of the pool
    itself: about a tenth of a write's CPU went to the ORM's transaction and connection
    objects around statements it never saw. Begin, commit, rollback and close mean what they
    mean for any session; the connection goes back to the pool when a transaction ends by
    `commit` or `rollback` (as the ORM's does), or on close."""

    def get_bind(self, mapper: Any = None, **kw: Any) -> Any:
        """The checked-out connection when there is one (the ORM joins its transaction)."""
        self._send_held()
        checkout: _Checkout | None = self.info.get(_CHECKOUT)
        if checkout is None:
            return super().get_bind(mapper, **kw)
        if checkout.bound is None:
            engine = self.bind
            assert isinstance(engine, Engine)  # a checkout is made only on an engine's session
            checkout.bound = Connection(engine, connection=checkout.fairy)
        return checkout.bound

    def commit(self) -> None:
        """Commit the ORM's work and the plain SQL's, one transaction."""
        self._send_held()
        checkout: _Checkout | None = self.info.get(_CHECKOUT)
        if checkout is None or self._transaction is not None or _pending(self):
            super().commit()
        self._end_checkout("COMMIT")

    def rollback(self) -> None:
        """Roll back the ORM's work and the plain SQL's."""
        self._drop_held()
        try:
            super().rollback()
        finally:
            self._end_checkout("ROLLBACK")

    def _held(self) -> _Link | None:
        """The link holding back a write for the commit (`execute_last`), if any."""
        link: _Link | None = self.info.get(_CHECKOUT) or self.info.get(_LINK)
        return link if link is not None and link.last is not None else None

    def _send_held(self) -> None:
        # An ORM statement or commit after a write held back for the commit comes after it,
        # as it was written. In a greenlet, as every ORM statement of an async session.
        link = self._held()
        if link is not None:
            await_only(_send_held(link))

    def _drop_held(self) -> None:
        # A transaction that ends without its commit never sends its held-back write.
        link = self._held()
        if link is not None:
            link.last = None

    def _end_checkout(self, sql: str) -> None:
        # The checked-out connection's transaction ended (if the ORM's did not end it), and
        # the connection back to the pool, as the ORM's goes back at the end of a transaction.
        checkout: _Checkout | None = self.info.get(_CHECKOUT)
        if checkout is None:
            return
        adapted = checkout.adapted
        try:
            if adapted._transaction is not None:
                end = adapted.commit if sql == "COMMIT" else adapted.rollback
                _on_checkout(checkout, sql, end)
        finally:
            self._release(invalidate=False)

    def expunge_all(self) -> None:
        """Remove every object from the session (nothing to do when it holds none)."""
        # A hot-path session never holds an object (`rows` reads detached records); the ORM's
        # version still builds a new identity map and looks up the detach event's listeners at
        # every close.
        if self.identity_map or self._new or self._deleted:
            super().expunge_all()

    def closes_at_once(self) -> bool:
        """Whether closing waits on nothing (so needs no greenlet): no transaction open, on the
        ORM's side or the driver's, no object held, and the connection checked out, if any,
        goes back into a pool with room for it (an overflow connection is closed: a wait)."""
        if self._transaction is not None or self.identity_map or self._new or self._deleted:
            return False
        checkout: _Checkout | None = self.info.get(_CHECKOUT)
        if checkout is None:
            return True
        if checkout.bound is not None or checkout.adapted._transaction is not None:
            return False
        pool = checkout.fairy._pool
        return isinstance(pool, QueuePool) and pool.checkedin() < pool.size()

    def _close_impl(self, invalidate: bool, is_reset: bool = False) -> None:
        self._drop_held()
        try:
            super()._close_impl(invalidate, is_reset)
        finally:
            self._release(invalidate)

    def _release(self, invalidate: bool) -> None:
        checkout: _Checkout | None = self.info.pop(_CHECKOUT, None)
        if checkout is not None:
            if invalidate:
                checkout.fairy.invalidate()
            # Back to the pool, whose reset rolls back what is still open.
            (checkout.bound or checkout.fairy).close()

    def check_out(self) -> _Checkout | None:
        """The session's own pool connection (checked out now if need be), or None when
        the ORM's transaction is open or the database is not PostgreSQL. In a greenlet."""
        found: _Checkout | None = self.info.get(_CHECKOUT)
        engine = self.bind
        if found is not None or not isinstance(engine, Engine):
            return found
        dialect = engine.dialect
        if dialect.name != "postgresql" or self._transaction is not None:
            return None
        try:
            fairy = engine.pool.connect()
        except dialect.loaded_dbapi.Error as error:
            # Raised as a connect through the engine raises it (its error events told).
            Connection._handle_dbapi_exception_noconnection(error, dialect, engine)
            raise  # pragma: no cover - the call above raises
        found = self.info[_CHECKOUT] = _Checkout(None, None, dialect, fairy.dbapi_connection,
                                                 fairy)  # fmt: skip
        return found


def _pending(session: SQLModelSession) -> bool:
    """Whether the ORM has objects to flush."""
    # `new or dirty or deleted` without the three sets they build: dirty is what the identity
    # map holds as modified and not deleted.
    return bool(session._new or session._deleted or session.identity_map._modified)


def _on_checkout(checkout: _Checkout, sql: str, work: Callable[[], None]) -> None:
    # In a greenlet: the adapter's commit and rollback wait on the driver through it.
    try:
        work()
    except Exception as error:
        raise _failure_of(checkout, error, sql, ()) from None


class ClosingSession(AsyncSession):
    """The application's async sessions (`storage.db.session_factory`): one that waits on
    nothing when it closes (`Session.closes_at_once`: the usual end of a request) closes in
    place, without the task and greenlet SQLAlchemy runs every close in."""

    async def close(self) -> None:
        """Close the session (the connection back to the pool, what is open rolled back)."""
        if not self._closed_in_place():
            await super().close()

    async def __aexit__(self, type_: Any, value: Any, traceback: Any) -> None:
        if not self._closed_in_place():
            await super().__aexit__(type_, value, traceback)

    def _closed_in_place(self) -> bool:
        sync = self.sync_session
        if isinstance(sync, Session) and sync.closes_at_once():
            sync.close()
            return True
        return False


def _current_link(session: AsyncSession) -> _Link | None:
    """The session's link if it belongs to the transaction the session is in now (or the
    session's own checked-out connection when the ORM has no transaction open)."""
    current = session.sync_session.get_transaction()
    if current is None:
        checkout: _Checkout | None = session.info.get(_CHECKOUT)
        return checkout
    link: _Link | None = session.info.get(_LINK)
    if link is None or link.transaction is None:
        return None
    return link if link.transaction() is current else None


async def _link(target: Target) -> _Link:
    if not isinstance(target, AsyncSession):
        return _Link(None, target, target.dialect)
    link = _current_link(target)
    if link is not None:
        return link
    sync = target.sync_session
    if isinstance(sync, Session) and sync.get_transaction() is None:
        checkout = await greenlet_spawn(sync.check_out)
        if checkout is not None:
            return checkout
    connection = await target.connection()  # begins the session's transaction if need be
    transaction = target.sync_session.get_transaction()
    reference = weakref.ref(transaction) if transaction is not None else None
    link = target.info[_LINK] = _Link(reference, connection, connection.dialect)
    return link


def _orm(link: _Link) -> AsyncConnection:
    # SQLite: statements go through SQLAlchemy (never a checkout: PostgreSQL only).
    assert link.connection is not None
    return link.connection


async def dialect_name(target: Target) -> str:
    """The name of the database `target` runs on (`postgresql`, `sqlite`)."""
    return (await _link(target)).dialect.name


async def fetch(target: Target, sql: str, *args: Any) -> tuple[list[Row], Dialect]:
    """The rows `sql` returns, read in the session's (or connection's) transaction."""
    link = await _link(target)
    dialect = link.dialect
    if dialect.name != "postgresql":
        result = await _orm(link).exec_driver_sql(_for_sqlite(sql), args)
        return [dict(row) for row in result.mappings()], dialect
    records = await _on_driver(link, sql, args, lambda driver: driver.fetch(sql, *args))
    return [dict(record) for record in records], dialect


async def fetch_alone(session: AsyncSession, sql: str, *args: Any) -> tuple[list[Row], Dialect]:
    """The rows of a read that is whole in one statement (one snapshot): on PostgreSQL run on
    its own, outside any transaction, when the session has not begun one (no BEGIN, no
    ROLLBACK: one round trip instead of three); otherwise as `fetch`."""
    link = await _link(session)
    dialect = link.dialect
    if dialect.name != "postgresql":
        return await fetch(session, sql, *args)
    records = await _on_driver(
        link, sql, args, lambda driver: driver.fetch(sql, *args), transaction=False
    )
    return [dict(record) for record in records], dialect


async def execute_alone(session: Target, sql: str, *args: Any) -> None:
    """Run a write that is whole in one statement: on PostgreSQL on its own, outside any
    transaction, when the session has not begun one (the statement commits by itself: one
    round trip instead of three); otherwise as `execute`, in the transaction the caller
    commits."""
    link = await _link(session)
    if link.dialect.name != "postgresql":
        await execute(session, sql, *args)
        return
    await _on_driver(link, sql, args, lambda driver: driver.execute(sql, *args), transaction=False)


async def execute(target: Target, sql: str, *args: Any) -> None:
    """Run `sql` (no rows wanted) in the session's (or connection's) transaction."""
    link = await _link(target)
    if link.dialect.name != "postgresql":
        await _orm(link).exec_driver_sql(_for_sqlite(sql), args)
        return
    await _on_driver(link, sql, args, lambda driver: driver.execute(sql, *args))


# Parameters one multi-row INSERT takes before `insert` pipelines a statement per row instead
# (each row count is a statement of its own in the driver's cache: keep them few).
_ONE_STATEMENT_PARAMETERS = 200


async def insert(target: Target, model: type[SQLModel], values: Sequence[Row]) -> None:
    """Insert `values` (column → Python value, as the ORM takes them) into `model`'s table."""
    await (await pending_insert(target, model, values)).run(target)


async def pending_insert(
    target: Target, model: type[SQLModel], values: Sequence[Row], *, unique: str | None = None
) -> Insert:
    """The INSERT of `values` into `model`'s table, to run alone or with other writes
    (`run_together`, `chain.append`'s `alongside`); nothing is written until it runs.
    `unique`: a uniquely indexed column; a row whose value there is already stored is skipped."""
    names, binders = _binders(model, (await _link(target)).dialect)
    parameters = [tuple(_bind(names, binders, row)) for row in values]
    table: Table = model.__table__  # type: ignore[attr-defined]
    if unique is not None and unique not in table.columns:
        raise ValueError(f"{table.name} has no column {unique}")
    return Insert(table, names, parameters, unique)


@dataclass(frozen=True)
class Insert:
    """Rows to insert into one table, bound as the ORM binds them."""

    table: Table
    names: tuple[str, ...]
    parameters: Sequence[tuple[Any, ...]]  # one tuple of bound values per row
    # A uniquely indexed column: a row whose value there is already stored is skipped.
    unique: str | None = None

    @property
    def joinable(self) -> bool:
        """Whether it is one statement (few rows) that another statement may carry."""
        return len(self.parameters) * len(self.names) <= _ONE_STATEMENT_PARAMETERS

    @property
    def values(self) -> list[Any]:
        """The statement's parameters, row after row (`sql`'s order)."""
        return [value for row in self.parameters for value in row]

    def sql(self, first: int = 1) -> str:
        """The one multi-row statement, its parameters numbered from `$first`."""
        return self._statement(len(self.parameters), first)

    def _statement(self, rows: int = 1, first: int = 1) -> str:
        skip = ""
        if self.unique:
            # A column of the model's table (checked by `pending_insert`), never from input.
            skip = f" ON CONFLICT ({self.unique}) DO NOTHING"
        return _insert_sql(self.table, self.names, rows, first) + skip

    async def run(self, target: Target) -> None:
        """Run it alone, in the session's transaction."""
        if not self.parameters:
            return
        link = await _link(target)
        if link.dialect.name != "postgresql":
            sql = _for_sqlite(self._statement())
            await _orm(link).exec_driver_sql(sql, list(self.parameters))
            return
        if self.joinable:
            # A few rows (a pass's evaluations of one rollout) as one statement: asyncpg's
            # executemany pipelines a statement per row, which costs more than one execute.
            sql, flat = self.sql(), self.values
            await _on_driver(link, sql, flat, lambda driver: driver.execute(sql, *flat))
            return
        sql, parameters = self._statement(), list(self.parameters)
        await _on_driver(link, sql, parameters, lambda driver: driver.executemany(sql, parameters))


async def bound(target: Target, model: type[SQLModel], row: Row, names: Sequence[str]) -> list[Any]:
    """`row`'s values for the columns `names` of `model`'s table, converted as the ORM binds
    them (JSON serialised, timestamps checked and in UTC), for a statement's parameters."""
    _, binders = _binders(model, (await _link(target)).dialect)
    return _bind(names, binders, row)


async def save(session: AsyncSession, record: SQLModel) -> None:
    """Write `record` as the ORM's flush would, with plain SQL: a stored record (tracked by the
    session or `persistent`) gets one UPDATE of the columns changed since it was read or saved
    (none: no statement); a new record is inserted, gets its generated id and is `persistent`
    from then on."""
    if is_new(record):
        table: Table = type(record).__table__  # type: ignore[attr-defined]
        names, binders = _binders(type(record), (await _link(session)).dialect)
        await _insert_record(session, record, table, names, binders)
        return
    update = await pending_update(session, record)
    if update is not None:
        await update.run(session)


@dataclass(frozen=True)
class Update:
    """A stored record's changed columns as one UPDATE, to run alone (`run`) or as part of
    another statement (`sql` with its parameters numbered from `first`)."""

    table: str
    columns: Sequence[str]
    key: str
    values: Sequence[Any]  # the columns' bound values, then the key's

    def sql(self, first: int = 1) -> str:
        """The statement, its parameters numbered from `$first`."""
        assignments = ", ".join(
            f"{name} = ${index}" for index, name in enumerate(self.columns, first)
        )
        where = f"{self.key} = ${first + len(self.columns)}"
        # Names from the model's table, never from input.
        return f"UPDATE {self.table} SET {assignments} WHERE {where}"  # noqa: S608

    async def run(self, target: Target) -> None:
        """Run it alone, in the session's transaction."""
        await execute(target, self.sql(), *self.values)


# A write that is built before it runs, alone or carried by another statement.
Pending = Update | Insert


def carried(writes: Sequence[Pending], first: int) -> tuple[str, list[Any]] | None:
    """`writes` as the WITH clause of another statement whose own parameters end at
    `$first - 1` (the clause, then its parameters); None when one of them cannot be carried.
    A data-modifying WITH runs to completion whether or not its statement reads it."""
    writes = _nonempty(writes)
    if any(isinstance(write, Insert) and not write.joinable for write in writes):
        return None
    if not writes:
        return "", []
    clauses: list[str] = []
    values: list[Any] = []
    for index, write in enumerate(writes):
        clauses.append(f"w{index} AS ({write.sql(first + len(values))})")
        values += write.values
    return "WITH " + ", ".join(clauses) + " ", values


def _nonempty(writes: Sequence[Pending]) -> list[Pending]:
    return [write for write in writes if not isinstance(write, Insert) or write.parameters]


async def run_together(target: Target, writes: Sequence[Pending]) -> None:
    """Run `writes` in the session's transaction: on PostgreSQL in one statement (one round
    trip), elsewhere (or when one is too large to be carried) one after the other."""
    writes = _nonempty(writes)
    if not writes:
        return
    *before, last = writes
    if before and await dialect_name(target) == "postgresql":
        with_clause = carried(before, len(last.values) + 1)
        if with_clause is not None and (not isinstance(last, Insert) or last.joinable):
            prefix, values = with_clause
            await execute(target, prefix + last.sql(), *last.values, *values)
            return
    for write in writes:
        await write.run(target)


async def pending_update(session: AsyncSession, record: SQLModel) -> Update | None:
    """The UPDATE that writes what changed in the stored `record` since it was read or saved
    (None: nothing did), as `save` would run it; the record counts as saved from here on, so
    the caller must run it in this transaction."""
    state = instance_state(record)
    assert state.key is not None, "a new record is inserted by save"
    _, binders = _binders(type(record), (await _link(session)).dialect)
    # What the ORM's flush would write: the attributes assigned since the last load or save.
    changed = [name for name in state.committed_state if name in binders]
    if not changed:
        return None
    table: Table = type(record).__table__  # type: ignore[attr-defined]
    key = _key_name(table)
    values = _bind(changed, binders, state.dict)
    update = Update(table.name, changed, key, [*values, state.dict[key]])
    if len(changed) == len(state.committed_state):
        # Nothing left for the ORM's flush: off its list of modified instances too, or the
        # commit's flush walks this record again for nothing.
        state._commit_all(state.dict, state.session.identity_map if state.session else None)
    else:
        for name in changed:
            set_committed_value(record, name, getattr(record, name))
    return update


def assign(record: SQLModel, **values: Any) -> bool:
    """Set the attributes whose value differs (`save` then writes those columns only);
    whether any did."""
    current = instance_state(record).dict
    changed = False
    for name, value in values.items():
        if name not in current or current[name] != value:
            # The instrumented set (history for `save`), without SQLModel's __setattr__ around
            # it: a table model's values live in that same dict.
            set_attribute(record, name, value)
            changed = True
    return changed


def loaded(record: SQLModel) -> Mapping[str, Any]:
    """`record`'s column values as read, built or assigned since (every column of a record
    read or built here, or loaded by the ORM), without a descriptor call per attribute."""
    values: Mapping[str, Any] = instance_state(record).dict
    return values


def is_new(record: SQLModel) -> bool:
    """Whether `record` is not stored yet (`save` inserts it)."""
    return instance_state(record).key is None


async def pending_new(session: AsyncSession, record: SQLModel) -> Insert:
    """The INSERT of the new `record`, whose key is already set (drawn from its table's
    sequence), to run with other writes (`run_together`, `chain.append`'s `alongside`); the
    record counts as stored from here on, so the caller must run it in this transaction."""
    assert is_new(record), "a stored record is written by pending_update"
    table: Table = type(record).__table__  # type: ignore[attr-defined]
    key = _key_name(table)
    stored = loaded(record)  # every column: a new record is built with all of them
    assert stored[key] is not None, "a record without its key is inserted by save"
    names, binders = _binders(type(record), (await _link(session)).dialect)
    values = (stored[key], *_bind(names, binders, stored))
    persistent(record)
    return Insert(table, (key, *names), [values])


async def _insert_record(
    session: AsyncSession,
    record: SQLModel,
    table: Table,
    names: tuple[str, ...],
    binders: Mapping[str, Binder],
) -> None:
    generated = table.autoincrement_column
    values = _bind(names, binders, {name: getattr(record, name) for name in names})
    if generated is None:
        # Nothing to read back (an INSERT gives SQLite's driver no rows to fetch).
        await execute(session, _insert_sql(table, names), *values)
    else:
        returning = f" RETURNING {generated.name}"
        found, _ = await fetch(session, _insert_sql(table, names) + returning, *values)
        setattr(record, generated.name, found[0][generated.name])
    persistent(record)


@functools.lru_cache(maxsize=256)
def _insert_sql(table: Table, names: tuple[str, ...], rows: int = 1, first: int = 1) -> str:
    width = len(names)
    groups = ", ".join(
        "(" + ", ".join(f"${first + row * width + column}" for column in range(width)) + ")"
        for row in range(rows)
    )
    # Names from the model's table, never from input.
    return f"INSERT INTO {table.name} ({', '.join(names)}) VALUES {groups}"  # noqa: S608


def _bind(names: Iterable[str], binders: Mapping[str, Binder], values: Row) -> list[Any]:
    """The values of the columns `names` (absent: NULL), each converted as the ORM binds it
    (JSON serialised, timestamps checked and in UTC, enums as their value)."""
    # One loop, no call per column where nothing converts (most columns).
    bound: list[Any] = []
    for name in names:
        value = values.get(name)
        bind = binders[name]
        bound.append(value if bind is None or value is None else bind(value))
    return bound


@contextlib.asynccontextmanager
async def transaction(session: AsyncSession) -> AsyncIterator[AsyncSession]:
    """The session's transaction around the block: begun by its first statement, committed
    (`commit`) when the block ends, rolled back (even when cancelled) when it raises."""
    session.info[_COMMITS_HERE] = True
    try:
        yield session
        await commit(session)
    except BaseException:
        await asyncio.shield(session.rollback())  # drops a held-back write, never sent
        raise
    finally:
        session.info.pop(_COMMITS_HERE, None)


async def execute_last(session: Target, sql: str, *args: Any) -> None:
    """Run `sql` (no rows wanted) as the last write of the session's transaction: on
    PostgreSQL, in a `transaction` block, it is held back and sent with the block's COMMIT in
    one message, so that the locks it takes are held for no round trip to this process (the
    audit chain's lock, which every write waits for); a statement that comes before the commit
    sends it first. Elsewhere, as `execute`."""
    if isinstance(session, AsyncSession) and session.info.get(_COMMITS_HERE):
        link = await _link(session)
        adapted = link.adapted
        if (
            link.dialect.name == "postgresql"
            and adapted is not None
            and adapted._transaction is not None
        ):
            if link.last is not None:
                await _send_held(link)  # an earlier last write: this one comes after it
            link.last = (sql, args)
            return
    await execute(session, sql, *args)


async def commit(session: AsyncSession) -> None:
    """Commit the session's transaction. On PostgreSQL, when everything was written here (the
    ORM has nothing to flush), the COMMIT goes to the driver directly, with the write held
    back for it (`execute_last`) in the same message, and the session is left with nothing to
    do but close: one trip through SQLAlchemy's greenlet bridge fewer."""
    link = _current_link(session)
    sync = session.sync_session
    if link is None or link.adapted is None or link.dialect.name != "postgresql" or _pending(sync):
        await session.commit()  # which sends a held-back write first (`Session.commit`)
        return
    adapted = link.adapted
    try:
        async with adapted._execute_mutex:
            if link.last is not None:
                message = await _with_commit(adapted._connection, *link.last)
                if message is not None and adapted._transaction is not None:
                    await _commit_with(link, message)
                    return
                await _send_last(link)
            if adapted._transaction is not None:
                # As the adapter's own commit: the transaction is over whatever COMMIT answers.
                await adapted._call_and_discard(adapted._transaction.commit)
    except StatementError:
        raise
    except Exception as error:
        raise await _failure(link, error, "COMMIT", ()) from None


async def _commit_with(link: _Link, message: str) -> None:
    """Send `message` (the held-back write, then COMMIT) as the commit of the link's
    transaction. When it fails the transaction stays open, for the rollback that follows."""
    assert link.last is not None
    (sql, args), link.last = link.last, None
    adapted = link.adapted
    transaction = adapted._transaction
    driver = adapted._connection
    try:
        await driver.execute(message)
    except Exception as error:
        raise await _failure(link, error, sql, args) from None
    # As asyncpg's commit and the adapter's (`_call_and_discard`) leave them.
    if driver._top_xact is transaction:
        driver._top_xact = None
    transaction._state = TransactionState.COMMITTED
    adapted._transaction = None


async def _with_commit(driver: Any, sql: str, args: Sequence[Any]) -> str | None:
    """`sql` with `args` and a COMMIT as one message: the statement the connection prepared
    for `sql` EXECUTEd with the arguments written as literals (its plan is reused), then
    COMMIT. None when the statement has no name or an argument has no literal here."""
    statement = await driver._get_statement(sql, None)
    name = statement.name
    # Literals are quoted for standard strings (a backslash is itself), as they are by default.
    if not name or driver.get_settings().standard_conforming_strings != "on":
        return None
    literals = []
    for value in args:
        literal = literal_of(value)
        if literal is None:
            return None
        literals.append(literal)
    return f"EXECUTE {name}({', '.join(literals)});\nCOMMIT"


def literal_of(value: Any) -> str | None:
    """`value` as a quoted SQL literal that PostgreSQL reads, with standard strings, as the
    value of a parameter of its type; None for a value written no such way here (a naive
    timestamp, a list, text holding NUL or a lone surrogate)."""
    if value is None:
        return "NULL"
    if isinstance(value, str):
        text = str.__str__(value)  # a str enum's own text, as the driver sends it
    elif isinstance(value, bool):
        return "true" if value else "false"
    elif isinstance(value, int):
        return str(int(value))
    elif isinstance(value, float):
        text = repr(value) if math.isfinite(value) else _NOT_FINITE[str(value)]
    elif isinstance(value, datetime):
        if value.tzinfo is None:
            return None
        text = value.isoformat()
    elif isinstance(value, bytes):
        return "'\\x" + value.hex() + "'"
    else:
        return None
    if "\x00" in text:
        return None
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            return None
    return "'" + text.replace("'", "''") + "'"


_NOT_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


async def _on_driver(
    link: _Link,
    sql: str,
    args: Sequence[Any],
    work: Callable[[Any], Awaitable[Any]],
    *,
    transaction: bool = True,
) -> Any:
    """`work(asyncpg connection)` in the connection's transaction (begun if need be; with
    `transaction` false, none is begun: the work runs on its own if none was)."""
    adapted = link.adapted
    if adapted is None:
        fairy = await _orm(link).get_raw_connection()
        adapted = link.adapted = fairy.dbapi_connection
    try:
        # The adapter begins its transaction on its first statement: begin it here too, so
        # that what runs here belongs to the session's transaction.
        async with adapted._execute_mutex:
            if link.last is not None:
                await _send_last(link)
            if transaction and adapted._transaction is None:
                await adapted._start_transaction()
            return await work(adapted._connection)
    except StatementError:
        raise  # the held-back write's failure, already told as its own
    except Exception as error:
        raise await _failure(link, error, sql, args) from None


async def _send_held(link: _Link) -> None:
    """The held-back write sent on its own, now (under the driver's mutex)."""
    async with link.adapted._execute_mutex:
        if link.last is not None:
            await _send_last(link)


async def _send_last(link: _Link) -> None:
    """The held-back write sent on its own, in the transaction (something else must follow
    it before the commit). The caller holds the driver's mutex."""
    assert link.last is not None
    (sql, args), link.last = link.last, None
    try:
        await link.adapted._connection.execute(sql, *args)
    except Exception as error:
        raise await _failure(link, error, sql, args) from None


async def _failure(link: _Link, error: Exception, sql: str, args: Sequence[Any]) -> StatementError:
    """`error` as SQLAlchemy would have raised it, the connection invalidated when lost, so
    that the one failure policy (`storage.db.is_unavailable`) reads it alike."""
    if isinstance(link, _Checkout):
        return await greenlet_spawn(_failure_of, link, error, sql, args)
    dbapi_error, lost = _translated(link, error)
    if lost:
        connection = _orm(link)
        fairy = await connection.get_raw_connection()
        # The pool's older connections replaced on their next checkout, as `_failure_of`.
        connection.sync_engine.pool._invalidate(fairy, dbapi_error, _checkin=False)
        await connection.invalidate(dbapi_error)
    return _statement_error(link, dbapi_error, sql, args, lost)


def _failure_of(
    checkout: _Checkout, error: Exception, sql: str, args: Sequence[Any]
) -> StatementError:
    # `_failure` for a checked-out connection, in a greenlet (closing one waits on the driver).
    dbapi_error, lost = _translated(checkout, error)
    if lost:
        # As SQLAlchemy does on a disconnect: this connection closed, and every connection the
        # pool opened before it replaced on its next checkout (after a database restart, the
        # requests in flight fail, not one request per pooled connection).
        checkout.fairy._pool._invalidate(checkout.fairy, dbapi_error)
    return _statement_error(checkout, dbapi_error, sql, args, lost)


def _translated(link: _Link, error: Exception) -> tuple[Exception, bool]:
    """The driver's `error` as a DB-API error, and whether the connection is lost."""
    adapted = link.adapted
    try:
        adapted._handle_exception(error)  # raises the driver error as a DB-API error
    except Exception as translated:
        dbapi_error = translated
    else:  # pragma: no cover - the adapter always raises
        dbapi_error = error
    return dbapi_error, adapted._connection.is_closed() or is_broken_connection(error)


def _statement_error(
    link: _Link, dbapi_error: Exception, sql: str, args: Sequence[Any], lost: bool
) -> StatementError:
    return DBAPIError.instance(
        sql, list(args), dbapi_error, link.dialect.loaded_dbapi.Error, connection_invalidated=lost
    )


async def fetch_records(
    session: AsyncSession, model: type[ModelT], sql: str, *args: Any, alone: bool = False
) -> list[ModelT]:
    """The rows `sql` returns (every column of `model`'s table), as records of `model`;
    `alone`: read as `fetch_alone` reads (one statement, outside any transaction)."""
    rows, dialect = await (fetch_alone if alone else fetch)(session, sql, *args)
    return [record_of(model, row, dialect) for row in rows]


async def lock_records(
    session: AsyncSession, model: type[ModelT], sql: str, *args: Any
) -> list[ModelT]:
    """The rows `sql` returns (`... FOR UPDATE`), as records the session tracks: a change to
    one is written by the next flush, as if the ORM had loaded it."""
    return [track(session, record) for record in await fetch_records(session, model, sql, *args)]


def persistent(record: ModelT) -> ModelT:
    """`record` (as read or just inserted) marked as stored, with no pending change, and not
    made the session's: `save` writes its changes; the commit's flush does not walk it."""
    # Attaching to the session (`track`) cost about a twentieth of a write's CPU, for a record
    # the transition writes with `save` anyway; and `make_transient_to_detached` also walks
    # every attribute to expire those not loaded (ours are all loaded).
    state = instance_state(record)
    table: Table = type(record).__table__  # type: ignore[attr-defined]
    state.key = state.mapper.identity_key_from_primary_key((state.dict[_key_name(table)],))
    if state.committed_state or state.modified:
        state._commit_all(state.dict)
    return record


def _key_name(table: Table) -> str:
    found = _KEY_NAMES.get(table)
    if found is None:
        (key,) = table.primary_key.columns  # our stored tables have a one-column key
        found = _KEY_NAMES[table] = str(key.name)
    return found


_KEY_NAMES: dict[Table, str] = {}


def track(session: AsyncSession, record: ModelT) -> ModelT:
    """`record` (as read) made the session's own: the instance the session already holds for
    that row, refreshed with what was read (a locked read wins over an earlier one), or
    `record` itself, attached with no pending change."""
    sync = session.sync_session
    key = sync.identity_key(instance=record)
    held = sync.identity_map.get(key)
    if held is None:
        make_transient_to_detached(record)
        sync.add(record)
        return record
    # Every column overwritten: the held instance has no pending change left.
    held_state, read = instance_state(held), instance_state(record).dict
    table: Table = type(record).__table__  # type: ignore[attr-defined]
    for column in table.columns:
        held_state.dict[column.name] = read[column.name]
    held_state._commit_all(held_state.dict, sync.identity_map)
    return cast(ModelT, held)


def record_of(model: type[ModelT], row: Row, dialect: Dialect) -> ModelT:
    """`row` as a (detached) record of `model`, each column converted as the ORM would."""
    # Built as an ORM load builds it (no validation: the values come from the database), which
    # costs a tenth of a pydantic construction.
    record: ModelT = manager_of_class(model).new_instance()
    # A new instance has no history: its loaded values are simply its state's values.
    values = instance_state(record).dict
    for name, convert in _converters(model, dialect):
        value = row[name]
        values[name] = convert(value) if convert is not None and value is not None else value
    return record


def new(model: type[ModelT], **values: Any) -> ModelT:
    """A new record of `model` from trusted values (not yet stored: `save` inserts it), built
    as `record_of` builds one: no validation; a field not given takes its default."""
    record: ModelT = manager_of_class(model).new_instance()
    state = instance_state(record).dict
    for name, default in _defaults(model):
        state[name] = values.pop(name) if name in values else default()
    if values:
        raise TypeError(f"{model.__name__} has no field {', '.join(values)}")
    return record


_DEFAULTS: dict[type[SQLModel], Sequence[tuple[str, Callable[[], Any]]]] = {}


def _defaults(model: type[SQLModel]) -> Sequence[tuple[str, Callable[[], Any]]]:
    found = _DEFAULTS.get(model)
    if found is None:
        configure_mappers()
        entries: list[tuple[str, Callable[[], Any]]] = []
        for name, info in model.model_fields.items():
            if info.default_factory is not None:
                entries.append((name, cast(Callable[[], Any], info.default_factory)))
            elif info.is_required():
                entries.append((name, _required(model, name)))
            else:
                entries.append((name, _constant(info.default)))
        found = _DEFAULTS[model] = tuple(entries)
    return found


def _constant(value: Any) -> Callable[[], Any]:
    return lambda: value


def _required(model: type[SQLModel], name: str) -> Callable[[], Any]:
    def missing() -> Any:
        raise TypeError(f"{model.__name__}.{name} is required")

    return missing


_Converters = Sequence[tuple[str, Callable[[Any], Any] | None]]
_CONVERTERS: dict[tuple[type[SQLModel], type[Dialect]], _Converters] = {}


def _converters(model: type[SQLModel], dialect: Dialect) -> _Converters:
    # Per dialect class, not instance: every engine of one driver converts alike.
    key = (model, type(dialect))
    found = _CONVERTERS.get(key)
    if found is None:
        # Instances are built as the ORM builds them: its mappers must be set up (the ORM does
        # so on its first query, which may come after our first read).
        configure_mappers()
        table: Table = model.__table__  # type: ignore[attr-defined]
        found = _CONVERTERS[key] = tuple(
            (column.name, _converter(column.type, dialect)) for column in table.columns
        )
    return found


Binder = Callable[[Any], Any] | None
# Every column but a generated primary key, in the table's order, and each one's conversion.
_Binding = tuple[tuple[str, ...], dict[str, Binder]]


def _binders(model: type[SQLModel], dialect: Dialect) -> _Binding:
    # Every column but a generated primary key, each with the conversion the ORM applies
    # when it writes (JSON serialised, timestamps in UTC, enums as their value).
    key = (model, type(dialect))
    found = _BINDERS.get(key)
    if found is None:
        table: Table = model.__table__  # type: ignore[attr-defined]
        binders: dict[str, Binder] = {
            column.name: column.type.dialect_impl(dialect).bind_processor(dialect)
            for column in table.columns
            if column is not table.autoincrement_column
        }
        found = _BINDERS[key] = (tuple(binders), binders)
    return found


_BINDERS: dict[tuple[type[SQLModel], type[Dialect]], _Binding] = {}


def _converter(column_type: TypeEngine[Any], dialect: Dialect) -> Callable[[Any], Any] | None:
    if dialect.name != "postgresql":
        return column_type.dialect_impl(dialect).result_processor(dialect, None)
    # asyncpg hands back Python values (JSON decoded by the codec SQLAlchemy installs on each
    # connection); only our own column types convert further.
    if (
        isinstance(column_type, TypeDecorator)
        and type(column_type).process_result_value is not TypeDecorator.process_result_value
    ):
        decorator = column_type
        # Our types say how to convert a value in one call (no lambda, no method per value).
        result_converter = getattr(decorator, "result_converter", None)
        if result_converter is not None:
            converter: Callable[[Any], Any] = result_converter()
            return converter
        return lambda value: decorator.process_result_value(value, dialect)
    return None


def _for_sqlite(sql: str) -> str:
    return _FOR_UPDATE.sub("", _PARAMETER.sub(r"?\1", sql))
