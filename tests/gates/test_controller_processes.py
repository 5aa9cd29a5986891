"""Standalone `opsapi controller` processes: killed mid-wait, or two at once on one database."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.gates.test_controller_e2e import eventually, in_state, policy, start
from tests.support.app import Harness, running_app
from tests.support.metrics_app import MetricsApp
from tests.support.prometheus import PrometheusServer


@contextmanager
def controller_process(
    database_url: str, prometheus_url: str, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        "OPSAPI_DATABASE_URL": database_url,
        "OPSAPI_PROMETHEUS_URL": prometheus_url,
        "OPSAPI_CONTROLLER_POLL_SECONDS": "0.2",
        "OPSAPI_ENV": "test",
    }
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "opsapi", "controller"], env=env, stdout=out, stderr=out
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


async def promotions(api: Harness, service: str) -> list[int]:
    events = await api.audit_events(service=service, action="rollout.promoted")
    return [int(event.details["to_weight"]) for event in events]


async def test_controller_killed_mid_wait_continues_without_repeating_or_skipping(
    pg_url: str, key_file: Path, prometheus: PrometheusServer, metrics_app: MetricsApp,
    tmp_path: Path,
) -> None:  # fmt: skip
    metrics_app.set("restart", "v2", rps=30)
    # The API only (real clock, no controller inside): the processes below do the work.
    async with running_app(pg_url, key_file, real_time=True, controller_enabled=False) as api:
        # given a rollout with 3 s waits, driven by a standalone controller
        await start(api, "restart", policy(wait="3s"))
        with controller_process(pg_url, prometheus.url, tmp_path / "c1.log") as first:
            await eventually(lambda: _at_least(api, "restart", 1), timeout=20)
            # when the controller is killed with SIGKILL in the middle of a wait
            await asyncio.sleep(1.5)
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
        killed_at = await promotions(api, "restart")
        await asyncio.sleep(2)
        assert await promotions(api, "restart") == killed_at  # nothing moves without it
        # and started again
        with controller_process(pg_url, prometheus.url, tmp_path / "c2.log"):
            await eventually(lambda: in_state(api, "restart", "succeeded"), timeout=60)

        # then every step was promoted exactly once, in order
        assert await promotions(api, "restart") == [25, 50, 75, 100]
        assert len(await api.audit_events(service="restart", action="rollout.succeeded")) == 1


async def _at_least(api: Harness, service: str, count: int) -> bool:
    return len(await promotions(api, service)) >= count


async def test_two_controllers_make_every_transition_exactly_once(
    pg_url: str, key_file: Path, prometheus: PrometheusServer, metrics_app: MetricsApp,
    tmp_path: Path,
) -> None:  # fmt: skip
    services = [f"pair-{i}" for i in range(6)]
    for service in services:
        metrics_app.set(service, "v2", rps=20)
    async with running_app(pg_url, key_file, real_time=True, controller_enabled=False) as api:
        # given six rollouts with 1 s waits
        for service in services:
            await start(api, service, policy(wait="1s"))

        # when two controller processes drive them at once
        with (
            controller_process(pg_url, prometheus.url, tmp_path / "a.log"),
            controller_process(pg_url, prometheus.url, tmp_path / "b.log"),
        ):
            for service in services:
                await eventually(lambda s=service: in_state(api, s, "succeeded"), timeout=60)

        # then each rollout went through each step once and succeeded once
        for service in services:
            assert await promotions(api, service) == [25, 50, 75, 100], service
            succeeded = await api.audit_events(service=service, action="rollout.succeeded")
            assert len(succeeded) == 1
