"""Throughput and latency of one `opsapi serve` process on PostgreSQL.

Status reads (GET /canary/{service}) and writes (promote-to-start / rollback pairs), each
request with its audit event, under concurrent clients. Prints requests/s and p50/p99.

    .venv/bin/python benchmarks/api_throughput.py [--seconds 10] [--clients 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opsapi.auth.tokens import LocalSigner
from tests.support.processes import free_port, start_server, stop

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


def wrk_reads(port: int, token: str, clients: int, seconds: float) -> str:
    command = [
        "wrk", "-t2", f"-c{clients}", f"-d{int(seconds)}s", "--latency",
        "-H", f"Authorization: Bearer {token}",
        f"http://127.0.0.1:{port}{API}/canary/svc-0",
    ]  # fmt: skip
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"50%\s+(\S+)", output)
    p99 = re.search(r"99%\s+(\S+)", output)
    return (
        f"{'status reads (wrk client)':<28} {float(rate.group(1)) if rate else 0:8.0f} req/s   "
        f"p50 {p50.group(1) if p50 else '?':>8}   p99 {p99.group(1) if p99 else '?':>8}"
    )


class RawClient:
    """A minimal keep-alive HTTP/1.1 client: httpx costs the shared CPU more than the server."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.auth = f"Authorization: Bearer {token}\r\n"
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def request(self, method: str, path: str, body: dict | None = None) -> int:
        if self.streams is None:
            self.streams = await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = self.streams
        payload = json.dumps(body).encode() if body is not None else b""
        head = (
            f"{method} {API}{path} HTTP/1.1\r\nHost: bench\r\n{self.auth}"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        writer.write(head.encode() + payload)
        status_line = await reader.readline()
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        await reader.readexactly(length)
        return int(status_line.split()[1])


async def run_phase(clients: list[RawClient], seconds: float, work) -> tuple:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker(index: int) -> None:
        nonlocal errors
        step = 0
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            ok = await work(clients[index], index, step)
            latencies.append(time.perf_counter() - started)
            errors += not ok
            step += 1

    began = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(len(clients))))
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
        clients = [RawClient(port, token) for _ in range(args.clients)]
        for i, client in enumerate(clients):
            await client.request(
                "POST", "/canary/promote", {"service": f"svc-{i}", "version": "v1"}
            )

        async def read(client: RawClient, index: int, step: int) -> bool:
            return await client.request("GET", f"/canary/svc-{index}") == 200

        async def write(client: RawClient, index: int, step: int) -> bool:
            # Alternate rollback / start so that every request is a real state change.
            if step % 2 == 0:
                body = {"service": f"svc-{index}", "reason": "bench"}
                return await client.request("POST", "/canary/rollback", body) == 200
            body = {"service": f"svc-{index}", "version": f"v{step + 2}"}
            return await client.request("POST", "/canary/promote", body) == 200

        print(
            f"one server process, PostgreSQL, {args.clients} concurrent clients, "
            f"{args.seconds:.0f} s per phase, {os.cpu_count()} cores (clients share them)"
        )
        await run_phase(clients, 2, read)  # warm-up
        report("status reads", *await run_phase(clients, args.seconds, read))
        report("promote/rollback writes", *await run_phase(clients, args.seconds, write))
        if shutil.which("wrk"):
            # A C load generator leaves more of the 2 cores to the server than httpx does.
            print(wrk_reads(port, token, args.clients, args.seconds))
    finally:
        stop(server)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
