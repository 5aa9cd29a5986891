"""Rollback latency through real routers: request sent → router confirmed → answer received.

    .venv/bin/python benchmarks/router_rollback.py [--rollbacks 200]

One `opsapi serve` process on PostgreSQL, real nginx (file router), nginx with the Lua module
(nginx-lua router, 2 workers) and HAProxy on loopback in front of two tiny backends. Each round
starts a canary (10 %) and rolls it back; the rollback request's latency is measured by the
client (the routers without reloads take turns, the file router runs apart); the pull router
(nothing to apply) is the floor of the API path itself. In the same
run: a bare `nginx -s reload` plus the same confirmation (the new
configuration seen live by the probe for the settle period) — the floor for any file-router
change — and the ratio of the two; and the nginx-lua weight switch itself: the admin call and
its confirmation (the entry read back), and the whole `apply` (state file written first).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opsapi.auth.tokens import LocalSigner
from opsapi.routers.base import RouteTarget
from opsapi.routers.nginx import NginxParams, NginxRouter, render
from opsapi.routers.nginx_lua import WEIGHTS_PATH, Entry, NginxLuaRouter
from tests.support.databases import create_pg_database, drop_pg_database
from tests.support.nginx_lua import admin_addresses, lua_nginx_binary, running_lua_nginx
from tests.support.processes import free_port, start_server, stop
from tests.support.proxies import (
    backends,
    find_binary,
    running_haproxy,
    running_nginx,
)

LUA_SECRET = "benchmark-secret-" + "x" * 24

API = "/internal/ops"


def ms(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def rollbacks(base: str, token: str, services: list[str], count: int) -> dict[str, list[float]]:
    """Per service, `count` rollback latencies; the services take turns, so that the machine's
    load at any moment weighs on each alike."""
    headers = {"Authorization": f"Bearer {token}"}
    latencies: dict[str, list[float]] = {service: [] for service in services}
    with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
        for i in range(count):
            for service in services:
                body = {"service": service, "version": f"v{i}"}
                started = client.post("/canary/promote", json=body)
                assert started.status_code == 200, started.text
                sent = time.perf_counter()
                body = {"service": service, "reason": "bench"}
                answer = client.post("/canary/rollback", json=body)
                latencies[service].append(time.perf_counter() - sent)
                assert answer.status_code == 200, answer.text
                # The pull router's weight is applied once a client fetches it: not awaited.
                assert answer.json()["traffic_at_zero"] or service == "via-pull", answer.text
    return latencies


async def bare_reloads(router: NginxRouter, params: NginxParams, count: int) -> list[float]:
    """`nginx -s reload` + confirmation only: the file is written beforehand, untimed."""
    path = router.upstreams_dir / "bare.conf"
    durations = []
    for i in range(count):
        generation = 1_000_000 + i
        weights = {"blue": 90, "green": 10}
        path.write_text(render(router.name, "bare", params, weights, generation, router.probe))
        started = time.perf_counter()
        await router._nginx("-s", "reload", what="reload")
        await router._confirm("bare", generation)
        durations.append(time.perf_counter() - started)
    return durations


async def lua_switches(router: NginxLuaRouter, slots: dict[str, str], count: int) -> list[float]:
    """The weight switch alone: one admin call setting a new entry, confirmed by the entry it
    reads back (what `apply` waits for after writing the state file)."""
    client = router._clients[router.admins[0]]
    durations = []
    for i in range(count):
        weight = 10 if i % 2 else 0
        shares = {"blue": (100 - weight, slots["blue"]), "green": (weight, slots["green"])}
        entry = Entry("bare-lua", "bare-lua", 2_000_000_000_000_000 + i, "green", "blue", shares)
        started = time.perf_counter()
        answer = await client.request("POST", WEIGHTS_PATH, entry.line())
        confirmed = answer.status == 200 and Entry.parse(answer.text) == entry
        durations.append(time.perf_counter() - started)
        assert confirmed, answer
    return durations


async def lua_applies(router: NginxLuaRouter, slots: dict[str, str], count: int) -> list[float]:
    """`apply` as the API calls it: state file written, then the switch on every instance."""
    target = RouteTarget("bare-apply", params={"upstream": "bare_apply", "slots": slots})
    durations = []
    for i in range(count):
        started = time.perf_counter()
        await router.apply(target, 10 if i % 2 else 0)
        durations.append(time.perf_counter() - started)
    return durations


def line(name: str, samples: list[float]) -> str:
    return (
        f"{name:<34} p50 {ms(samples, 0.5):7.1f} ms   p99 {ms(samples, 0.99):7.1f} ms   "
        f"mean {statistics.fmean(samples) * 1000:7.1f} ms   n={len(samples)}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rollbacks", type=int, default=200)
    args = parser.parse_args()
    nginx_binary, haproxy_binary = find_binary("nginx"), find_binary("haproxy")
    assert nginx_binary, "apt-get install -y nginx"
    assert haproxy_binary, "apt-get install -y haproxy"
    lua_binary = lua_nginx_binary()
    work = Path(tempfile.mkdtemp(prefix="opsapi-routerbench-"))
    name, url = await create_pg_database()
    server = None
    (lua_admin,) = admin_addresses(1)
    (work / "lua-state").mkdir(parents=True)
    lua_router = NginxLuaRouter("edge-lua", [lua_admin], LUA_SECRET, work / "lua-state" / "s")
    try:
        with (
            backends() as apps,
            running_nginx(nginx_binary, work / "nginx") as nginx,
            running_lua_nginx(lua_binary, work / "nginx-lua", lua_router, lua_admin),
            running_haproxy(haproxy_binary, apps.stable, apps.canary) as haproxy,
        ):
            routers = {
                "edge": {"type": "nginx", "conf": str(nginx.conf), "prefix": str(nginx.directory),
                         "upstreams_dir": str(nginx.upstreams_dir), "binary": nginx_binary,
                         "probe": nginx.probe},
                "edge-lua": {"type": "nginx-lua", "admin": lua_admin, "secret": LUA_SECRET,
                             "state_file": str(lua_router.state_file)},
                "lb": {"type": "haproxy", "socket": haproxy.socket},
            }  # fmt: skip
            (work / "routers.json").write_text(json.dumps(routers))
            env = {
                "OPSAPI_DATABASE_URL": url,
                "OPSAPI_LOCAL_KEY_FILE": str(work / "key.json"),
                "OPSAPI_ROUTERS_FILE": str(work / "routers.json"),
                "OPSAPI_ENV": "test",
            }
            port = free_port()
            server = start_server(port, env, work / "server.log")
            token = LocalSigner.load_or_create(work / "key.json").mint(
                subject="bench", roles=["admin"]
            )
            base = f"http://127.0.0.1:{port}{API}"
            headers = {"Authorization": f"Bearer {token}"}
            slots = {"blue": apps.stable, "green": apps.canary}
            nginx_params = {"upstream": "checkout", "slots": slots}
            haproxy_params = {"backend": "checkout", "slots": {"blue": "stable", "green": "canary"}}
            for service, router in (("via-nginx", {"name": "edge", **nginx_params}),
                                    ("via-nginx-lua", {"name": "edge-lua", **nginx_params}),
                                    ("via-haproxy", {"name": "lb", **haproxy_params}),
                                    ("via-pull", {"name": "pull"})):  # fmt: skip
                policy = {"steps": [{"weight": 10, "wait": "1h"}, {"weight": 100, "wait": "1h"}],
                          "router": router}  # fmt: skip
                response = httpx.put(f"{base}/services/{service}", json=policy, headers=headers)
                assert response.status_code == 200, response.text

            print(f"{args.rollbacks} rollbacks per router, one server process, PostgreSQL, "
                  f"{os.cpu_count()} cores")  # fmt: skip
            # The routers without reloads first and apart: a reload's new and retiring workers
            # would load the cores during the next few rollbacks.
            fast = ["via-nginx-lua", "via-haproxy", "via-pull"]
            measured = await asyncio.to_thread(rollbacks, base, token, fast, args.rollbacks)
            via_lua, via_haproxy = measured["via-nginx-lua"], measured["via-haproxy"]
            via_pull = measured["via-pull"]
            measured = await asyncio.to_thread(
                rollbacks, base, token, ["via-nginx"], args.rollbacks
            )
            via_nginx = measured["via-nginx"]
            switches = await lua_switches(lua_router, slots, max(args.rollbacks, 1000))
            applies = await lua_applies(lua_router, slots, max(args.rollbacks, 1000))
            bare_router = NginxRouter(
                "edge", nginx.conf, nginx.directory, nginx.upstreams_dir, nginx_binary,
                probe=nginx.probe,
            )  # fmt: skip
            bare_params = NginxParams("bare", slots)
            bare = await bare_reloads(bare_router, bare_params, args.rollbacks)
            print(line("rollback via nginx", via_nginx))
            print(line("rollback via nginx-lua", via_lua))
            print(line("rollback via HAProxy", via_haproxy))
            print(line("rollback via pull (API, no router)", via_pull))
            print(line("bare nginx -s reload + confirm", bare))
            ratio = statistics.median(via_nginx) / statistics.median(bare)
            ratio99 = ms(via_nginx, 0.99) / ms(bare, 0.99)
            print(f"nginx rollback / bare reload: p50 ratio {ratio:.2f}x, p99 ratio "
                  f"{ratio99:.2f}x (goal <= 1.5x)")  # fmt: skip
            print(line("nginx-lua switch (call + confirm)", switches))
            print(line("nginx-lua apply (state + switch)", applies))
            print(f"nginx-lua: rollback p99 {ms(via_lua, 0.99):.1f} ms (goal <= 20 ms), switch "
                  f"p99 {ms(switches, 0.99):.3f} ms (goal <= 1 ms)")  # fmt: skip
    finally:
        if server is not None:
            stop(server)
        await drop_pg_database(name)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
