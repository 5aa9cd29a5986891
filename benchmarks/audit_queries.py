"""Audit review on a large log: page latency and export throughput through the real HTTP API.

Creates a fresh PostgreSQL database, migrates it, loads a hash-chained audit log with COPY
(~200 services, ~50 actors, a dozen actions, 5 outcomes, 90 days), runs `opsapi serve` as a
child process and measures, as an auditor:

- p50/p99 of a filtered first page (service=X, actor=X, outcome=denied), a page reached by
  cursor deep into the range (500 pages in), and an unfiltered first page;
- CSV and NDJSON export throughput (events/s) of the whole log, with the server's resident
  memory (VmRSS) sampled at 10 %, 50 % and 100 % of the stream;
- the time `/audit/verify` takes over the whole chain.

The database is dropped at the end.

    .venv/bin/python benchmarks/audit_queries.py [--events 1000000] [--samples 200]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opsapi.audit.chain import GENESIS, canonical
from opsapi.auth.tokens import LocalSigner
from opsapi.storage.db import create_engine
from opsapi.storage.migrate import upgrade
from tests.support.processes import free_port, start_server, stop

ADMIN_DSN = os.environ.get("OPSAPI_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
API = "/internal/ops"

SERVICES = [f"svc-{i:03d}" for i in range(200)]
# Popularity falls off with rank, as it does in a real fleet (a few busy services, a long tail).
SERVICE_WEIGHTS = [1 / (rank + 1) ** 0.8 for rank in range(len(SERVICES))]
HUMANS = [f"user-{i:02d}@example.com" for i in range(48)]
HUMAN_ROLES = {actor: [["viewer"], ["operator"], ["admin"], ["auditor"]][i % 4]
               for i, actor in enumerate(HUMANS)}  # fmt: skip
API_ACTIONS = ["canary.get", "canary.list", "canary.history", "canary.weight", "canary.promote",
               "canary.rollback", "canary.pause", "canary.resume", "service.get", "service.put",
               "execute", "rollout.evaluations"]  # fmt: skip
API_ACTION_WEIGHTS = [30, 8, 6, 20, 10, 3, 2, 2, 8, 2, 6, 3]
OUTCOMES = ["success", "denied", "conflict", "error", "ignored"]
OUTCOME_WEIGHTS = [88, 5, 4, 2, 1]
COLUMNS = ["id", "at", "actor", "roles", "source", "action", "service", "rollout_id", "outcome",
           "request_id", "client_address", "details", "prev_hash", "hash"]  # fmt: skip


def synthetic_events(count: int, seed: int = 7) -> Iterator[dict[str, Any]]:
    """`count` plausible audit events in time order (times over the last 90 days)."""
    rng = random.Random(seed)
    end = datetime.now(UTC).replace(microsecond=0)
    start = end - timedelta(days=90)
    step = (end - start) / count
    for index in range(count):
        # Request start times, so not strictly in commit (id) order: a little jitter.
        at = start + step * index + timedelta(milliseconds=rng.randint(0, 1500))
        kind = rng.random()
        service = rng.choices(SERVICES, SERVICE_WEIGHTS)[0]
        if kind < 0.72:
            actor = rng.choice(HUMANS)
            action = rng.choices(API_ACTIONS, API_ACTION_WEIGHTS)[0]
            outcome = rng.choices(OUTCOMES, OUTCOME_WEIGHTS)[0]
            event = {"actor": actor, "roles": HUMAN_ROLES[actor], "source": "api",
                     "action": action, "outcome": outcome,
                     "request_id": uuid.UUID(int=rng.getrandbits(128)).hex,
                     "client_address": f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.7",
                     "details": {"status": {"success": 200, "denied": 403, "conflict": 409,
                                            "error": 422, "ignored": 200}[outcome]}}  # fmt: skip
            if action in ("canary.rollback", "canary.pause"):
                event["details"]["reason"] = rng.choice(["error rate up", "latency", "manual"])
        elif kind < 0.97:
            event = {"actor": "controller", "roles": [], "source": "controller",
                     "action": rng.choice(["canary.advance", "canary.rollback", "router.apply",
                                           "router.drift"]),
                     "outcome": "success", "request_id": None, "client_address": None,
                     "details": {"weight": rng.choice([10, 25, 50, 100])}}  # fmt: skip
        else:
            event = {"actor": "pagerduty", "roles": [], "source": "pagerduty",
                     "action": "canary.rollback", "outcome": rng.choice(["success", "ignored"]),
                     "request_id": None, "client_address": None,
                     "details": {"incident": f"Q{rng.getrandbits(40):010X}"}}  # fmt: skip
        event["at"] = at
        event["service"] = service
        event["rollout_id"] = rng.randint(1, 40_000) if event["action"] != "service.get" else None
        yield event


async def load_events(dsn: str, count: int, batch: int = 50_000) -> None:
    """COPY `count` chained events into the (empty) audit table, then VACUUM ANALYZE."""
    connection = await asyncpg.connect(dsn)
    try:
        previous = GENESIS
        records: list[tuple[Any, ...]] = []
        for index, event in enumerate(synthetic_events(count), start=1):
            # Same bytes as opsapi.audit.chain.link, without re-encoding the previous hash.
            digest = hashlib.sha256(previous.encode() + b"\n" + canonical(event)).hexdigest()
            records.append((index, event["at"], event["actor"], json.dumps(event["roles"]),
                            event["source"], event["action"], event["service"],
                            event["rollout_id"], event["outcome"], event["request_id"],
                            event["client_address"], json.dumps(event["details"]), previous,
                            digest))  # fmt: skip
            previous = digest
            if len(records) == batch:
                await connection.copy_records_to_table(
                    "audit_event", records=records, columns=COLUMNS
                )
                records = []
        if records:
            await connection.copy_records_to_table("audit_event", records=records, columns=COLUMNS)
        await connection.execute(
            "SELECT setval(pg_get_serial_sequence('audit_event', 'id'), $1)", count
        )
        await connection.execute("VACUUM ANALYZE audit_event")
    finally:
        await connection.close()


def percentile(samples: list[float], q: float) -> float:
    """The q-quantile of `samples` (seconds), in milliseconds."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of process `pid` in MiB: resident now, and its peak so far."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) // 1024
    return fields["VmRSS"], fields["VmHWM"]


