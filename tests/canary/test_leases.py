"""Fail-safe leases (DESIGN §12): a canary weight held by a router that can hold an expiry is
valid only until the controller's next renewal plus a margin; a silent control plane means 100 %
stable. Real processes: `opsapi serve` on PostgreSQL, nginx with the Lua module, slot backends."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from pathlib import Path

import httpx

from opsapi.auth.tokens import LocalSigner
from tests.support.nginx_lua import (
    SECRET,
    UPSTREAM,
    lua_nginx_binary,
    make_router,
    running_lua_nginx,
)
from tests.support.processes import free_port, start_server, stop
from tests.support.proxies import split
from tests.support.slots import slot_backends, slot_shares

API = "/internal/ops"


async def test_a_silent_control_plane_means_100_percent_stable(
    pg_url: str, key_file: Path, tmp_path: Path
) -> None:
    binary = lua_nginx_binary()
    admin = f"127.0.0.1:{free_port()}"
    state_dir = tmp_path / "state"
    router = make_router(state_dir, [admin])
    routers = tmp_path / "routers.json"
    routers.write_text(json.dumps({"edge": {
        "type": "nginx-lua", "admin": admin, "secret": SECRET,
        "state_file": str(state_dir / "edge.state"),
    }}))  # fmt: skip
    port = free_port()
    env = {"OPSAPI_DATABASE_URL": pg_url, "OPSAPI_LOCAL_KEY_FILE": str(key_file),
           "OPSAPI_CONTROLLER_POLL_SECONDS": "0.2", "OPSAPI_ROUTERS_FILE": str(routers),
           "OPSAPI_ENV": "test"}  # fmt: skip
    token = LocalSigner.load_or_create(key_file).mint(subject="ops", roles=["admin"])
    headers = {"Authorization": f"Bearer {token}"}
    base = f"http://127.0.0.1:{port}{API}"
    log = tmp_path / "server.log"

    with slot_backends(blue="v1", green="v2") as slots:
        addresses = {slot: backend.address for slot, backend in slots.items()}
        with running_lua_nginx(binary, tmp_path / "nginx", router, admin) as nginx:
            server = start_server(port, env, log)
            try:
                # given v2 at 25 % under a 2 s lease, renewed by the controller
                policy = {
                    "steps": [{"weight": 25, "wait": "1h"}, {"weight": 100, "wait": "1h"}],
                    "interval": "1s",
                    "lease": "2s",
                    "gates": [],
                    "router": {"name": "edge", "upstream": UPSTREAM, "slots": addresses},
                }
                assert httpx.put(f"{base}/services/checkout", json=policy,
                                 headers=headers).is_success  # fmt: skip
                start = {"service": "checkout", "version": "v2", "stable_version": "v1"}
                started = httpx.post(f"{base}/canary/promote", json=start, headers=headers,
                                     timeout=10).json()  # fmt: skip
                assert started["applied_weight"] == 25, started
                assert started["lease_seconds"] == 2
                # the weight outlives its lease as long as the controller renews it
                await asyncio.sleep(3)
                renewed = await asyncio.to_thread(split, nginx.port, 400)
                assert abs(slot_shares(renewed)["green"] - 25) <= 8, renewed

                # when every opsapi process dies
                server.send_signal(signal.SIGKILL)
                server.wait(timeout=10)
                killed = time.monotonic()
                # then within the lease and a second, no request reaches the canary
                await asyncio.sleep(max(0.0, 3 - (time.monotonic() - killed)))
                assert await asyncio.to_thread(split, nginx.port, 500) == Counter({"blue v1": 500})

                # when opsapi starts again, the rollout resumes from the database: 25 % again
                server = start_server(port, env, log)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    shares = slot_shares(await asyncio.to_thread(split, nginx.port, 200))
                    if shares.get("green", 0) > 5:
                        break
                    await asyncio.sleep(0.3)
                back = await asyncio.to_thread(split, nginx.port, 400)
                assert abs(slot_shares(back)["green"] - 25) <= 8, back
                view = httpx.get(f"{base}/canary/checkout", headers=headers).json()
                assert (view["state"], view["applied_weight"]) == ("progressing", 25)
                assert view["lease_until"] is not None
            finally:
                stop(server)
