"""Throughput and latency of one `opsapi serve` process on PostgreSQL.

Status reads (GET /canary/{service}) and writes (promote-to-start / rollback pairs), each
request with its audit event, under concurrent clients. Prints requests/s and p50/p99.

    .venv/bin/python benchmarks/api_throughput.py [--seconds 10] [--clients 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opsapi.auth.tokens import LocalSigner  # noqa: E402
from tests.support.processes import free_port, start_server, stop  # noqa: E402

ADMIN_DSN = os.environ.get("OPSAPI_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
API = "/internal/ops"


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def report(name: str, latencies: list[float], errors: int, seconds: float) -> None:
    print(
        f"{name:<28} {len(latencies) / seconds:8.0f} req/s   "
        f"p50 {percentile(latencies, 0.50):6.1f} ms   p99 {percentile(latencies, 0.99):6.1f} ms   "
        f"mean {statistics.fmean(latencies) * 1000:6.1f} ms   n={len(latencies)} errors={errors}"
    )


async def run_phase(client: httpx.AsyncClient, clients: int, seconds: float, work) -> tuple:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker(index: int) -> None:
        nonlocal errors
        step = 0
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            ok = await work(client, index, step)
            latencies.append(time.perf_counter() - started)
            errors += not ok
            step += 1

    began = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(clients)))
    return latencies, errors, time.perf_counter() - began


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=32)
    args = parser.parse_args()

    name = f"opsapi_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    workdir = Path(tempfile.mkdtemp(prefix="opsapi-bench-"))
    key_file = workdir / "key.json"
    url = ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://") + f"/{name}"
    port = free_port()
    env = {"OPSAPI_DATABASE_URL": url, "OPSAPI_LOCAL_KEY_FILE": str(key_file), "OPSAPI_ENV": "test"}
    server = start_server(port, env, workdir / "server.log")
    try:
        token = LocalSigner.load_or_create(key_file).mint(subject="bench", roles=["operator"])
        headers = {"Authorization": f"Bearer {token}"}
        limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}{API}", headers=headers, limits=limits, timeout=30
        ) as client:
            for i in range(args.clients):
                await client.post("/canary/promote", json={"service": f"svc-{i}", "version": "v1"})

            async def read(client: httpx.AsyncClient, index: int, step: int) -> bool:
                response = await client.get(f"/canary/svc-{index}")
                return response.status_code == 200

            async def write(client: httpx.AsyncClient, index: int, step: int) -> bool:
                # Alternate rollback / start so that every request is a real state change.
                if step % 2 == 0:
                    body = {"service": f"svc-{index}", "reason": "bench"}
                    response = await client.post("/canary/rollback", json=body)
                else:
                    body = {"service": f"svc-{index}", "version": f"v{step + 2}"}
                    response = await client.post("/canary/promote", json=body)
                return response.status_code == 200

            print(f"one server process, PostgreSQL, {args.clients} concurrent clients, "
                  f"{args.seconds:.0f} s per phase, {os.cpu_count()} cores (clients share them)")
            await run_phase(client, args.clients, 2, read)  # warm-up
            report("status reads", *await run_phase(client, args.clients, args.seconds, read))
            report("promote/rollback writes", *await run_phase(
                client, args.clients, args.seconds, write))
        events = await admin.fetchval(f'SELECT 1')  # keep the admin connection alive
        del events
    finally:
        stop(server)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
