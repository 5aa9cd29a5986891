"""Rollback latency through real routers: request sent → router confirmed → answer received.

    .venv/bin/python benchmarks/router_rollback.py [--rollbacks 200]

One `opsapi serve` process on PostgreSQL, real nginx and HAProxy on loopback in front of two
tiny backends. Each round starts a canary (10 %) and rolls it back; the rollback request's
latency is measured by the client. In the same run: a bare `nginx -s reload` plus the same
confirmation (the new configuration seen live by the probe for the settle period) — the floor
for any nginx change — and the ratio of the two.
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
from opsapi.routers.nginx import NginxParams, NginxRouter, render
from tests.support.databases import create_pg_database, drop_pg_database
from tests.support.processes import free_port, start_server, stop
from tests.support.proxies import (
    backends,
    find_binary,
    running_haproxy,
    running_nginx,
)

API = "/internal/ops"


def ms(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def rollbacks(base: str, token: str, service: str, count: int) -> list[float]:
    headers = {"Authorization": f"Bearer {token}"}
    latencies = []
    with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
        for i in range(count):
            started = client.post("/canary/promote", json={"service": service, "version": f"v{i}"})
            assert started.status_code == 200, started.text
            sent = time.perf_counter()
            answer = client.post("/canary/rollback", json={"service": service, "reason": "bench"})
            latencies.append(time.perf_counter() - sent)
            body = answer.json()
            assert answer.status_code == 200, answer.text
            assert body["traffic_at_zero"], answer.text
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
    work = Path(tempfile.mkdtemp(prefix="opsapi-routerbench-"))
    name, url = await create_pg_database()
    server = None
    try:
        with (
            backends() as apps,
            running_nginx(nginx_binary, work / "nginx") as nginx,
            running_haproxy(haproxy_binary, apps.stable, apps.canary) as haproxy,
        ):
            routers = {
                "edge": {"type": "nginx", "conf": str(nginx.conf), "prefix": str(nginx.directory),
                         "upstreams_dir": str(nginx.upstreams_dir), "binary": nginx_binary,
                         "probe": nginx.probe},
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
                                    ("via-haproxy", {"name": "lb", **haproxy_params})):  # fmt: skip
                policy = {"steps": [{"weight": 10, "wait": "1h"}, {"weight": 100, "wait": "1h"}],
                          "router": router}  # fmt: skip
                response = httpx.put(f"{base}/services/{service}", json=policy, headers=headers)
                assert response.status_code == 200, response.text

            print(f"{args.rollbacks} rollbacks per router, one server process, PostgreSQL, "
                  f"{os.cpu_count()} cores")  # fmt: skip
            via_nginx = await asyncio.to_thread(rollbacks, base, token, "via-nginx", args.rollbacks)
            via_haproxy = await asyncio.to_thread(
                rollbacks, base, token, "via-haproxy", args.rollbacks
            )
            bare_router = NginxRouter(
                "edge", nginx.conf, nginx.directory, nginx.upstreams_dir, nginx_binary,
                probe=nginx.probe,
            )  # fmt: skip
            bare_params = NginxParams("bare", slots)
            bare = await bare_reloads(bare_router, bare_params, args.rollbacks)
            print(line("rollback via nginx", via_nginx))
            print(line("rollback via HAProxy", via_haproxy))
            print(line("bare nginx -s reload + confirm", bare))
            ratio = statistics.median(via_nginx) / statistics.median(bare)
            ratio99 = ms(via_nginx, 0.99) / ms(bare, 0.99)
            print(f"nginx rollback / bare reload: p50 ratio {ratio:.2f}x, p99 ratio "
                  f"{ratio99:.2f}x (goal <= 1.5x)")  # fmt: skip
    finally:
        if server is not None:
            stop(server)
        await drop_pg_database(name)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
