"""Status-read throughput of several checkouts of opsapi, measured in rotation (A/B/A/B…).

On a shared machine load changes from minute to minute; rotating short runs and comparing
medians is fairer than one long run each. Each run: a fresh PostgreSQL database, `opsapi
serve` started from that checkout's directory, one rollout, 2 s of warm-up, then wrk with 32
connections on GET /internal/ops/canary/{service} (each read also writes its audit event).

    .venv/bin/python benchmarks/checkout_ab.py /path/a /path/b [--rounds 5] [--seconds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opsapi.auth.tokens import LocalSigner
from tests.support.processes import free_port

ADMIN_DSN = os.environ.get("OPSAPI_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
API = "/internal/ops"


def start(checkout: str, port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "opsapi", "serve", "--port", str(port)],
            cwd=checkout,  # `python -m opsapi` imports the package from here
            env={**os.environ, **env},
            stdout=out,
            stderr=out,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise SystemExit(f"{checkout}: server did not start: {log.read_text()[-2000:]}")


async def one_run(checkout: str, seconds: int) -> float:
    name = f"opsapi_ab_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    workdir = Path(tempfile.mkdtemp(prefix="opsapi-ab-"))
    key = workdir / "key.json"
    port = free_port()
    base = ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    env = {
        "OPSAPI_DATABASE_URL": f"{base}/{name}",
        "OPSAPI_LOCAL_KEY_FILE": str(key),
        "OPSAPI_ENV": "test",
    }
    server = start(checkout, port, env, workdir / "server.log")
    try:
        token = LocalSigner.load_or_create(key).mint(subject="bench", roles=["operator"])
        auth = f"Authorization: Bearer {token}"
        httpx.post(
            f"http://127.0.0.1:{port}{API}/canary/promote",
            json={"service": "svc-0", "version": "v1"},
            headers={"Authorization": f"Bearer {token}"},
        )
        url = f"http://127.0.0.1:{port}{API}/canary/svc-0"
        subprocess.run(["wrk", "-t2", "-c32", "-d2s", "-H", auth, url], capture_output=True)
        output = subprocess.run(
            ["wrk", "-t2", "-c32", f"-d{seconds}s", "-H", auth, url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        if "Non-2xx" in output:
            raise SystemExit(f"{checkout}: errors during the run:\n{output}")
        rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
        return float(rate.group(1)) if rate else 0.0
    finally:
        server.terminate()
        server.wait(timeout=60)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkouts", nargs="+")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=6)
    args = parser.parse_args()

    results: dict[str, list[float]] = {checkout: [] for checkout in args.checkouts}
    for round_number in range(1, args.rounds + 1):
        for checkout in args.checkouts:
            rate = await one_run(checkout, args.seconds)
            results[checkout].append(rate)
            load = Path("/proc/loadavg").read_text().split()[0]
            print(f"round {round_number}  {checkout:<30} {rate:7.0f} req/s   load {load}")
    for checkout, rates in results.items():
        ordered = sorted(rates)
        print(
            f"{checkout:<30} median {ordered[len(ordered) // 2]:7.0f} req/s   "
            f"runs {[round(rate) for rate in rates]}"
        )


if __name__ == "__main__":
    asyncio.run(main())
