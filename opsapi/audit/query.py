"""Reading the audit log: filters, the opaque page cursor, page and export queries, formats.

Pages and exports are ordered by (at, id): every filter column has a (column, at, id) index,
so a filtered page, however deep its cursor, is a single index range scan. `id` breaks ties
between events of the same instant. The rows are immutable (append-only table), so a keyset
walk over them never returns an event twice and never skips one that existed when it began.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import csv
import hashlib
import io
import json
import re
import struct
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import SQLModel
from starlette.datastructures import QueryParams

from opsapi.audit.models import AuditEvent, Outcome, Source
from opsapi.errors import Unprocessable
from opsapi.storage.types import UTCDateTime

AUDIT: sa.Table = SQLModel.metadata.tables[AuditEvent.__tablename__]

# Every column, in the order of export files and of each event in an answer.
COLUMNS = (
    "id", "at", "actor", "roles", "source", "action", "service", "rollout_id", "outcome",
    "request_id", "client_address", "details", "prev_hash", "hash",
)  # fmt: skip
FILTERS = ("actor", "action", "service", "rollout_id", "outcome", "source", "since", "until")
_TEXT_LIMITS = {"actor": 255, "action": 64, "service": 63}
_MAX_ROLLOUT_ID = 2**31 - 1  # the column is a 32-bit integer on PostgreSQL
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CURSOR = struct.Struct(">Bqq")  # version, `at` in microseconds since the epoch, id
_CURSOR_VERSION = 1
_CURSOR_CHECK = 8

ExportFormat = Literal["csv", "ndjson"]


@dataclass(frozen=True)
class Filters:
    """What a reviewer asked for; every given filter must match (AND)."""

    actor: str | None = None
    action: str | None = None
    service: str | None = None
    rollout_id: int | None = None
    outcome: str | None = None
    source: str | None = None
    since: datetime | None = None  # inclusive
    until: datetime | None = None  # exclusive

    def conditions(self) -> list[sa.ColumnElement[bool]]:
        """The SQL conditions these filters stand for."""
        c = AUDIT.c
        where: list[sa.ColumnElement[bool]] = [
            c[name] == value
            for name in ("actor", "action", "service", "rollout_id", "outcome", "source")
            if (value := getattr(self, name)) is not None
        ]
        if self.since is not None:
            where.append(c.at >= _timestamp_param(self.since))
        if self.until is not None:
            where.append(c.at < _timestamp_param(self.until))
        return where

    def describe(self) -> dict[str, Any]:
        """The given filters as JSON values (for audit details and the cursor check)."""
        described: dict[str, Any] = {}
        for name in FILTERS:
            value = getattr(self, name)
            if value is not None:
                described[name] = timestamp(value) if isinstance(value, datetime) else value
        return described


@dataclass(frozen=True)
class Position:
    """Where a walk stands: the (at, id) of the last event handed out."""

    at: datetime
    id: int


def parse_filters(params: QueryParams, *, also: Sequence[str] = ()) -> Filters:
    """The filters in `params`; 422 for an unknown, repeated, empty or malformed parameter."""
    check_parameters(params, (*FILTERS, *also))
    values: dict[str, Any] = {}
    for name, limit in _TEXT_LIMITS.items():
        raw = params.get(name)
        if raw is not None:
            values[name] = _text(name, raw, limit)
    for name, enum in (("outcome", Outcome), ("source", Source)):
        raw = params.get(name)
        if raw is not None:
            allowed = [member.value for member in enum]
            if raw not in allowed:
                raise Unprocessable(f"{name} must be one of: {', '.join(allowed)}")
            values[name] = raw
    raw_rollout = params.get("rollout_id")
    if raw_rollout is not None:
        if not (raw_rollout.isascii() and raw_rollout.isdigit()) or len(raw_rollout) > 10:
            raise Unprocessable("rollout_id must be a whole number")
        if int(raw_rollout) > _MAX_ROLLOUT_ID:
            raise Unprocessable(f"rollout_id must be at most {_MAX_ROLLOUT_ID}")
        values["rollout_id"] = int(raw_rollout)
    for name in ("since", "until"):
        raw = params.get(name)
        if raw is not None:
            values[name] = parse_timestamp(name, raw)
    filters = Filters(**values)
    if filters.since and filters.until and filters.since > filters.until:
        raise Unprocessable("since must not be later than until")
    return filters


def _text(name: str, raw: str, limit: int) -> str:
    if not raw:
        # An unset shell variable must not turn a filtered query into an unfiltered one.
        raise Unprocessable(f"{name} must not be empty")
    if len(raw) > limit or "\x00" in raw:
        raise Unprocessable(f"{name} must be at most {limit} characters, without NUL")
    return raw


def check_parameters(params: QueryParams, allowed: Sequence[str]) -> None:
    """422 unless every parameter is known and given once.

    A misspelt filter silently ignored would hand a reviewer the whole log as if filtered.
    """
    seen: set[str] = set()
    for name, _ in params.multi_items():
        if name not in allowed:
            raise Unprocessable(
                f"unknown query parameter {name[:64]!r}; allowed: {', '.join(allowed)}"
            )
        if name in seen:
            raise Unprocessable(f"{name} may be given only once")
        seen.add(name)


def parse_timestamp(name: str, raw: str) -> datetime:
    """An RFC 3339 timestamp with an offset (`Z` or ±hh:mm), as aware UTC; else 422."""
    match = _RFC3339.fullmatch(raw)
    problem = (
        f"{name} must be an RFC 3339 timestamp such as 2026-11-22T12:00:00Z "
        "(a + in an offset must be sent as %2B)"
    )
    if match is None:
        raise Unprocessable(problem)
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    try:
        offset = timedelta(0) if zulu else timedelta(hours=int(off_h), minutes=int(off_m))
        if sign == "-":
            offset = -offset
        # Finer than microseconds is truncated: the database keeps microseconds.
        micro = int((fraction or "0")[:6].ljust(6, "0"))
        local = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second),
                         micro)  # fmt: skip
        return (local - offset).replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise Unprocessable(problem) from None


def timestamp(value: datetime) -> str:
    """RFC 3339 UTC with microseconds: the exact text the hash chain covers."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- the cursor -------------------------------------------------------------------------------


