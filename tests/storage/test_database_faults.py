"""A database that stops answering (frozen, not refusing): every wait is bounded.

The test runs its own PostgreSQL cluster (initdb into a temporary directory, a free port) so
that it can freeze every process of it with SIGSTOP and thaw it with SIGCONT.
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import asyncpg
import pytest

from opsapi.storage.db import create_engine
from opsapi.storage.migrate import upgrade
from tests.support.app import Harness, running_app
from tests.support.databases import unavailable
from tests.support.processes import free_port

pytestmark = pytest.mark.postgres


def _binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@contextmanager
def private_cluster() -> Iterator[tuple[int, int]]:
    """A throwaway PostgreSQL cluster; yields (port, postmaster pid)."""
    binaries = _binaries()
    if binaries is None:
        unavailable("PostgreSQL server binaries (initdb, pg_ctl)")
        raise AssertionError("unreachable")
    # PostgreSQL refuses to run as root: as root, run it as the postgres user, in a directory
    # that user can reach (pytest's own temporary directories are private to root).
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    directory = Path(tempfile.mkdtemp(prefix="opsapi-pg-"))
    data = directory / "data"
    if prefix:
        shutil.chown(directory, "postgres")
    port = free_port()
    subprocess.run(
        [*prefix, str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [*prefix, str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-w", "start",
         "-l", str(directory / "server.log")],
        check=True,
        capture_output=True,
    )  # fmt: skip
    postmaster = int((data / "postmaster.pid").read_text().split()[0])
    try:
        yield port, postmaster
    finally:
        _signal_cluster(postmaster, signal.SIGCONT)
        subprocess.run(
            [*prefix, str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(directory, ignore_errors=True)


def _signal_cluster(postmaster: int, signum: signal.Signals) -> None:
    """Send `signum` to the postmaster and every backend it started."""
    children = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line
            )
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(postmaster):
            children.append(int(status.parent.name))
    for pid in [postmaster, *children]:
        with suppress(ProcessLookupError):
            os.kill(pid, signum)


@pytest.fixture
async def frozen_db(key_file: Path) -> AsyncIterator[tuple[Harness, int]]:
    """The app on a private cluster with tight database bounds; yields it and the postmaster."""
    with private_cluster() as (port, postmaster):
        admin = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres")
        await admin.execute("CREATE DATABASE opsapi")
        await admin.close()
        url = f"postgresql+asyncpg://postgres@127.0.0.1:{port}/opsapi"
        engine = create_engine(url)
        await upgrade(engine)
        await engine.dispose()
        async with running_app(
            url,
            key_file,
            database_statement_timeout_seconds=2,
            database_lock_timeout_seconds=1,
            database_connect_timeout_seconds=1,
            database_pool_timeout_seconds=1,
        ) as api:
            yield api, postmaster


async def timed(call: object) -> tuple[float, int]:
    started = time.monotonic()
    response = await call  # type: ignore[misc]
    return time.monotonic() - started, int(response.status_code)


async def test_frozen_database_fails_readiness_and_requests_within_their_bounds(
    frozen_db: tuple[Harness, int],
) -> None:
    api, postmaster = frozen_db
    # given a ready server that has answered requests
    assert (await api.client.get("/readyz")).status_code == 200
    assert (await api.get("/canary/checkout")).status_code == 404
    # when the database stops answering (every process of it frozen)
    _signal_cluster(postmaster, signal.SIGSTOP)
    try:
        # then readiness answers 503 within its 2 s bound
        took, status = await timed(api.client.get("/readyz"))
        assert status == 503
        assert took < 2.5
        # and a request fails (not hangs) within its statements' bounds: its read and the
        # audit event of the failure, each at most the 2 s statement timeout + 1 s
        took, status = await timed(api.get("/canary/checkout"))
        assert status in (500, 503)
        assert took < 2 * 3 + 1.5
        # and once requests fail on the database, readiness says so at once
        took, status = await timed(api.client.get("/readyz"))
        assert status == 503
        assert took < 0.5
        # and liveness is unaffected
        took, status = await timed(api.client.get("/healthz"))
        assert (status, took < 0.5) == (200, True)
    finally:
        _signal_cluster(postmaster, signal.SIGCONT)
    # when the database answers again, the server is ready again within the tracker's window
    deadline = time.monotonic() + 20
    status = 0
    while time.monotonic() < deadline:
        status = (await api.client.get("/readyz")).status_code
        if status == 200:
            break
        await asyncio.sleep(0.5)
    assert status == 200
    assert (await api.get("/canary/checkout")).status_code == 404


async def test_row_lock_held_elsewhere_fails_the_request_at_the_lock_timeout(
    frozen_db: tuple[Harness, int],
) -> None:
    api, _ = frozen_db
    # given a rollout whose row another session keeps locked
    started = await api.post("/canary/promote", {"service": "locked", "version": "v2"})
    assert started.status_code == 200, started.text
    port = api.runtime.engine.url.port
    holder = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{port}/opsapi")
    try:
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("SELECT * FROM rollout WHERE service = 'locked' FOR UPDATE")
        # when a request needs that row
        took, status = await timed(
            api.post("/canary/rollback", {"service": "locked", "reason": "test"})
        )
        # then it fails at the 1 s lock timeout instead of waiting for the holder
        assert status >= 500
        assert took < 1 + 1.5
        await transaction.rollback()
    finally:
        await holder.close()
    # and nothing was changed: the rollout is still open
    assert (await api.get("/canary/locked")).json()["state"] == "progressing"
