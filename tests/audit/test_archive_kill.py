"""`opsapi audit archive` killed (SIGKILL) while it exports and again right after its checkpoint
commits: nothing is lost, and running the same command again completes the archive.

The process is frozen at those points with named pipes in place of the files it writes there
(`FILE.partial` while exporting, `FILE.checkpoint.json.partial` right after the commit): a
writer blocks on a pipe nobody drains, so the kill lands exactly where intended.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from opsapi.audit import chain
from opsapi.audit.archive import Expected, companion_path, partial_path, verify_file
from opsapi.audit.checkpoint import Checkpoint
from opsapi.audit.verify import verify_chain
from opsapi.storage.db import create_engine
from opsapi.storage.migrate import upgrade
from tests.audit.test_archive import CUTOFF, OLD, RECENT
from tests.audit.test_review_api import synthetic_rows


def start_archive(url: str, out: Path, log: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "opsapi", "audit", "archive", "--out", str(out),
               "--before", CUTOFF.strftime("%Y-%m-%dT%H:%M:%SZ")]  # fmt: skip
    env = {**os.environ, "OPSAPI_DATABASE_URL": url, "OPSAPI_DATA_DIR": str(out.parent / "data")}
    with log.open("ab") as errors:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=errors)


def read_from_pipe(pipe: int, process: subprocess.Popen[bytes], size: int) -> bytes:
    """Drain `size` bytes the process writes into the named pipe, then stop draining."""
    received = bytearray()
    deadline = time.monotonic() + 60
    while len(received) < size:
        assert process.poll() is None, "the archive ended before it was killed"
        assert time.monotonic() < deadline, "the archive wrote nothing"
        readable, _, _ = select.select([pipe], [], [], 0.2)
        chunk = os.read(pipe, 65536) if readable else b""
        if not chunk:
            time.sleep(0.05)  # no writer yet
        received += chunk
    return bytes(received)


async def rows(engine: AsyncEngine, statement: str) -> list[tuple[object, ...]]:
    async with engine.connect() as connection:
        return [tuple(row) for row in await connection.execute(sa.text(statement))]


async def test_an_archive_killed_twice_loses_nothing_and_completes_when_run_again(
    db_url: str, tmp_path: Path
) -> None:
    # given 10,000 old events and 20 recent ones
    engine = create_engine(db_url)
    await upgrade(engine)
    events = synthetic_rows(10_000, start=OLD) + synthetic_rows(20, seed=2, start=RECENT)
    for first in range(0, len(events), 1000):
        async with engine.begin() as connection:
            await chain.append(connection, events[first : first + 1000])
    original = await rows(engine, "SELECT id, hash FROM audit_event ORDER BY id")
    out, log = tmp_path / "audit-2026-06.ndjson", tmp_path / "archive.log"

    try:
        # when the archive is killed in the middle of its export
        exporting = partial_path(out)
        os.mkfifo(exporting)
        pipe = os.open(exporting, os.O_RDONLY | os.O_NONBLOCK)
        process = start_archive(db_url, out, log)
        written = read_from_pipe(pipe, process, 200_000)
        process.kill()
        process.wait(timeout=10)
        os.close(pipe)
        # (what a killed writer leaves behind: the start of the file, a torn last line)
        exporting.unlink()
        exporting.write_bytes(written)

        # then nothing was recorded or removed, and no archive file exists
        assert await rows(engine, "SELECT id FROM audit_checkpoint") == []
        assert await rows(engine, "SELECT id, hash FROM audit_event ORDER BY id") == original
        assert not out.exists()

        # when the same command runs again and is killed right after its checkpoint commits
        committed = partial_path(companion_path(out))
        os.mkfifo(committed)
        process = start_archive(db_url, out, log)
        deadline = time.monotonic() + 60
        while not await rows(engine, "SELECT id FROM audit_checkpoint"):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            await asyncio.sleep(0.05)
        process.kill()
        process.wait(timeout=10)
        committed.unlink()

        # then the checkpoint names the complete archive file, and nothing was removed yet
        [(last_id, sha256)] = await rows(
            engine, "SELECT last_id, archive_sha256 FROM audit_checkpoint"
        )
        assert last_id == 10_000
        assert hashlib.sha256(out.read_bytes()).hexdigest() == sha256
        remaining = await rows(engine, "SELECT id, hash FROM audit_event ORDER BY id")
        assert remaining[: len(original)] == original

        # when the same command runs once more, undisturbed
        process = start_archive(db_url, out, log)
        stdout, _ = process.communicate(timeout=120)
        assert process.returncode == 0, log.read_text()
        result = json.loads(stdout)

        # then it finished the interrupted archive: removed exactly the checkpointed events
        assert (result["resumed"], result["removed"]) == (True, 10_000)
        checkpoint = Checkpoint.from_dict(json.loads(companion_path(out).read_text("utf-8")))
        report = verify_file(out, Expected(checkpoint=checkpoint))
        assert (report["intact"], report["events"]) == (True, 10_000), report
        # and every event is either in the archive or still in the table: none lost
        archived = [json.loads(line) for line in out.read_text("utf-8").splitlines()[:-1]]
        kept = await rows(engine, "SELECT id, hash FROM audit_event ORDER BY id")
        assert [(event["id"], event["hash"]) for event in archived] + kept[:20] == original
        [(action,)] = await rows(
            engine, f"SELECT action FROM audit_event WHERE id > {original[-1][0]}"
        )
        assert action == "audit.archive"
        # and the chain verifies from the checkpoint
        chain_report = await verify_chain(engine)
        assert chain_report["intact"] is True
        assert chain_report["checkpoint"]["last_id"] == 10_000
        assert chain_report["events"] == 21
    finally:
        await engine.dispose()
