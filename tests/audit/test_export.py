"""GET /internal/ops/audit/export: CSV and NDJSON that round-trip, filtered, streamed."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from typing import Any
from urllib.parse import urlencode

import pytest
import sqlalchemy as sa

from opsapi.audit.chain import GENESIS, link
from opsapi.audit.models import AuditEvent
from opsapi.audit.query import COLUMNS, timestamp
from tests.audit.test_review_api import audit_get, insert_events
from tests.support.app import API, Harness


def oldest_first(events: list[AuditEvent]) -> list[AuditEvent]:
    return sorted(events, key=lambda e: (e.at, e.id))


def unescape(cell: str) -> str:
    """The stored text of a CSV cell: one leading apostrophe (formula guard) dropped."""
    return cell[1:] if cell.startswith("'") else cell


def from_csv(text: str) -> list[dict[str, Any]]:
    """CSV rows back into typed event documents (empty cell = null)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader)
    assert tuple(header) == COLUMNS
    documents = []
    for cells in reader:
        row: dict[str, Any] = dict(zip(header, map(unescape, cells), strict=True))
        for name in ("service", "request_id", "client_address"):
            row[name] = row[name] or None
        row["id"] = int(row["id"])
        row["rollout_id"] = int(row["rollout_id"]) if row["rollout_id"] else None
        row["roles"] = json.loads(row["roles"])
        row["details"] = json.loads(row["details"])
        documents.append(row)
    return documents


def from_ndjson(text: str) -> list[dict[str, Any]]:
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def document(event: AuditEvent) -> dict[str, Any]:
    return {**event.model_dump(), "at": timestamp(event.at)}


PARSERS = {"csv": from_csv, "ndjson": from_ndjson}


@pytest.mark.parametrize("fmt", ["csv", "ndjson"])
async def test_export_round_trips_every_event(api: Harness, fmt: str) -> None:
    # given 2,500 events, some with quotes, commas and non-ASCII text in their details
    await insert_events(api, 2500)
    expected = oldest_first(await api.audit_events())

    # when an auditor exports everything
    response = await audit_get(api, "/audit/export", format=fmt)

    # then every event comes back, oldest first, every column equal to the table's
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(
        "text/csv" if fmt == "csv" else "application/x-ndjson"
    )
    disposition = response.headers["content-disposition"]
    assert disposition.startswith("attachment;")
    assert disposition.endswith(f'.{fmt}"')
    assert PARSERS[fmt](response.text) == [document(e) for e in expected]
    # and the export's own audit event says what was exported, up to which event
    [event] = await api.audit_events(action="audit.export")
    assert event.details == {"status": 200, "filters": {}, "format": fmt, "last_id": 2500}


async def test_an_ndjson_export_can_be_verified_offline(api: Harness) -> None:
    # given events written through the API and through the chain directly
    await api.post("/canary/promote", {"service": "checkout", "version": "v2"})
    await insert_events(api, 300)
    await api.post("/canary/rollback", {"service": "checkout", "reason": 'latency, "p99"'})

    # when the whole log is exported
    response = await audit_get(api, "/audit/export", format="ndjson")

    # then the exported documents alone re-link into the chain, in id order
    documents = sorted(from_ndjson(response.text), key=lambda d: d["id"])
    previous = GENESIS
    for item in documents:
        assert item["prev_hash"] == previous
        assert link(previous, item) == item["hash"]
        previous = item["hash"]
    assert len(documents) == 302


FILTERS = [
    {"service": "checkout"},
    {"actor": "carol", "outcome": "denied"},
    {"source": "controller", "since": "2026-10-01T01:00:00Z", "until": "2026-10-01T02:30:00Z"},
    {"rollout_id": 4},
    {"action": "no-such-action"},
]


@pytest.mark.parametrize("fmt", ["csv", "ndjson"])
@pytest.mark.parametrize("params", FILTERS, ids=lambda p: "+".join(p))
async def test_filters_apply_to_exports(api: Harness, fmt: str, params: dict[str, Any]) -> None:
    await insert_events(api, 1500)
    listed: list[dict[str, Any]] = []
    cursor = None
    while True:
        extra = {"cursor": cursor} if cursor else {}
        page = (await audit_get(api, "/audit", limit=1000, **params, **extra)).json()
        listed.extend(page["items"])
        if (cursor := page["next_cursor"]) is None:
            break

    response = await audit_get(api, "/audit/export", format=fmt, **params)

    # the export holds what the query pages hold, in the opposite order
    assert response.status_code == 200, response.text
    assert PARSERS[fmt](response.text) == listed[::-1]


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({}, "format"),
        ({"format": "xlsx"}, "format"),
        ({"format": "csv", "limit": 10}, "limit"),
        ({"format": "csv", "outcome": "fine"}, "outcome"),
        ({"format": "csv", "since": "2026-13-01T00:00:00Z"}, "since"),
    ],
)
async def test_invalid_export_parameters_are_422(
    api: Harness, params: dict[str, Any], named: str
) -> None:
    response = await audit_get(api, "/audit/export", **params)

    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert named in response.json()["detail"]