async def timed_pages(
    client: httpx.AsyncClient,
    name: str,
    params: list[dict[str, Any]],
    samples: int,
    path: str = f"{API}/audit",
) -> None:
    """Request pages (cycling through `params`) `samples` times; print p50/p99."""
    latencies = []
    for index in range(samples):
        started = time.perf_counter()
        response = await client.get(path, params=params[index % len(params)])
        latencies.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
    print(
        f"  {name:<46} p50 {percentile(latencies, 0.50):6.2f} ms   "
        f"p99 {percentile(latencies, 0.99):6.2f} ms   max {max(latencies) * 1000:6.1f} ms   "
        f"n={samples}"
    )


async def cursor_after(client: httpx.AsyncClient, pages: int, **params: Any) -> str:
    """The cursor that opens page `pages + 1` of a query (walking there page by page)."""
    cursor = None
    for _ in range(pages):
        extra = {"cursor": cursor} if cursor else {}
        response = await client.get(f"{API}/audit", params={**params, **extra})
        cursor = response.json()["next_cursor"]
        assert cursor is not None, f"fewer than {pages} pages for {params}"
    assert cursor is not None
    return cursor


async def timed_export(client: httpx.AsyncClient, fmt: str, pid: int, events: int) -> None:
    """Stream a whole export; print events/s and the server's memory along the way."""
    marks = {int(events * 0.1): "10 %", int(events * 0.5): "50 %"}
    rss: list[str] = []
    before = memory(pid)
    lines = size = 0
    started = time.perf_counter()
    async with client.stream("GET", f"{API}/audit/export", params={"format": fmt}) as response:
        assert response.status_code == 200
        async for chunk in response.aiter_raw():
            size += len(chunk)
            lines += chunk.count(b"\n")
            for mark in [m for m in marks if lines >= m]:
                rss.append(f"{marks.pop(mark)}: {memory(pid)[0]} MiB")
        rss.append(f"100 %: {memory(pid)[0]} MiB")
    elapsed = time.perf_counter() - started
    exported = lines - (1 if fmt == "csv" else 0)
    print(
        f"  {fmt:<6} {exported:>9,} events in {elapsed:5.1f} s = {exported / elapsed:8,.0f} "
        f"events/s  ({size / elapsed / 2**20:5.1f} MiB/s, {size / 2**20:6.0f} MiB)"
    )
    print(
        f"         server VmRSS before {before[0]} MiB; during: {', '.join(rss)}; "
        f"peak (VmHWM) {memory(pid)[1]} MiB"
    )
    assert exported >= events


