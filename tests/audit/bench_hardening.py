"""Figures for the audit hardening: run `python -m tests.audit.bench_hardening [section…]`.

Sections (default: all): `poison` (share of another user's reads failing while two attacker
loops send unstorable /execute params), `growth` (table bytes per refused 60 KB call),
`event_row` (cost of building an event), `bisect` (a group commit with one bad event),
`export` (CSV and NDJSON export rate), `verify` (chain verification rate). Uses a fresh PostgreSQL
database (OPSAPI_TEST_PG_DSN) and the application in-process; prints numbers only.
"""

from __future__ import annotations

import asyncio
import base64
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from opsapi.audit import chain
from opsapi.audit.models import Outcome, Source
from opsapi.audit.service import event_row
from tests.audit.test_review_api import synthetic_rows
from tests.support.app import API, Harness, running_app
from tests.support.databases import create_pg_database, drop_pg_database


async def poison(api: Harness) -> None:
    """Two attacker loops with NaN / lone-surrogate params; one reader in waves of 10."""
    bodies = [
        b'{"operation": "health-check", "params": {"n": NaN}}',
        b'{"operation": "health-check", "params": {"s": "\\ud800"}}',
    ]
    headers = {**api.auth("viewer", "mallory"), "content-type": "application/json"}
    stop = asyncio.Event()
    attacks: list[int] = []

    async def attacker() -> None:
        while not stop.is_set():
            for body in bodies:
                response = await api.client.post(API + "/execute", content=body, headers=headers)
                attacks.append(response.status_code)

    async def reader() -> list[int]:
        statuses = []
        for _ in range(60):
            pages = await asyncio.gather(*(api.get(f"/canary/svc-{i}") for i in range(10)))
            statuses += [page.status_code for page in pages]
        stop.set()
        return statuses

    *_, reads = await asyncio.gather(attacker(), attacker(), reader())
    failed = sum(status >= 500 for status in reads)
    print(f"poison: {len(reads)} reads by another user, {failed} failed "
          f"({100 * failed / len(reads):.1f} %); attacker calls {len(attacks)}, "
          f"statuses {sorted(set(attacks))}")  # fmt: skip


async def growth(api: Harness) -> None:
    """Table bytes (rows, TOAST, indexes) per refused call with 60 KB of incompressible params:
    one large value (cut to a marker), and 600 values of 90 characters (the budget filled)."""

    async def table_bytes() -> int:
        async with api.runtime.engine.connect() as connection:
            await connection.execute(sa.text("CHECKPOINT"))
            value = await connection.scalar(sa.text("SELECT pg_total_relation_size('audit_event')"))
        return int(value)

    def one_value() -> dict[str, Any]:
        return {"blob": base64.b64encode(os.urandom(45_000)).decode()}

    def many_values() -> dict[str, Any]:
        return {f"k{i:03d}": base64.b64encode(os.urandom(66)).decode() for i in range(600)}

    calls = 300
    for label, params in (("one 60 KB value", one_value), ("600 values", many_values)):
        before = await table_bytes()
        started = time.perf_counter()
        for _ in range(calls):
            await api.post("/execute", {"operation": "health-check", "params": params()},
                           role="viewer")  # fmt: skip
        elapsed = time.perf_counter() - started
        grown = await table_bytes() - before
        print(f"growth: {calls} refused calls ({label}) grew audit_event by "
              f"{grown / 1024:,.0f} KiB, {grown / calls:,.0f} bytes a call; "
              f"{calls / elapsed:.0f} calls/s in-process")  # fmt: skip


def event_rows() -> None:
    """Microseconds to build one event: a typical read, and a refusal with 60 KB of params."""
    now = api_clock()
    typical = {"status": 200, "filters": {"service": "checkout"}, "n": 1.5}
    large = {"status": 422, "detail": "invalid parameters", "params": {"blob": "A" * 60_000}}
    for name, details, repeat in (("typical", typical, 20_000), ("60 KB", large, 300)):
        samples = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(repeat):
                event_row(at=now, actor="alice", roles=["viewer"], source=Source.API,
                          action="canary.get", outcome=Outcome.ERROR, details=details)  # fmt: skip
            samples.append((time.perf_counter() - started) / repeat * 1e6)
        print(
            f"event_row: {name} details {statistics.median(samples):.1f} µs an event "
            f"(median of 5 runs of {repeat})"
        )


def api_clock() -> Any:
    from datetime import UTC, datetime

    return datetime(2026, 11, 22, 12, tzinfo=UTC)


async def bisect(api: Harness) -> None:
    """One group commit of 500 events: clean, and with one event PostgreSQL refuses."""
    writer = api.runtime.audit_writer
    for label, bad in (("clean", False), ("one bad", True)):
        rows = synthetic_rows(500, seed=7)
        if bad:
            rows[250] = {**rows[250], "details": {"n": math.nan}}  # bypasses event_row
        started = time.perf_counter()
        results = await asyncio.gather(*(writer.write(r) for r in rows), return_exceptions=True)
        elapsed = time.perf_counter() - started
        failed = sum(isinstance(r, BaseException) for r in results)
        print(f"bisect: batch of 500, {label}: {elapsed * 1000:.0f} ms, {failed} failed")


async def export(api: Harness) -> None:
    """Whole-log CSV and NDJSON exports of 100,000 events through the API, events/s."""
    rows = synthetic_rows(100_000, seed=5)
    for index in range(0, len(rows), 100):
        rows[index] = {**rows[index], "actor": "=cmd|' /C calc'!A0"}
    for first in range(0, len(rows), 5000):
        async with api.runtime.engine.begin() as connection:
            await chain.append(connection, rows[first : first + 5000])
    headers = api.auth("auditor")
    for fmt in ("csv", "ndjson", "csv", "ndjson"):
        started = time.perf_counter()
        response = await api.client.get(f"{API}/audit/export?format={fmt}", headers=headers)
        elapsed = time.perf_counter() - started
        lines = response.text.count("\n") - (1 if fmt == "csv" else 0)
        print(f"export: {fmt} {lines:,} events in {elapsed:.2f} s, {lines / elapsed:,.0f} events/s")


async def verify(api: Harness) -> None:
    """Whole-chain verification rate over 50,000 events."""
    from opsapi.audit.verify import verify_chain

    rows = synthetic_rows(50_000, seed=3)
    for first in range(0, len(rows), 5000):
        async with api.runtime.engine.begin() as connection:
            await chain.append(connection, rows[first : first + 5000])
    started = time.perf_counter()
    report = await verify_chain(api.runtime.engine)
    elapsed = time.perf_counter() - started
    print(f"verify: {report['events']:,} events in {elapsed:.2f} s, "
          f"{report['events'] / elapsed:,.0f} events/s, intact={report['intact']}")  # fmt: skip


async def main(sections: list[str]) -> None:
    name, url = await create_pg_database()
    key_file = Path(tempfile.mkdtemp()) / "key.json"
    try:
        async with running_app(url, key_file) as api:
            for section in sections:
                if section == "event_row":
                    event_rows()
                else:
                    await {"poison": poison, "growth": growth, "bisect": bisect,
                           "export": export, "verify": verify}[section](api)  # fmt: skip
    finally:
        await drop_pg_database(name)


if __name__ == "__main__":
    chosen = sys.argv[1:] or ["poison", "growth", "event_row", "bisect", "export", "verify"]
    asyncio.run(main(chosen))