async def _export_through_asgi(api: Harness, query: str) -> tuple[int, list[tuple[int, bytes]]]:
    """Call the app directly; every body chunk with the number of batch reads done by then."""
    reads = 0

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        nonlocal reads
        if statement.lstrip().startswith("SELECT") and "audit_event.id <=" in statement:
            reads += 1

    status = 0
    chunks: list[tuple[int, bytes]] = []
    finished = asyncio.Event()
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            if message.get("body"):
                chunks.append((reads, message["body"]))
            if not message.get("more_body"):
                finished.set()

    token = api.token("auditor").encode()
    path = API + "/audit/export"
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
        "root_path": "", "client": ("198.51.100.7", 40000), "server": ("opsapi", 80),
        "headers": [(b"host", b"opsapi"), (b"authorization", b"Bearer " + token)],
    }  # fmt: skip
    engine = api.runtime.engine.sync_engine
    sa.event.listen(engine, "before_cursor_execute", count)
    try:
        await api.app(scope, receive, send)
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)
    return status, chunks


@pytest.mark.parametrize("fmt", ["csv", "ndjson"])
async def test_a_large_export_is_streamed_batch_by_batch(api: Harness, fmt: str) -> None:
    # given 20,000 events
    await insert_events(api, 20_000, batch=2000)

    # when they are exported
    status, chunks = await _export_through_asgi(api, urlencode({"format": fmt}))

    # then the body leaves in many chunks, the first one before the second batch is read, and
    # the batches are read while the stream goes on: never the whole range at once
    assert status == 200
    assert len(chunks) >= 20
    reads_at_chunk = [reads for reads, _ in chunks if reads]
    assert reads_at_chunk[0] == 1
    assert reads_at_chunk == sorted(reads_at_chunk)
    assert reads_at_chunk[-1] >= 4
    body = b"".join(chunk for _, chunk in chunks).decode()
    rows = PARSERS[fmt](body)
    assert len(rows) == 20_000
    assert [row["id"] for row in rows] == sorted(row["id"] for row in rows)


async def test_events_arriving_during_an_export_are_not_in_it(api: Harness) -> None:
    # given an export under way when new events arrive (even with times inside its range)
    await insert_events(api, 12_000, batch=2000)
    (status, chunks), _ = await asyncio.gather(
        _export_through_asgi(api, "format=ndjson"),
        insert_events(api, 500, seed=5, batch=50),
    )

    # then the export is the log as it was when the export was asked for
    assert status == 200
    rows = from_ndjson(b"".join(chunk for _, chunk in chunks).decode())
    exported = {row["id"] for row in rows}
    [event] = await api.audit_events(action="audit.export")
    assert exported == set(range(1, event.details["last_id"] + 1))
    assert set(range(1, 12_001)) <= exported
    assert len(await api.audit_events()) > len(exported) + 1  # some arrived during the export


async def test_export_on_both_databases(api_any_db: Harness) -> None:
    api = api_any_db
    await insert_events(api, 700, batch=100)

    for fmt in ("csv", "ndjson"):
        expected = oldest_first(await api.audit_events(outcome="success"))
        response = await audit_get(api, "/audit/export", format=fmt, outcome="success")
        assert response.status_code == 200, response.text
        assert PARSERS[fmt](response.text) == [document(e) for e in expected]


# Cells a spreadsheet would evaluate as formulas (OWASP CSV injection), and one that begins
# with the guard itself.
FORMULAS = ["=cmd|' /C calc'!A0", "+1+1", "-2+3", "@SUM(1,2)", "\tx", "\rx", "'quoted"]


async def test_csv_cells_never_start_a_formula(api_any_db: Harness) -> None:
    # given events whose text cells begin with formula characters
    api = api_any_db
    for value in FORMULAS:
        await api.post("/canary/promote", {"service": "checkout"}, subject=value)
        response = await api.client.get(
            f"{API}/canary/checkout", headers={**api.auth("viewer"), "X-Request-Id": "-2-1"}
        )
        assert response.status_code in (200, 404)

    # when they are exported as CSV
    response = await audit_get(api, "/audit/export", format="csv")

    # then no cell starts with a formula character: each such cell is quoted behind a '
    rows = list(csv.reader(io.StringIO(response.text, newline="")))[1:]
    cells = [cell for row in rows for cell in row]
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")]
    assert {f"'{value}" for value in FORMULAS} <= set(cells)
    assert "'-2-1" in cells
    # and text cells are quoted in the file itself
    assert ",\"'=cmd|" in response.text
    # and dropping the one leading ' gives back exactly what is stored
    expected = oldest_first(await api.audit_events())
    assert from_csv(response.text) == [document(e) for e in expected[:-1]]
