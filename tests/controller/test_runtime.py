"""`opsapi controller` runs the same runtime as `opsapi serve`: its settings, its teardown."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from tests.support.app import running_app
from tests.support.databases import PG_ADMIN_DSN


@contextmanager
def controller_process(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`opsapi controller` in a child process; killed if the test leaves it running."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "opsapi", "controller"],
            env={**os.environ, "OPSAPI_ENV": "test", **env},
            stdout=out,
            stderr=out,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


@contextmanager
def silent_prometheus() -> Iterator[tuple[str, list[float]]]:
    """A 'Prometheus' that accepts every connection and never answers; yields its URL and
    the times connections were accepted."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    accepted: list[float] = []
    held: list[socket.socket] = []
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            accepted.append(time.monotonic())
            held.append(connection)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", accepted
    finally:
        done.set()
        thread.join(timeout=5)
        for connection in held:
            connection.close()
        listener.close()


def _dsn(pg_url: str) -> str:
    return PG_ADMIN_DSN.rsplit("/", 1)[0] + "/" + pg_url.rsplit("/", 1)[1]


async def _store_key(dsn: str, key: str, age: timedelta) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(
            "INSERT INTO idempotency_key (subject, key, method, path, request_hash,"
            " status_code, response_body, complete, created_at)"
            " VALUES ('ops', $1, 'POST', '/x', 'h', 200, '{}', true, $2)",
            key,
            datetime.now(UTC) - age,
        )
    finally:
        await connection.close()


async def _keys(dsn: str) -> set[str]:
    connection = await asyncpg.connect(dsn)
    try:
        return {row["key"] for row in await connection.fetch("SELECT key FROM idempotency_key")}
    finally:
        await connection.close()


async def test_controller_process_purges_idempotency_keys_after_the_configured_ttl(
    pg_url: str, tmp_path: Path
) -> None:
    dsn = _dsn(pg_url)
    # given stored Idempotency-Key answers 2 h and 30 min old, and a TTL of 1 h
    await _store_key(dsn, "two-hours-old", timedelta(hours=2))
    await _store_key(dsn, "half-an-hour-old", timedelta(minutes=30))
    env = {
        "OPSAPI_DATABASE_URL": pg_url,
        "OPSAPI_IDEMPOTENCY_TTL_HOURS": "1",
        "OPSAPI_CONTROLLER_POLL_SECONDS": "0.2",
    }
    # when `opsapi controller` runs
    with controller_process(env, tmp_path / "controller.log") as process:
        deadline = time.monotonic() + 20
        while "two-hours-old" in await _keys(dsn) and time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / "controller.log").read_text()
            await asyncio.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=20)
    # then only the answer older than the TTL is gone, and it stopped cleanly
    assert await _keys(dsn) == {"half-an-hour-old"}
    assert code == 0, (tmp_path / "controller.log").read_text()


async def test_controller_process_stops_promptly_while_prometheus_hangs(
    pg_url: str, key_file: Path, tmp_path: Path
) -> None:
    gates = [
        {"name": f"gate-{i}", "query": f"vector({i})", "op": "<", "threshold": 100, "for": "1m"}
        for i in range(5)
    ]
    policy = {
        "steps": [{"weight": 10, "wait": "1h"}, {"weight": 100, "wait": "1h"}],
        "interval": "1s",
        "gates": gates,
    }
    with silent_prometheus() as (prometheus_url, accepted):
        # given 5 rollouts with 5 gates each, measured by a Prometheus that never answers
        async with running_app(pg_url, key_file, prometheus_url=prometheus_url) as api:
            for i in range(5):
                service = f"hang-{i}"
                assert (await api.put(f"/services/{service}", policy)).status_code == 200
                started = await api.post("/canary/promote", {"service": service, "version": "v2"})
                assert started.status_code == 200, started.text
        env = {
            "OPSAPI_DATABASE_URL": pg_url,
            "OPSAPI_PROMETHEUS_URL": prometheus_url,
            "OPSAPI_PROMETHEUS_TIMEOUT_SECONDS": "5",
            "OPSAPI_CONTROLLER_POLL_SECONDS": "0.2",
            "OPSAPI_SHUTDOWN_TIMEOUT_SECONDS": "2",
        }
        log = tmp_path / "controller.log"
        with controller_process(env, log) as process:
            deadline = time.monotonic() + 20
            while len(accepted) < 16 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert len(accepted) >= 16, log.read_text()
            # when it is told to stop while every query thread hangs (a pass waits up to 15 s
            # for its gates, each hung query holds its thread for 10 s: two 5 s tries)
            stopped_at = time.monotonic()
            process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(process.wait, 30)
            took = time.monotonic() - stopped_at
        # then it stops within the shutdown timeout: the pass is cancelled (its lease expires),
        # the provider's queued queries are dropped and its hung threads abandoned
        assert code == 0, log.read_text()
        assert took < 2 + 3, f"took {took:.1f} s to stop"
