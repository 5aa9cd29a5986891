"""CPU per audited write of the application alone, in process, for one or more checkouts.

    .venv/bin/python benchmarks/write_cpu.py [--checkout PATH ...] [--runs 2] [--writes 3000]
        [--idempotency-keys] [--notify N]

Each run is a fresh process that builds the app from one checkout (its own PostgreSQL
database, migrated at startup), opens one rollout per service, then calls the ASGI app
directly (no HTTP server, no client) with rollback / start pairs from 32 concurrent writers,
one service each, and prints the process CPU time per write over three rounds. With several
checkouts the runs alternate between them (A B A B ...), so that a machine whose speed drifts
affects each alike: this is how a change to the write path is compared with its parent
(`git worktree add /tmp/base HEAD~1`, then `--checkout /tmp/base --checkout .`).
Figures are this process's CPU, not the database's; `api_throughput.py` measures the whole.

With `--instructions`, each checkout instead runs twice under valgrind (cachegrind, no cache
simulation), with `--writes` and twice as many, and the difference in instructions the process
executed, divided by the difference in writes, is printed: instructions per write, a count that
does not move with the machine's speed (CPU time here varies up to threefold from hour to hour),
so a change of a few percent shows. It counts work, not time: a cache miss costs nothing in it.
About 50 times slower than a native run: use a few hundred writes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ADMIN_DSN = os.environ.get("OPSAPI_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
PREFIX = "/internal/ops"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _call(
    app: Any,
    path: str,
    token: str,
    body: dict[str, Any],
    key: str | None = None,
    method: str = "POST",
) -> tuple[int, bytes]:
    raw = json.dumps(body).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 5555), "server": ("127.0.0.1", 80),
        "headers": [(b"host", b"bench"), (b"authorization", b"Bearer " + token.encode()),
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(raw)).encode())],
    }  # fmt: skip
    if key is not None:
        scope["headers"].append((b"idempotency-key", key.encode()))
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects
        raise AssertionError("unreachable")

    status, chunks = 0, []

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


async def _one_run(writes: int, concurrency: int, keyed: bool, notify: int) -> list[float]:
    """In the child process: CPU ms per write over three rounds (the checkout is on sys.path)."""
    import asyncpg
    from asgi_lifespan import LifespanManager

    from opsapi.auth.tokens import LocalSigner
    from opsapi.config import Settings
    from opsapi.http.app import create_app

    name = f"write_cpu_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    key = Path(f"/tmp/{name}-key.json")
    os.environ.update({
        "OPSAPI_DATABASE_URL": ADMIN_DSN.replace("postgresql://", "postgresql+asyncpg://")
        .rsplit("/", 1)[0] + f"/{name}",
        "OPSAPI_LOCAL_KEY_FILE": str(key), "OPSAPI_ENV": "test",
        "OPSAPI_CONTROLLER_ENABLED": "false", "OPSAPI_PAGERDUTY_WORKER_ENABLED": "false",
    })  # fmt: skip
    channels = Path(f"/tmp/{name}-channels.json")
    if notify:
        # Webhook channels nobody delivers to (the outbox worker is off): the enqueueing is
        # what is measured, in each transition's transaction.
        channels.write_text(
            json.dumps(
                {
                    f"hook-{i}": {
                        "type": "webhook",
                        "url": f"http://127.0.0.1:9/hook-{i}",
                        "secret": "bench-secret-long-enough",
                    }
                    for i in range(notify)
                }
            )
        )
        os.environ["OPSAPI_NOTIFICATIONS_FILE"] = str(channels)
    signer = LocalSigner.load_or_create(key)
    token = signer.mint(subject="bench", roles=["operator"])
    app = create_app(Settings(), freeze_startup_objects=True)
    services = [f"svc-{i}" for i in range(concurrency)]
    results: list[float] = []
    try:
        async with LifespanManager(app, startup_timeout=600):
            is_open = dict.fromkeys(services, False)
            if notify:
                admin_token = signer.mint(subject="bench-admin", roles=["admin"])
                policy = {"notify": [{"channel": f"hook-{i}"} for i in range(notify)]}
                for service in services:
                    status, answer = await _call(app, f"{PREFIX}/services/{service}", admin_token,
                                                 policy, method="PUT")  # fmt: skip
                    if status != 200:
                        raise RuntimeError(f"policy of {service}: {status} {answer[:300]!r}")

            async def writer(service: str, count: int) -> None:
                for n in range(count):
                    if is_open[service]:
                        path, body = "/canary/rollback", {"service": service, "reason": "bench"}
                    else:
                        path, body = "/canary/promote", {"service": service, "version": f"v{n}"}
                    key = uuid.uuid4().hex if keyed else None
                    status, answer = await _call(app, PREFIX + path, token, body, key)
                    if status != 200:
                        raise RuntimeError(f"{path}: {status} {answer[:300]!r}")
                    is_open[service] = not is_open[service]

            per_writer = max(1, writes // concurrency)
            await asyncio.gather(*(writer(s, 20) for s in services))  # warm-up
            for _ in range(3):
                started = _cpu()
                await asyncio.gather(*(writer(s, per_writer) for s in services))
                results.append(1000 * (_cpu() - started) / (per_writer * concurrency))
    finally:
        # FORCE: a terminated backend may still be exiting when a plain DROP runs.
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        key.unlink(missing_ok=True)
        channels.unlink(missing_ok=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkout", type=Path, action="append")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--writes", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    keys_help = "each write sends a fresh Idempotency-Key, as opsctl does"
    parser.add_argument("--idempotency-keys", action="store_true", help=keys_help)
    notify_help = "each service's policy notifies this many channels of every transition"
    parser.add_argument("--notify", type=int, default=0, help=notify_help)
    instructions_help = "count instructions per write under valgrind instead of CPU time"
    parser.add_argument("--instructions", action="store_true", help=instructions_help)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, os.getcwd())  # this checkout's opsapi, not the installed one
        import uvloop

        import opsapi

        assert Path(opsapi.__file__).is_relative_to(Path.cwd()), opsapi.__file__

        uvloop.install()
        measured = _one_run(args.writes, args.concurrency, args.idempotency_keys, args.notify)
        print(json.dumps(asyncio.run(measured)))
        return
    checkouts = [path.resolve() for path in args.checkout or [ROOT]]
    if args.instructions:
        _count_instructions(args, checkouts)
        return
    figures: dict[Path, list[float]] = {path: [] for path in checkouts}
    for run in range(1, args.runs + 1):
        for checkout in checkouts:
            started = time.monotonic()
            done = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--child",
                 "--writes", str(args.writes), "--concurrency", str(args.concurrency),
                 *(["--idempotency-keys"] if args.idempotency_keys else []),
                 "--notify", str(args.notify)],
                cwd=checkout,
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if done.returncode != 0:
                sys.exit(f"{checkout}: run failed\n{done.stderr[-2000:]}")
            rounds = json.loads(done.stdout.strip().splitlines()[-1])
            figures[checkout].extend(rounds)
            shown = " ".join(f"{value:.3f}" for value in rounds)
            print(f"run {run} {checkout}: {shown} ms CPU per write "
                  f"({time.monotonic() - started:.0f} s)", flush=True)  # fmt: skip
    keyed = ", each with an Idempotency-Key" if args.idempotency_keys else ""
    keyed += f", notifying {args.notify} channels" if args.notify else ""
    print(f"\nCPU per audited write{keyed} (app process only, {args.concurrency} concurrent "
          "writers, median of rounds):")  # fmt: skip
    for checkout, values in figures.items():
        print(f"  {statistics.median(values):.3f} ms  (min {min(values):.3f}, max "
              f"{max(values):.3f})  {checkout}")  # fmt: skip


def _child_command(args: argparse.Namespace, writes: int) -> list[str]:
    return [
        sys.executable, str(Path(__file__).resolve()), "--child", "--writes", str(writes),
        "--concurrency", str(args.concurrency),
        *(["--idempotency-keys"] if args.idempotency_keys else []), "--notify", str(args.notify),
    ]  # fmt: skip


def _instructions(args: argparse.Namespace, checkout: Path, writes: int) -> int:
    """Instructions one child process executes, from start to exit, making `writes` writes."""
    out = Path(f"/tmp/write_cpu-{uuid.uuid4().hex[:8]}.cachegrind")
    try:
        done = subprocess.run(
            ["valgrind", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={out}",
             *_child_command(args, writes)],
            cwd=checkout, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            sys.exit(f"{checkout}: run failed\n{done.stderr[-2000:]}")
        for line in out.read_text().splitlines():
            if line.startswith("summary:"):
                return int(line.split()[1])
        sys.exit(f"{checkout}: no summary in {out}")
    finally:
        out.unlink(missing_ok=True)


def _count_instructions(args: argparse.Namespace, checkouts: list[Path]) -> None:
    # Each child makes a warm-up of 20 writes per writer, then 3 rounds of writes // concurrency
    # per writer: the difference between two children is 3 rounds' worth.
    per_writer = max(1, args.writes // args.concurrency)
    measured = 3 * per_writer * args.concurrency
    figures: dict[Path, list[float]] = {path: [] for path in checkouts}
    for run in range(1, args.runs + 1):
        for checkout in checkouts:
            started = time.monotonic()
            small = _instructions(args, checkout, per_writer * args.concurrency)
            large = _instructions(args, checkout, 2 * per_writer * args.concurrency)
            figures[checkout].append((large - small) / measured)
            print(f"run {run} {checkout}: {figures[checkout][-1] / 1e6:.3f} M instructions per "
                  f"write ({time.monotonic() - started:.0f} s)", flush=True)  # fmt: skip
    print(f"\nInstructions per audited write (app process only, {args.concurrency} concurrent "
          f"writers, {measured} writes told apart, median of runs):")  # fmt: skip
    for checkout, values in figures.items():
        print(f"  {statistics.median(values) / 1e6:.3f} M  (min {min(values) / 1e6:.3f}, max "
              f"{max(values) / 1e6:.3f})  {checkout}")  # fmt: skip


if __name__ == "__main__":
    main()