async def explain(dsn: str, cursor_id: int) -> None:
    """The plans of the measured queries, as PostgreSQL runs them."""
    from sqlalchemy.dialects import postgresql

    from opsapi.audit.query import Filters, Position, page_query

    connection = await asyncpg.connect(dsn)
    try:
        row = await connection.fetchrow("SELECT at, id FROM audit_event WHERE id = $1", cursor_id)
        deep = Position(row["at"], row["id"])
        for name, filters, before in [
            ("service=svc-100, first page", Filters(service="svc-100"), None),
            ("unfiltered, deep cursor", Filters(), deep),
            ("outcome=denied, deep cursor", Filters(outcome="denied"), deep),
            ("source=system (none such)", Filters(source="system"), None),
        ]:
            sql = page_query(filters, before, 101).compile(
                dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}
            )
            plan = await connection.fetch(f"EXPLAIN (ANALYZE, COSTS OFF) {sql}")
            nodes = [r[0].strip() for r in plan if "Scan" in r[0] or "Sort" in r[0]]
            timing = [r[0] for r in plan if r[0].startswith("Execution Time")]
            print(f"  {name:<30} {' / '.join(nodes)}  [{timing[0]}]")
    finally:
        await connection.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--deep", type=int, default=500, help="pages walked for the deep cursor")
    args = parser.parse_args()

    name = f"opsapi_bench_audit_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"
    url = dsn.replace("postgresql://", "postgresql+asyncpg://")
    workdir = Path(tempfile.mkdtemp(prefix="opsapi-bench-audit-"))
    server = None
    try:
        engine = create_engine(url)
        await upgrade(engine)
        await engine.dispose()
        started = time.perf_counter()
        await load_events(dsn, args.events)
        print(
            f"loaded {args.events:,} chained audit events (COPY, then VACUUM ANALYZE) in "
            f"{time.perf_counter() - started:.1f} s; {os.cpu_count()} cores shared by "
            "PostgreSQL, the server and this client"
        )

        key_file = workdir / "key.json"
        port = free_port()
        env = {
            "OPSAPI_DATABASE_URL": url,
            "OPSAPI_LOCAL_KEY_FILE": str(key_file),
            "OPSAPI_ENV": "test",
            "OPSAPI_CONTROLLER_ENABLED": "false",
            "OPSAPI_PAGERDUTY_WORKER_ENABLED": "false",
        }
        server = start_server(port, env, workdir / "server.log")
        token = LocalSigner.load_or_create(key_file).mint(subject="bench", roles=["auditor"])
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=600
        ) as client:
            # Every request below also commits its own audit event before it is answered.
            print(
                "\npage latency through HTTP (limit 100; each request also commits its audit event)"
            )
            await timed_pages(client, "warm-up", [{}], 50)
            # What any request costs here (no database work but its own audit event).
            await timed_pages(client, "baseline: GET /healthz (not audited)", [{}],
                              args.samples, "/healthz")  # fmt: skip
            await timed_pages(client, "baseline: GET /canary (audited read)", [{}],
                              args.samples, f"{API}/canary")  # fmt: skip
            services = [{"service": s} for s in SERVICES]
            await timed_pages(client, "filtered first page (service=X, 200 services)", services,
                              args.samples)  # fmt: skip
            actors = [{"actor": a} for a in HUMANS]
            await timed_pages(client, "filtered first page (actor=X, 48 actors)", actors,
                              args.samples)  # fmt: skip
            await timed_pages(client, "filtered first page (outcome=denied)",
                              [{"outcome": "denied"}], args.samples)  # fmt: skip
            await timed_pages(client, "filtered first page (service+outcome+since)",
                              [{"service": s, "outcome": "error",
                                "since": "2000-01-01T00:00:00Z"} for s in SERVICES],
                              args.samples)  # fmt: skip
            await timed_pages(client, "unfiltered first page", [{}], args.samples)
            deep = await cursor_after(client, args.deep)
            await timed_pages(client, f"unfiltered page {args.deep + 1} (by cursor)",
                              [{"cursor": deep}], args.samples)  # fmt: skip
            deep_service = await cursor_after(client, args.deep, service=SERVICES[0])
            await timed_pages(client, f"service={SERVICES[0]} page {args.deep + 1} (by cursor)",
                              [{"service": SERVICES[0], "cursor": deep_service}],
                              args.samples)  # fmt: skip
            await timed_pages(client, "first page of 1000 (limit=1000)", [{"limit": 1000}], 50)

            print("\nquery plans (EXPLAIN ANALYZE, PostgreSQL)")
            await explain(dsn, args.events // 2)

            print("\nexport through HTTP (whole log, streamed)")
            assert server is not None
            for fmt in ("csv", "ndjson"):
                await timed_export(client, fmt, server.pid, args.events)

            print("\nchain verification through HTTP")
            started = time.perf_counter()
            report = (await client.get(f"{API}/audit/verify")).json()
            elapsed = time.perf_counter() - started
            print(
                f"  /audit/verify: intact={report['intact']} events={report['events']:,} in "
                f"{elapsed:.1f} s = {report['events'] / elapsed:,.0f} events/s"
            )
            started = time.perf_counter()
            tail = (
                await client.get(
                    f"{API}/audit/verify", params={"since_id": report["last_id"] - 10_000}
                )
            ).json()
            print(
                f"  /audit/verify?since_id=(last - 10,000): intact={tail['intact']} "
                f"events={tail['events']:,} in {(time.perf_counter() - started) * 1000:.0f} ms"
            )
    finally:
        if server is not None:
            stop(server)
        shutil.rmtree(workdir, ignore_errors=True)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        print(f"\ndropped database {name}")


if __name__ == "__main__":
    asyncio.run(main())