def encode_cursor(position: Position, filters: Filters) -> str:
    """An opaque cursor for the page after `position`, valid only with the same filters."""
    micros = (position.at - _EPOCH) // timedelta(microseconds=1)
    payload = _CURSOR.pack(_CURSOR_VERSION, micros, position.id)
    return base64.urlsafe_b64encode(payload + _check(payload, filters)).rstrip(b"=").decode()


def decode_cursor(raw: str, filters: Filters) -> Position:
    """The position in a cursor this API returned for these filters; 422 for anything else."""
    refused = Unprocessable("cursor is not one this API returned for these filters")
    if not raw.isascii() or len(raw) > 64:
        raise refused
    try:
        data = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
    except (binascii.Error, ValueError):
        raise refused from None
    if len(data) != _CURSOR.size + _CURSOR_CHECK:
        raise refused
    payload, check = data[: _CURSOR.size], data[_CURSOR.size :]
    version, micros, event_id = _CURSOR.unpack(payload)
    if version != _CURSOR_VERSION or check != _check(payload, filters):
        raise refused
    try:
        return Position(_EPOCH + timedelta(microseconds=micros), event_id)
    except OverflowError:
        raise refused from None


def _check(payload: bytes, filters: Filters) -> bytes:
    # A checksum, not a signature: it catches garbage, truncation and a cursor replayed with
    # other filters. Forging one gains nothing; it only names a place in a log the caller
    # may read anyway.
    described = json.dumps(filters.describe(), sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(b"opsapi.audit.cursor\0" + payload + described.encode())
    return digest.digest()[:_CURSOR_CHECK]


# --- queries ---------------------------------------------------------------------------------
#
# The database renders each event (JSON document, CSV cells) itself: decoding rows into Python
# objects and encoding them again costs several times more than the query, and an export of a
# million events would spend its time there. Both dialects give the same columns and values.

_PG_AT = """to_char(audit_event.at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""
# SQLite holds the naive UTC text SQLAlchemy wrote, always with microseconds.
_SQLITE_AT = "(replace(audit_event.at, ' ', 'T') || 'Z')"
_JSON_COLUMNS = ("roles", "details")


def _at_text(dialect: str) -> str:
    return _PG_AT if dialect == "postgresql" else _SQLITE_AT


def _document(dialect: str) -> sa.ColumnElement[str]:
    """The event as one JSON object (the columns in COLUMNS order) rendered by the database."""
    if dialect == "postgresql":
        fields = ", ".join(
            f"{_PG_AT} AS at" if name == "at" else f"audit_event.{name}" for name in COLUMNS
        )
        # Only constant column names go into this text, never a value.
        sql = f"(SELECT row_to_json(d)::text FROM (SELECT {fields}) AS d)"  # noqa: S608
    else:
        pairs = []
        for name in COLUMNS:
            value = f"audit_event.{name}"
            if name == "at":
                value = _SQLITE_AT
            elif name in _JSON_COLUMNS:
                value = f"json({value})"
            pairs.append(f"'{name}', {value}")
        sql = f"json_object({', '.join(pairs)})"
    return sa.literal_column(sql, sa.Text())


# A text cell beginning with one of these is taken for a formula by spreadsheets (OWASP CSV
# injection); with an apostrophe in front it is shown as text. A cell that itself begins with
# an apostrophe gets one too, so that dropping one leading apostrophe always restores the value.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'", "\x00")


def _neutralised(cell: sa.ColumnElement[Any], dialect: str) -> sa.ColumnElement[Any]:
    # Constants rendered into the SQL; NUL only on SQLite (PostgreSQL text cannot hold it).
    code = "chr" if dialect == "postgresql" else "char"
    starts = [f"'{c}'" for c in "=+-@"] + [f"{code}(9)", f"{code}(13)", "''''"]
    if dialect != "postgresql":
        starts.append("char(0)")
    one: sa.ColumnElement[int] = sa.literal_column("1", sa.Integer())
    first = sa.func.substr(cell, one, one)
    guarded = sa.literal_column("''''", sa.Text()).concat(cell)
    return sa.case((first.in_([sa.literal_column(s) for s in starts]), guarded), else_=cell)


def _cells(dialect: str) -> list[sa.ColumnElement[Any]]:
    """The CSV cells of an event: COLUMNS, `at` as RFC 3339 text, JSON columns as JSON text;
    every text cell that could start a formula behind a `'`."""
    cells: list[sa.ColumnElement[Any]] = []
    for name in COLUMNS:
        if name == "at":
            cell: sa.ColumnElement[Any] = sa.literal_column(_at_text(dialect), sa.Text())
        elif name in _JSON_COLUMNS:
            cell = sa.cast(AUDIT.c[name], sa.Text())
        elif isinstance(AUDIT.c[name].type, sa.Integer):
            cells.append(AUDIT.c[name])
            continue
        else:
            cell = AUDIT.c[name]
        cells.append(_neutralised(cell, dialect).label(name))
    return cells


def _timestamp_param(value: datetime) -> sa.BindParameter[datetime]:
    # Typed, so that SQLite compares against the same text form the column holds.
    return sa.bindparam(None, value, type_=UTCDateTime())


def _key() -> sa.Tuple:
    return sa.tuple_(AUDIT.c.at, AUDIT.c.id)


def _position(position: Position) -> sa.Tuple:
    return sa.tuple_(_timestamp_param(position.at), sa.literal(position.id, sa.BigInteger()))


def page_query(
    filters: Filters, before: Position | None, limit: int, dialect: str = "postgresql"
) -> sa.Select[Any]:
    """Newest first: (id, at text, JSON document) of up to `limit` matching events below
    `before`."""
    at = sa.literal_column(_at_text(dialect), sa.Text())
    query = sa.select(AUDIT.c.id, at, _document(dialect)).where(*filters.conditions())
    if before is not None:
        query = query.where(_key() < _position(before))
    return query.order_by(AUDIT.c.at.desc(), AUDIT.c.id.desc()).limit(limit)


def export_query(
    filters: Filters,
    after: Position | None,
    last_id: int,
    limit: int,
    *,
    dialect: str = "postgresql",
    fmt: ExportFormat = "ndjson",
) -> sa.Select[Any]:
    """Oldest first: the next `limit` matching events after `after`, none above `last_id`;
    CSV cells, or (id, at text, JSON document)."""
    if fmt == "csv":
        columns = _cells(dialect)
    else:
        columns = [AUDIT.c.id, sa.literal_column(_at_text(dialect), sa.Text()), _document(dialect)]
    query = sa.select(*columns).where(*filters.conditions(), AUDIT.c.id <= last_id)
    if after is not None:
        query = query.where(_key() > _position(after))
    return query.order_by(AUDIT.c.at, AUDIT.c.id).limit(limit)


def position_of(event_id: int, at_text: str) -> Position:
    """The position of an event from its id and rendered `at`."""
    at = datetime.strptime(at_text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return Position(at, event_id)


async def last_event_id(engine: AsyncEngine) -> int:
    """The highest event id committed so far (0 when the log is empty)."""
    async with engine.connect() as connection:
        value = await connection.scalar(sa.select(sa.func.max(AUDIT.c.id)))
    return int(value or 0)


# --- formats ----------------------------------------------------------------------------------


def page_body(documents: Sequence[str], next_cursor: str | None) -> bytes:
    """The JSON answer of one page, around documents the database rendered."""
    return (
        '{"items":[' + ",".join(documents) + '],"next_cursor":' + json.dumps(next_cursor) + "}"
    ).encode()


def csv_header() -> bytes:
    """The CSV header line."""
    return (",".join(COLUMNS) + "\r\n").encode()


def _csv(rows: Sequence[Sequence[Any]]) -> bytes:
    buffer = io.StringIO()
    # Every text cell quoted (numbers are not); None is an empty cell. The cells come from
    # `_cells`, formula guard included.
    csv.writer(buffer, quoting=csv.QUOTE_NONNUMERIC).writerows(rows)
    return buffer.getvalue().encode()


def _ndjson(rows: Sequence[Sequence[Any]]) -> bytes:
    return "".join([row[2] + "\n" for row in rows]).encode()


async def export_stream(
    engine: AsyncEngine,
    filters: Filters,
    last_id: int,
    fmt: ExportFormat,
    *,
    batch_size: int = 5000,
    chunk_rows: int = 1000,
) -> AsyncIterator[bytes]:
    """Matching events up to `last_id`, oldest first, encoded in chunks; constant memory.

    Each batch is read in its own short transaction: a long export holds no snapshot and no
    connection between batches (no vacuum held back; on SQLite, no database lock held).
    """
    encode = _csv if fmt == "csv" else _ndjson
    dialect = engine.dialect.name
    if fmt == "csv":
        yield csv_header()
    after: Position | None = None
    while True:
        query = export_query(filters, after, last_id, batch_size, dialect=dialect, fmt=fmt)
        async with engine.connect() as connection:
            rows = (await connection.execute(query)).all()
        for start in range(0, len(rows), chunk_rows):
            yield encode(rows[start : start + chunk_rows])
            # Let other requests run between chunks, whatever the client's pace.
            await asyncio.sleep(0)
        if len(rows) < batch_size:
            return
        after = position_of(rows[-1][0], rows[-1][1])
