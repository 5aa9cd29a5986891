"""Archiving a large audit log: time, events/s, and that memory stays flat.

For each size (default 100,000 and 1,000,000 events) it creates a fresh PostgreSQL database,
migrates it, loads hash-chained events with COPY (the same synthetic log as
`audit_queries.py`, 90 days ending now), then runs `opsapi audit archive --before NOW` as a
child process and reports:

- the wall time of the whole archive and of its phases (export and verification of the file,
  checkpoint, removal), from the times its progress lines arrive;
- events archived per second;
- the archive process's peak resident memory (ru_maxrss from wait4), which must not grow with
  the number of events;
- the same for `opsapi audit verify-archive` (offline, no database) on the file.

The databases are dropped at the end.

    .venv/bin/python benchmarks/audit_archive.py [--sizes 100000,1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from audit_queries import ADMIN_DSN, load_events

from opsapi.storage.db import create_engine
from opsapi.storage.migrate import upgrade


def run(
    command: list[str], env: dict[str, str]
) -> tuple[int, float, int, list[tuple[float, str]], str, float]:
    """(exit code, seconds, peak RSS in MiB, progress lines with their arrival times, stdout,
    CPU seconds of the process)."""
    started = time.monotonic()
    process = subprocess.Popen(
        command, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stderr is not None
    assert process.stdout is not None
    lines: list[tuple[float, str]] = []
    for raw in process.stderr:
        lines.append((time.monotonic() - started, raw.decode().rstrip()))
    stdout = process.stdout.read().decode()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    return process.returncode, seconds, usage.ru_maxrss // 1024, lines, stdout, cpu


def phase(lines: list[tuple[float, str]], text: str) -> float:
    """When the first progress line containing `text` arrived (seconds from the start)."""
    return next(at for at, line in lines if text in line)


async def one_size(events: int, workdir: Path) -> dict[str, Any]:
    name = f"opsapi_archive_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = f"{ADMIN_DSN.rsplit('/', 1)[0]}/{name}"
    url = dsn.replace("postgresql://", "postgresql+asyncpg://")
    try:
        engine = create_engine(url)
        await upgrade(engine)
        await engine.dispose()
        loading = time.monotonic()
        await load_events(dsn, events)
        print(f"  loaded {events:,} chained events in {time.monotonic() - loading:.1f} s")
        out = workdir / f"audit-{events}.ndjson"
        before = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        env = {"OPSAPI_DATABASE_URL": url, "OPSAPI_DATA_DIR": str(workdir / "data")}
        command = [sys.executable, "-m", "opsapi", "audit", "archive", "--before", before,
                   "--out", str(out)]  # fmt: skip
        code, seconds, rss, lines, stdout, cpu = run(command, env)
        if code != 0:
            raise SystemExit(f"archive failed: {lines[-3:]}")
        result = json.loads(stdout)
        archived = result["checkpoint"]["events"]
        exported = phase(lines, "exported and verified")
        committed = phase(lines, "committed")
        verify_code, verify_seconds, verify_rss, _, _, verify_cpu = run(
            [sys.executable, "-m", "opsapi", "audit", "verify-archive", str(out)], {}
        )
        if verify_code != 0:
            raise SystemExit("verify-archive failed")
        return {
            "events": archived,
            "removed": result["removed"],
            "seconds": seconds,
            "export_and_verify": exported,
            "checkpoint": committed - exported,
            "removal": seconds - committed,
            "rss": rss,
            "cpu": cpu,
            "file_mib": out.stat().st_size / 2**20,
            "verify_seconds": verify_seconds,
            "verify_rss": verify_rss,
            "verify_cpu": verify_cpu,
        }
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    figures = []
    with tempfile.TemporaryDirectory(prefix="opsapi-archive-bench-") as tmp:
        for size in sizes:
            print(f"{size:,} events:")
            figures.append(await one_size(size, Path(tmp)))
            report(figures[-1])
    print()
    print(
        "| events | archive (wall) | events/s | export+verify | checkpoint | removal "
        "| archive CPU | peak RSS | verify-archive (wall) | its CPU | its peak RSS |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for f in figures:
        print(
            f"| {f['events']:,} | {f['seconds']:.1f} s | {f['events'] / f['seconds']:,.0f} "
            f"| {f['export_and_verify']:.1f} s | {f['checkpoint']:.1f} s "
            f"| {f['removal']:.1f} s | {f['cpu']:.1f} s | {f['rss']} MiB "
            f"| {f['verify_seconds']:.1f} s | {f['verify_cpu']:.1f} s | {f['verify_rss']} MiB |"
        )


def report(f: dict[str, Any]) -> None:
    """Print one size's figures."""
    print(
        f"  archive: {f['events']:,} events in {f['seconds']:.1f} s "
        f"({f['events'] / f['seconds']:,.0f} events/s; export + verify "
        f"{f['export_and_verify']:.1f} s, checkpoint {f['checkpoint']:.1f} s, "
        f"removal {f['removal']:.1f} s), CPU {f['cpu']:.1f} s, file {f['file_mib']:.0f} MiB, "
        f"peak RSS {f['rss']} MiB"
    )
    print(
        f"  verify-archive (offline): {f['verify_seconds']:.1f} s "
        f"({f['events'] / f['verify_seconds']:,.0f} events/s), CPU {f['verify_cpu']:.1f} s, "
        f"peak RSS {f['verify_rss']} MiB"
    )


if __name__ == "__main__":
    asyncio.run(main())
