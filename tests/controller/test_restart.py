"""A server killed mid-wait and started again continues from the database's timers."""

from __future__ import annotations

import asyncio
import signal
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from opsapi.auth.tokens import LocalSigner
from opsapi.controller.loop import LEASE
from tests.support.processes import free_port, start_server, stop

API = "/internal/ops"


def test_restart_mid_wait_continues_from_the_database(
    pg_url: str, key_file: Path, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        "OPSAPI_DATABASE_URL": pg_url,
        "OPSAPI_LOCAL_KEY_FILE": str(key_file),
        "OPSAPI_CONTROLLER_POLL_SECONDS": "0.2",
        "OPSAPI_ENV": "test",
    }
    signer = LocalSigner.load_or_create(key_file)
    headers = {"Authorization": f"Bearer {signer.mint(subject='ops', roles=['admin'])}"}
    base = f"http://127.0.0.1:{port}{API}"
    log = tmp_path / "server.log"

    # given a rollout whose first step waits 3 s
    server = start_server(port, env, log)
    try:
        policy = {
            "steps": [{"weight": 10, "wait": "3s"}, {"weight": 100, "wait": "1h"}],
            # Longer than the wait: the controller's first look is at its end, so the kill
            # below never lands between a claim and its decision (that claim's lease would
            # hold the rollout for 30 s).
            "interval": "10s",
        }
        assert httpx.put(f"{base}/services/checkout", json=policy, headers=headers).is_success
        started = httpx.post(
            f"{base}/canary/promote", json={"service": "checkout", "version": "v2"}, headers=headers
        ).json()
        time.sleep(1)
        # when the server is killed mid-wait
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        time.sleep(1)
        # and started again
        server = start_server(port, env, log)
        # (Should a claim be cut off all the same, its lease runs out first.)
        deadline = time.monotonic() + LEASE.total_seconds() + 10
        rollout = {}
        while time.monotonic() < deadline:
            rollout = httpx.get(f"{base}/canary/checkout", headers=headers).json()
            if rollout["state"] == "awaiting_promotion":
                break
            time.sleep(0.2)
    finally:
        stop(server)

    # then the same rollout's wait ran to its end on the original clock, and was not restarted
    assert rollout["id"] == started["id"]
    assert rollout["state"] == "awaiting_promotion"
    assert rollout["step_started_at"] == started["step_started_at"]
    assert rollout["desired_weight"] == 10
    # and the audit log shows one transition, made after the full 3 s wait
    [ready] = asyncio.run(_controller_events(pg_url))
    assert ready["action"] == "rollout.ready"
    started_at = datetime.fromisoformat(started["step_started_at"])
    assert ready["at"] - started_at >= timedelta(seconds=3)


async def _controller_events(url: str) -> list[dict[str, Any]]:
    connection = await asyncpg.connect(url.replace("+asyncpg", ""))
    try:
        rows = await connection.fetch(
            "SELECT action, at FROM audit_event WHERE source = 'controller' ORDER BY id"
        )
    finally:
        await connection.close()
    return [dict(row) for row in rows]
