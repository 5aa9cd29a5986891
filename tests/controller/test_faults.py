"""The controller under faults: a hung Prometheus delays only the rollouts it measures, and a short
database error delays a decision by seconds, not by the claim's whole lease."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg

from tests.support.app import Harness, running_app
from tests.support.metrics_app import MetricsApp
from tests.support.prometheus import running_prometheus

FAST = {"steps": [{"weight": 10, "wait": "1s"}, {"weight": 100, "wait": "1h"}],
        "interval": "1s", "gates": []}  # fmt: skip


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await check():
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {timeout}s")


async def state(api: Harness, service: str) -> str:
    return str((await api.get(f"/canary/{service}")).json()["state"])


async def test_a_hung_prometheus_delays_no_other_rollout(
    pg_url: str, key_file: Path, tmp_path: Path, metrics_app: MetricsApp
) -> None:
    with running_prometheus([metrics_app.target], tmp_path) as prometheus:
        async with running_app(
            pg_url, key_file, real_time=True, prometheus_url=prometheus.url,
            prometheus_timeout_seconds=5,
        ) as api:  # fmt: skip
            # given a gated rollout whose Prometheus stops answering (frozen, not refused)
            gated = {**FAST, "gates": [{"name": "up", "query": "vector(1)", "op": ">",
                                        "threshold": 0}]}  # fmt: skip
            assert (await api.put("/services/gated", gated)).is_success
            assert (await api.put("/services/plain", FAST)).is_success
            os.kill(prometheus.process.pid, signal.SIGSTOP)
            try:
                await api.post("/canary/promote", {"service": "gated", "version": "v2"})
                await asyncio.sleep(1.5)  # its measurement is under way, and hangs
                # when a gate-less rollout of another service starts
                await api.post("/canary/promote", {"service": "plain", "version": "v2"})

                # then it becomes ready when its wait is over, not when the hung query times out
                took = await eventually(lambda: _in(api, "plain", "awaiting_promotion"), timeout=4)
                assert took < 3
                # and the gated one is held, never promoted on missing evidence
                assert await state(api, "gated") == "progressing"
            finally:
                os.kill(prometheus.process.pid, signal.SIGCONT)


async def _in(api: Harness, service: str, expected: str) -> bool:
    return await state(api, service) == expected


FAULT = """
CREATE TABLE IF NOT EXISTS injected_fault (on_ boolean);
CREATE OR REPLACE FUNCTION injected_decision_fault() RETURNS trigger AS $$
BEGIN
    -- A decision (a state change) fails while the fault is on; leases and reads still work.
    IF NEW.state IS DISTINCT FROM OLD.state AND EXISTS (SELECT 1 FROM injected_fault) THEN
        RAISE EXCEPTION 'injected fault';
    END IF;
    RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER injected_decision_fault BEFORE UPDATE ON rollout
    FOR EACH ROW EXECUTE FUNCTION injected_decision_fault();
"""
CLEAR = """
DROP TRIGGER IF EXISTS injected_decision_fault ON rollout;
DROP FUNCTION IF EXISTS injected_decision_fault();
DROP TABLE IF EXISTS injected_fault;
"""


async def database(pg_url: str) -> asyncpg.Connection:
    return await asyncpg.connect(pg_url.replace("+asyncpg", ""))


async def fault_installed(pg_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await database(pg_url)
    await connection.execute(FAULT)
    try:
        yield connection
    finally:
        await connection.execute(CLEAR)
        await connection.close()


async def test_a_short_database_error_delays_a_decision_by_seconds(
    pg_url: str, key_file: Path
) -> None:
    async for db in fault_installed(pg_url):
        async with running_app(pg_url, key_file, real_time=True) as api:
            assert (await api.put("/services/checkout", FAST)).is_success
            # given the database refuses decisions for 3 s, starting before the wait is over
            await db.execute("INSERT INTO injected_fault VALUES (true)")
            await api.post("/canary/promote", {"service": "checkout", "version": "v2"})
            await asyncio.sleep(3)
            assert await state(api, "checkout") == "progressing"  # the decision failed
            # when the fault clears
            await db.execute("DELETE FROM injected_fault")

            # then the controller decides within seconds, not after its 30 s claim lease
            took = await eventually(lambda: _in(api, "checkout", "awaiting_promotion"), 10)
            assert took < 3


async def test_liveness_fails_while_the_controller_loop_is_stuck(
    pg_url: str, key_file: Path
) -> None:
    async with running_app(
        pg_url, key_file, real_time=True, controller_stall_seconds=2,
        database_lock_timeout_seconds=8,
    ) as api:  # fmt: skip
        await eventually(lambda: _live(api, 200), timeout=5)
        # given a lock that keeps the controller from claiming anything
        db = await database(pg_url)
        try:
            async with db.transaction():
                await db.execute("LOCK TABLE rollout IN ACCESS EXCLUSIVE MODE")
                # then liveness fails once no pass has completed for the stall limit
                await eventually(lambda: _live(api, 503), timeout=6)
        finally:
            await db.close()
        # and recovers when the loop does
        await eventually(lambda: _live(api, 200), timeout=10)


async def _live(api: Harness, status: int) -> bool:
    return (await api.client.get("/healthz")).status_code == status
