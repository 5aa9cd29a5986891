"""The nginx router against a real nginx on loopback, in front of real backends."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from opsapi.routers.base import Router, RouterError, RouteTarget
from opsapi.routers.nginx import NginxParams, NginxRouter, file_percent, render
from tests.support.databases import unavailable
from tests.support.proxies import (
    Backends,
    Background,
    Nginx,
    backends,
    canary_percent,
    find_binary,
    running_nginx,
    split,
)

STEPS = (10, 25, 50, 75, 100)


@pytest.fixture(scope="module")
def servers() -> Iterator[Backends]:
    with backends() as running:
        yield running


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Nginx]:
    binary = find_binary("nginx")
    if binary is None:
        unavailable("nginx")
        raise AssertionError("unreachable")
    with running_nginx(binary, tmp_path / "nginx") as running:
        yield running


def router_for(nginx: Nginx, **options: object) -> NginxRouter:
    settings: dict[str, object] = {"command_timeout": 5.0, "confirm_timeout": 3.0}
    settings.update(options)
    return NginxRouter(
        "edge",
        nginx.conf,
        nginx.directory,
        nginx.upstreams_dir,
        str(settings.pop("binary", nginx.binary)),
        probe=nginx.probe,
        **settings,  # type: ignore[arg-type]
    )


def target(servers: Backends) -> RouteTarget:
    return RouteTarget(
        "checkout",
        rollout_id=7,
        params={"upstream": "checkout", "stable": servers.stable, "canary": servers.canary},
    )


async def measured(nginx: Nginx, requests: int = 2000) -> float:
    return canary_percent(await asyncio.to_thread(split, nginx.port, requests))


async def test_each_step_splits_traffic_as_applied(nginx: Nginx, servers: Backends) -> None:
    router: Router = router_for(nginx)
    assert await router.read_back(target(servers)) is None
    for step in STEPS:
        await router.apply(target(servers), step)
        assert abs(await measured(nginx) - step) <= 3, step
        assert await router.read_back(target(servers)) == step


async def test_rollback_sends_nothing_to_canary_once_apply_returns(
    nginx: Nginx, servers: Backends
) -> None:
    router = router_for(nginx)
    await router.apply(target(servers), 50)
    # Keep-alive traffic flows during the reload: old workers still hold connections then.
    with Background(nginx.port) as traffic:
        await asyncio.to_thread(traffic.wait_before, 200)
        await router.apply(target(servers), 0)
        traffic.mark()
        await asyncio.to_thread(traffic.wait_after, 500)
    assert traffic.before["canary"] > 0
    assert traffic.after["canary"] == 0, traffic.after
    assert traffic.after["stable"] >= 500


async def test_failed_validation_keeps_the_old_configuration_serving(
    nginx: Nginx, servers: Backends
) -> None:
    router = router_for(nginx)
    await router.apply(target(servers), 25)
    path = nginx.upstreams_dir / "checkout.conf"
    good = path.read_text()
    broken = nginx.upstreams_dir / "zz-broken.conf"
    broken.write_text("this is not nginx;\n")

    with pytest.raises(RouterError, match=r"configuration test failed: .*unknown directive"):
        await router.apply(target(servers), 50)

    assert path.read_text() == good
    assert sorted(p.name for p in nginx.upstreams_dir.iterdir()) == [
        ".opsapi.lock",
        "checkout.conf",
        "zz-broken.conf",
    ]
    assert abs(await measured(nginx) - 25) <= 3
    assert await router.read_back(target(servers)) == 25

    broken.unlink()
    await router.apply(target(servers), 50)
    assert abs(await measured(nginx) - 50) <= 3


async def test_missing_binary_is_a_router_error(nginx: Nginx, servers: Backends) -> None:
    await router_for(nginx).apply(target(servers), 25)
    before = (nginx.upstreams_dir / "checkout.conf").read_text()
    missing = router_for(nginx, binary="/nonexistent/sbin/nginx")

    with pytest.raises(RouterError, match="not found"):
        await missing.apply(target(servers), 75)

    assert (nginx.upstreams_dir / "checkout.conf").read_text() == before
    assert abs(await measured(nginx, 1000) - 25) <= 3


async def test_drift_is_read_back_and_repaired(nginx: Nginx, servers: Backends) -> None:
    router = router_for(nginx)
    await router.apply(target(servers), 25)
    path = nginx.upstreams_dir / "checkout.conf"
    # Someone edits the weights by hand and reloads.
    path.write_text(
        path.read_text().replace("weight=75", "weight=40").replace("weight=25", "weight=60")
    )
    nginx.reload()
    await asyncio.sleep(0.5)  # nginx retires old workers ~100 ms after starting new ones
    assert abs(await measured(nginx, 1000) - 60) <= 3

    assert await router.read_back(target(servers)) == 60
    await router.apply(target(servers), 25)
    assert await router.read_back(target(servers)) == 25
    assert abs(await measured(nginx) - 25) <= 3


async def test_reload_that_never_shows_up_is_refused_and_undone(
    nginx: Nginx, servers: Backends, tmp_path: Path
) -> None:
    # A directory the main config does not include: nginx -t and reload pass, the probe never
    # shows the new generation.
    elsewhere = tmp_path / "not-included"
    elsewhere.mkdir()
    router = NginxRouter(
        "edge", nginx.conf, nginx.directory, elsewhere, nginx.binary, probe=nginx.probe,
        confirm_timeout=1.0,
    )  # fmt: skip
    with pytest.raises(RouterError, match="not confirmed within 1s"):
        await router.apply(target(servers), 25)
    assert not (elsewhere / "checkout.conf").exists()


async def test_stopped_nginx_is_a_router_error_then_recovers(
    nginx: Nginx, servers: Backends
) -> None:
    router = router_for(nginx)
    await router.apply(target(servers), 25)
    before = (nginx.upstreams_dir / "checkout.conf").read_text()
    nginx.stop()

    with pytest.raises(RouterError, match="reload failed"):
        await router.apply(target(servers), 50)
    with pytest.raises(RouterError, match="unreachable"):
        await router.read_back(target(servers))
    assert (nginx.upstreams_dir / "checkout.conf").read_text() == before

    nginx.start()
    assert await router.read_back(target(servers)) == 25
    await router.apply(target(servers), 50)
    assert abs(await measured(nginx, 1000) - 50) <= 3


async def test_invalid_parameters_never_reach_a_file(nginx: Nginx, servers: Backends) -> None:
    router = router_for(nginx)
    bad = RouteTarget(
        "checkout",
        params={"upstream": "checkout", "stable": servers.stable, "canary": "x; include /etc:1"},
    )
    with pytest.raises(RouterError, match=r"router\.canary"):
        await router.apply(bad, 10)
    with pytest.raises(RouterError, match="invalid service name"):
        await router.apply(RouteTarget("../etc", params=target(servers).params), 10)
    with pytest.raises(RouterError, match="0-100"):
        await router.apply(target(servers), 101)
    assert not (nginx.upstreams_dir / "checkout.conf").exists()


def test_check_params() -> None:
    router = NginxRouter(
        "edge", Path("/etc/nginx/nginx.conf"), Path("/etc/nginx"), Path("/etc/nginx/opsapi"),
        probe="127.0.0.1:8099",
    )  # fmt: skip
    good = {"upstream": "checkout_v2", "stable": "10.0.0.1:8080", "canary": "[::1]:8081"}
    assert router.check_params(good) == []
    assert router.check_params({**good, "canary": "canary.internal:80"}) == []

    def fields(params: dict[str, object]) -> list[str]:
        return [error["field"] for error in router.check_params(params)]

    assert fields({}) == ["router.upstream", "router.stable", "router.canary"]
    assert fields({**good, "extra": 1}) == ["router.extra"]
    assert fields({**good, "upstream": "check out"}) == ["router.upstream"]
    assert fields({**good, "upstream": "x" * 65}) == ["router.upstream"]
    for address in ("10.0.0.1", "10.0.0.1:80;", "a b:80", "h:123456", "h:0", "[zz]:80", "-h:80",
                    "::1:80", "http://h:80", 8080):  # fmt: skip
        assert fields({**good, "stable": address}) == ["router.stable"], address
    assert fields({**good, "canary": good["stable"]}) == ["router.canary"]


def test_render_marks_the_idle_server_down() -> None:
    params = NginxParams("checkout", "10.0.0.1:80", "10.0.0.2:80")
    zero = render("edge", "checkout", params, 0, 1, "127.0.0.1:8099")
    assert "server 10.0.0.1:80 weight=100;" in zero
    assert "server 10.0.0.2:80 down;" in zero
    full = render("edge", "checkout", params, 100, 2, "127.0.0.1:8099")
    assert "server 10.0.0.1:80 down;" in full
    assert "server 10.0.0.2:80 weight=100;" in full
    for weight in range(101):
        assert file_percent(render("e", "s", params, weight, 3, "127.0.0.1:1"), params) == weight


async def test_hung_nginx_command_times_out_and_cancel_undoes(
    tmp_path: Path, servers: Backends
) -> None:
    hung = tmp_path / "hung-nginx"
    hung.write_text("#!/bin/sh\nexec sleep 30\n")
    hung.chmod(0o755)
    upstreams = tmp_path / "upstreams"
    upstreams.mkdir()
    router = NginxRouter(
        "edge", tmp_path / "nginx.conf", tmp_path, upstreams, str(hung), probe="127.0.0.1:1",
        command_timeout=0.3,
    )  # fmt: skip
    with pytest.raises(RouterError, match=r"configuration test took longer than 0\.3s"):
        await router.apply(target(servers), 10)
    assert not (upstreams / "checkout.conf").exists()

    router.command_timeout = 30
    applying = asyncio.create_task(router.apply(target(servers), 10))
    await asyncio.sleep(0.2)
    assert (upstreams / "checkout.conf").exists()
    applying.cancel()
    with pytest.raises(asyncio.CancelledError):
        await applying
    assert not (upstreams / "checkout.conf").exists()
