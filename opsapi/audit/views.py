"""HTTP handlers for reviewing the audit log: query, export, verify (auditors only)."""

from __future__ import annotations

import re

from sqlalchemy import func, select
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from opsapi.audit.query import (
    AUDIT,
    ExportFormat,
    Filters,
    check_parameters,
    decode_cursor,
    encode_cursor,
    export_stream,
    page_body,
    page_query,
    parse_filters,
    position_of,
)
from opsapi.audit.verify import Head, verify_chain
from opsapi.auth.identity import Role
from opsapi.errors import Unprocessable
from opsapi.http.endpoint import Call, endpoint
from opsapi.http.params import INT64_MAX, id_param, int_param, text_param

MAX_LIMIT = 1000
_FILTER_TEXTS = {"actor": 255, "action": 64, "service": 63}  # the columns' lengths
_HEAD = re.compile(r"([1-9][0-9]{0,17}):([0-9a-fA-F]{64})")
_MEDIA_TYPES: dict[ExportFormat, str] = {
    "csv": "text/csv; charset=utf-8",
    "ndjson": "application/x-ndjson",
}


@endpoint(action="audit.query", role=Role.AUDITOR)
async def query_events(call: Call) -> Response:
    """Audit events newest first: filters, `limit` (≤ 1000), opaque `cursor`."""
    params = call.request.query_params
    filters = _filters(call, also=("limit", "cursor"))
    call.details = {"filters": filters.describe()}
    limit = int_param(call.request, "limit", default=100, low=1, high=MAX_LIMIT)
    raw_cursor = params.get("cursor")
    before = decode_cursor(raw_cursor, filters) if raw_cursor is not None else None
    connection = await call.session.connection()
    # One row more than asked tells whether another page exists, without an empty last page.
    query = page_query(filters, before, limit + 1, connection.dialect.name)
    rows = (await connection.execute(query)).all()
    page = rows[:limit]
    next_cursor = None
    if len(rows) > limit:
        next_cursor = encode_cursor(position_of(page[-1][0], page[-1][1]), filters)
    return Response(
        page_body([row[2] for row in page], next_cursor),
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


@endpoint(action="audit.export", role=Role.AUDITOR)
async def export_events(call: Call) -> Response:
    """Every matching event, oldest first, streamed as CSV or NDJSON (`format`)."""
    params = call.request.query_params
    filters = _filters(call, also=("format",))
    raw_format = params.get("format")
    if raw_format not in _MEDIA_TYPES:
        raise Unprocessable("format must be csv or ndjson")
    fmt: ExportFormat = "csv" if raw_format == "csv" else "ndjson"
    connection = await call.session.connection()
    # The export is the log as of now: events committed while it streams are not included
    # (appends are serialised, so every id up to this one is already committed).
    last_id = int(await connection.scalar(select(func.max(AUDIT.c.id))) or 0)
    call.details = {"filters": filters.describe(), "format": fmt, "last_id": last_id}
    filename = f"audit-{call.now.strftime('%Y%m%dT%H%M%SZ')}.{fmt}"
    return StreamingResponse(
        export_stream(call.runtime.engine, filters, last_id, fmt),
        media_type=_MEDIA_TYPES[fmt],
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Cache-Control": "no-store",
        },
    )


@endpoint(action="audit.verify", role=Role.AUDITOR)
async def verify(call: Call) -> Response:
    """Walk the hash chain (from event `since_id` on, when given) and report the first break;
    with `expect_head=ID:HASH`, also whether that event is still in the chain."""
    params = call.request.query_params
    check_parameters(params, ("since_id", "expect_head"))
    since_id = id_param(call.request, "since_id", high=INT64_MAX)
    raw_head = params.get("expect_head")
    expect_head = None if raw_head is None else _expected_head(raw_head)
    report = await verify_chain(call.runtime.engine, since_id=since_id, expect_head=expect_head)
    head = report["head"]
    call.runtime.metrics.audit_head_id.set(head["id"] if head else 0)
    broken = report.get("first_broken")
    call.details = (
        {"intact": True, "events": report["events"], "last_id": report["last_id"]}
        if broken is None
        else {"intact": False, "first_broken_id": broken["id"], "reason": broken["reason"]}
    )
    call.details["head"] = head
    if since_id is not None:
        call.details["since_id"] = since_id
    if expect_head is not None:
        call.details["expected_head"] = report["expected_head"]
    return JSONResponse(report, headers={"Cache-Control": "no-store"})


def _filters(call: Call, *, also: tuple[str, ...]) -> Filters:
    """The request's filters; their text is read by the one parameter parser first (bounded,
    no control characters), the rest by the audit query's own rules."""
    for name, max_length in _FILTER_TEXTS.items():
        text_param(call.request, name, max_length=max_length)
    return parse_filters(call.request.query_params, also=also)


def _expected_head(raw: str) -> Head:
    """`ID:HASH` as kept from an earlier verification's `head`; 422 for anything else."""
    match = _HEAD.fullmatch(raw)
    if match is None:
        raise Unprocessable(
            "expect_head must be ID:HASH, an event id and its 64-hex-digit hash "
            "(the head of an earlier verification)"
        )
    return Head(int(match.group(1)), match.group(2).lower())


routes = [
    Route("/audit", query_events, methods=["GET"]),
    Route("/audit/export", export_events, methods=["GET"]),
    Route("/audit/verify", verify, methods=["GET"]),
]
