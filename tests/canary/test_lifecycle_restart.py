"""A server killed between a success's commit and its router apply: after a restart, reconcile
applies the swapped slots, and no request ever reaches a version the service view does not name.

Real processes: `opsapi serve` on PostgreSQL, a real nginx in front of two slot backends. The
nginx binary opsapi runs is a wrapper that hangs `-s reload` while a flag file exists, so the
success's apply is caught mid-way, after its commit, when the server is SIGKILLed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from opsapi.auth.tokens import LocalSigner
from tests.support.databases import unavailable
from tests.support.processes import free_port, start_server, stop
from tests.support.proxies import Background, Nginx, find_binary, running_nginx
from tests.support.slots import slot_backends

API = "/internal/ops"
SERVICE = "checkout"


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Nginx]:
    binary = find_binary("nginx")
    if binary is None:
        unavailable("nginx")
        raise AssertionError("unreachable")
    with running_nginx(binary, tmp_path / "nginx") as running:
        yield running


def hanging_wrapper(tmp_path: Path, nginx: Nginx, flag: Path) -> Path:
    wrapper = tmp_path / "nginx-hangs-on-reload"
    wrapper.write_text(
        "#!/bin/sh\n"
        '# While the flag exists, "-s reload" hangs: nginx stuck mid-apply.\n'
        'for arg in "$@"; do\n'
        f'  if [ "$arg" = reload ]; then while [ -e {flag} ]; do sleep 0.05; done; fi\n'
        "done\n"
        f'exec {nginx.binary} "$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return wrapper


def _promote(base: str, headers: dict[str, str]) -> None:
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(f"{base}/canary/promote", json={"service": SERVICE, "force": True},
                   headers=headers, timeout=20)  # fmt: skip


async def _rollout_row(url: str) -> dict[str, Any]:
    connection = await asyncpg.connect(url.replace("+asyncpg", ""))
    try:
        rollout = await connection.fetchrow(
            "SELECT state, desired_weight, applied_weight, generation, applied_generation"
            " FROM rollout ORDER BY id DESC LIMIT 1"
        )
        service = await connection.fetchrow(
            "SELECT stable_version, stable_slot FROM service WHERE name = $1", SERVICE
        )
    finally:
        await connection.close()
    assert rollout is not None
    assert service is not None
    return {**dict(rollout), **dict(service)}


def test_a_success_killed_before_its_apply_is_finished_by_reconcile_after_restart(
    pg_url: str, key_file: Path, tmp_path: Path, nginx: Nginx
) -> None:
    flag = tmp_path / "hang-reloads"
    wrapper = hanging_wrapper(tmp_path, nginx, flag)
    routers = tmp_path / "routers.json"
    port = free_port()
    env = {
        "OPSAPI_DATABASE_URL": pg_url,
        "OPSAPI_LOCAL_KEY_FILE": str(key_file),
        "OPSAPI_CONTROLLER_POLL_SECONDS": "0.2",
        "OPSAPI_ROUTERS_FILE": str(routers),
        "OPSAPI_ENV": "test",
    }
    headers = {"Authorization": "Bearer " + LocalSigner.load_or_create(key_file).mint(
        subject="ops", roles=["admin"])}  # fmt: skip
    base = f"http://127.0.0.1:{port}{API}"
    log = tmp_path / "server.log"

    with slot_backends(blue="v1", green="v2") as slots:
        instance = {"type": "nginx", "conf": str(nginx.conf), "prefix": str(nginx.directory),
                    "upstreams_dir": str(nginx.upstreams_dir), "binary": str(wrapper),
                    "probe": nginx.probe, "command_timeout": 30}  # fmt: skip
        routers.write_text(json.dumps({"edge": instance}))
        addresses = {slot: backend.address for slot, backend in slots.items()}
        server = start_server(port, env, log)
        try:
            # Given v2 (green) at 100 % over v1 (blue), baking,
            # (a long bake: the success below is the person's forced promote, not the controller's)
            policy = {"steps": [{"weight": 10, "wait": "1s"}, {"weight": 100, "wait": "1h"}],
                      "interval": "1s", "router": {"name": "edge", "upstream": SERVICE,
                                                   "slots": addresses}}  # fmt: skip
            assert httpx.put(f"{base}/services/{SERVICE}", json=policy, headers=headers).is_success
            start = {"service": SERVICE, "version": "v2", "stable_version": "v1"}
            assert httpx.post(f"{base}/canary/promote", json=start, headers=headers).is_success
            time.sleep(1.2)
            baking = httpx.post(f"{base}/canary/promote", json={"service": SERVICE},
                                headers=headers, timeout=30).json()  # fmt: skip
            assert (baking["state"], baking["applied_weight"]) == ("baking", 100), baking
            with Background(nginx.port) as traffic:
                traffic.mark()
                traffic.wait_after(50)
                # when the success commits but nginx hangs applying it, and the server is killed,
                flag.touch()
                # (its answer never comes: the server dies first)
                threading.Thread(target=_promote, args=(base, headers), daemon=True).start()
                deadline = time.monotonic() + 15
                while asyncio.run(_rollout_row(pg_url))["state"] != "succeeded":
                    assert time.monotonic() < deadline, "the success never committed"
                    time.sleep(0.05)
                time.sleep(0.3)  # the apply is under way, stuck in the reload
                server.send_signal(signal.SIGKILL)
                server.wait(timeout=10)
                subprocess.run(["pkill", "-KILL", "-f", str(wrapper)], check=False)
                flag.unlink()
                # then the success is committed with its swap, and its apply is still owed;
                row = asyncio.run(_rollout_row(pg_url))
                assert (row["state"], row["desired_weight"]) == ("succeeded", 100)
                assert row["applied_generation"] == row["generation"] - 1
                assert (row["stable_version"], row["stable_slot"]) == ("v2", "green")

                # when the server starts again, its reconcile pass applies it.
                server = start_server(port, env, log)
                deadline = time.monotonic() + 20
                view: dict[str, Any] = {}
                while time.monotonic() < deadline:
                    view = httpx.get(f"{base}/canary/{SERVICE}", headers=headers).json()
                    if view["applied_generation"] == view["generation"]:
                        break
                    time.sleep(0.2)
                assert view["applied_generation"] == view["generation"] == row["generation"], view
                assert view["applied_weight"] == 100
                assert view["router_error"] is None
                traffic.wait_after(200)
        finally:
            stop(server)
            subprocess.run(["pkill", "-KILL", "-f", str(wrapper)], check=False)

    # The view names v2 stable in green (v1 in blue to revert to), nginx runs that, and every
    # request after the promote went to v2 in green: none reached a version the view lacks.
    assert (view["state"], view["stable_version"], view["stable_slot"]) == (
        "succeeded", "v2", "green",
    )  # fmt: skip
    assert view["previous"] == {"version": "v1", "slot": "blue"}
    assert "# slot green: v2 (stable)" in (nginx.upstreams_dir / f"{SERVICE}.conf").read_text()
    assert set(traffic.after) == {"green v2"}, traffic.after
    assert os.path.exists(log)
