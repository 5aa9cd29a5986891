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

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

from sqlalchemy import Table, TypeDecorator
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.types import TypeEngine
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from opsapi.storage.db import is_broken_connection

ModelT = TypeVar("ModelT", bound=SQLModel)
Row = Mapping[str, Any]

_PARAMETER = re.compile(r"\$(\d+)")
_FOR_UPDATE = re.compile(r"\s+FOR UPDATE\b")


async def fetch(session: AsyncSession, sql: str, *args: Any) -> tuple[list[Row], Dialect]:
    """The rows `sql` returns, read in the session's transaction (begun if need be)."""
    connection = await session.connection()
    dialect = connection.dialect
    if dialect.name != "postgresql":
        result = await connection.exec_driver_sql(_for_sqlite(sql), args)
        return [dict(row) for row in result.mappings()], dialect
    fairy = await connection.get_raw_connection()
    adapted: Any = fairy.dbapi_connection
    try:
        # The adapter begins its transaction on its first statement: begin it here too, so
        # that what is read belongs to the session's transaction.
        async with adapted._execute_mutex:
            if adapted._transaction is None:
                await adapted._start_transaction()
            records = await adapted._connection.fetch(sql, *args)
    except Exception as error:
        raise await _failure(connection, adapted, error, sql, args) from None
    return [dict(record) for record in records], dialect


async def _failure(
    connection: AsyncConnection, adapted: Any, error: Exception, sql: str, args: Sequence[Any]
) -> StatementError:
    """`error` as SQLAlchemy would have raised it, the connection invalidated when lost, so
    that the one failure policy (`storage.db.is_unavailable`) reads it alike."""
    try:
        adapted._handle_exception(error)  # raises the driver error as a DB-API error
    except Exception as translated:
        dbapi_error = translated
    else:  # pragma: no cover - the adapter always raises
        dbapi_error = error
    lost = adapted._connection.is_closed() or is_broken_connection(error)
    if lost:
        await connection.invalidate(dbapi_error)
    dbapi = connection.dialect.loaded_dbapi
    return DBAPIError.instance(
        sql, list(args), dbapi_error, dbapi.Error, connection_invalidated=lost
    )


async def fetch_records(
    session: AsyncSession, model: type[ModelT], sql: str, *args: Any
) -> list[ModelT]:
    """The rows `sql` returns (every column of `model`'s table), as records of `model`."""
    rows, dialect = await fetch(session, sql, *args)
    return [record_of(model, row, dialect) for row in rows]


def record_of(model: type[ModelT], row: Row, dialect: Dialect) -> ModelT:
    """`row` as a (detached) record of `model`, each column converted as the ORM would."""
    values = {
        name: convert(row[name]) if convert is not None and row[name] is not None else row[name]
        for name, convert in _converters(model, dialect)
    }
    return cast(ModelT, model.model_construct(**values))


_Converters = Sequence[tuple[str, Callable[[Any], Any] | None]]
_CONVERTERS: dict[tuple[type[SQLModel], type[Dialect]], _Converters] = {}


def _converters(model: type[SQLModel], dialect: Dialect) -> _Converters:
    # Per dialect class, not instance: every engine of one driver converts alike.
    key = (model, type(dialect))
    found = _CONVERTERS.get(key)
    if found is None:
        table: Table = model.__table__  # type: ignore[attr-defined]
        found = _CONVERTERS[key] = tuple(
            (column.name, _converter(column.type, dialect)) for column in table.columns
        )
    return found


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
        return lambda value: decorator.process_result_value(value, dialect)
    return None


def _for_sqlite(sql: str) -> str:
    return _FOR_UPDATE.sub("", _PARAMETER.sub(r"?\1", sql))
