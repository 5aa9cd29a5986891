"""The HAProxy router against a real HAProxy on loopback, over its runtime API."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from opsapi.routers.base import Router, RouterError, RouteTarget
from opsapi.routers.haproxy import HaproxyRouter
from tests.support.databases import unavailable
from tests.support.processes import free_port
from tests.support.proxies import (
    Backends,
    Background,
    Haproxy,
    backends,
    canary_percent,
    find_binary,
    running_haproxy,
    split,
)

STEPS = (10, 25, 50, 75, 100)
TARGET = RouteTarget(
    "checkout",
    rollout_id=7,
    params={"backend": "checkout", "stable_server": "stable", "canary_server": "canary"},
)


@pytest.fixture(scope="module")
def servers() -> Iterator[Backends]:
    with backends() as running:
        yield running


@pytest.fixture
def haproxy(servers: Backends) -> Iterator[Haproxy]:
    binary = find_binary("haproxy")
    if binary is None:
        unavailable("haproxy")
        raise AssertionError("unreachable")
    with running_haproxy(binary, servers.stable, servers.canary) as running:
        yield running


async def measured(haproxy: Haproxy, requests: int = 2000) -> float:
    return canary_percent(await asyncio.to_thread(split, haproxy.port, requests))


async def runtime_api(address: str, command: str) -> str:
    """A command sent by hand, behind the router's back."""
    reader, writer = await asyncio.open_unix_connection(address)
    writer.write(command.encode() + b"\n")
    answer = await reader.read()
    writer.close()
    return answer.decode().strip()


@pytest.mark.parametrize("over", ["unix", "tcp"])
async def test_each_step_splits_traffic_as_applied(haproxy: Haproxy, over: str) -> None:
    router: Router = HaproxyRouter("lb", haproxy.socket if over == "unix" else haproxy.tcp_socket)
    assert await router.read_back(TARGET) == 0  # the configuration's weights: 100 / 0
    for step in STEPS:
        await router.apply(TARGET, step)
        assert abs(await measured(haproxy) - step) <= 3, step
        assert await router.read_back(TARGET) == step


async def test_weights_are_absolute_and_confirmed(haproxy: Haproxy) -> None:
    router = HaproxyRouter("lb", haproxy.socket)
    await router.apply(TARGET, 25)
    # "current (initial)": the canary was declared with weight 0, its current weight is ours.
    assert await runtime_api(haproxy.socket, "get weight checkout/stable") == "75 (initial 100)"
    assert await runtime_api(haproxy.socket, "get weight checkout/canary") == "25 (initial 0)"
    await router.apply(TARGET, 0)
    assert await runtime_api(haproxy.socket, "get weight checkout/canary") == "0 (initial 0)"


async def test_rollback_sends_nothing_to_canary_once_apply_returns(haproxy: Haproxy) -> None:
    router = HaproxyRouter("lb", haproxy.socket)
    await router.apply(TARGET, 50)
    with Background(haproxy.port) as traffic:
        await asyncio.to_thread(traffic.wait_before, 200)
        await router.apply(TARGET, 0)
        traffic.mark()
        await asyncio.to_thread(traffic.wait_after, 500)
    assert traffic.before["canary"] > 0
    assert traffic.after["canary"] == 0, traffic.after
    assert traffic.after["stable"] >= 500


async def test_drift_is_read_back_and_repaired(haproxy: Haproxy) -> None:
    router = HaproxyRouter("lb", haproxy.socket)
    await router.apply(TARGET, 25)
    assert await runtime_api(haproxy.socket, "set weight checkout/canary 75") == ""
    assert await router.read_back(TARGET) == 50  # 75 / (75 + 75)
    assert abs(await measured(haproxy, 1000) - 50) <= 3

    await router.apply(TARGET, 25)
    assert await router.read_back(TARGET) == 25
    assert abs(await measured(haproxy) - 25) <= 3


async def test_stopped_haproxy_is_a_router_error_then_recovers(haproxy: Haproxy) -> None:
    for address in (haproxy.socket, haproxy.tcp_socket):
        await HaproxyRouter("lb", address).apply(TARGET, 25)
    haproxy.stop()
    for address in (haproxy.socket, haproxy.tcp_socket):
        router = HaproxyRouter("lb", address, timeout=1.0)
        with pytest.raises(RouterError, match="cannot reach"):
            await router.apply(TARGET, 50)
        with pytest.raises(RouterError, match="cannot reach"):
            await router.read_back(TARGET)

    haproxy.start()
    router = HaproxyRouter("lb", haproxy.socket)
    # A restart forgets runtime weights: back to the configuration's, which reads as drift.
    assert await router.read_back(TARGET) == 0
    await router.apply(TARGET, 50)
    assert abs(await measured(haproxy, 1000) - 50) <= 3


async def test_unreachable_sockets_are_router_errors() -> None:
    missing = HaproxyRouter("lb", "/nonexistent/haproxy/admin.sock")
    with pytest.raises(RouterError, match=r"cannot reach /nonexistent/haproxy/admin\.sock"):
        await missing.apply(TARGET, 10)
    refused = HaproxyRouter("lb", f"127.0.0.1:{free_port()}")
    with pytest.raises(RouterError, match="cannot reach"):
        await refused.read_back(TARGET)
    # A listener that accepts and never answers: bounded by the timeout.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        router = HaproxyRouter("lb", f"127.0.0.1:{port}", timeout=0.3)
        with pytest.raises(RouterError, match=r"no answer .* within 0\.3s"):
            await router.apply(TARGET, 10)


async def test_haproxy_refusals_are_router_errors(haproxy: Haproxy) -> None:
    router = HaproxyRouter("lb", haproxy.socket)
    params = dict(TARGET.params)
    with pytest.raises(RouterError, match="No such backend"):
        await router.apply(RouteTarget("checkout", params={**params, "backend": "nope"}), 10)
    with pytest.raises(RouterError, match="No such server"):
        await router.read_back(RouteTarget("checkout", params={**params, "canary_server": "x"}))
    with pytest.raises(RouterError, match="static LB algorithm"):
        await router.apply(RouteTarget("checkout", params={**params, "backend": "fixed"}), 10)
    with pytest.raises(RouterError, match=r"router\.backend"):
        await router.apply(RouteTarget("checkout", params={**params, "backend": "a/b; x"}), 10)


def test_check_params() -> None:
    router = HaproxyRouter("lb", "127.0.0.1:9999")
    good = {"backend": "be_checkout.v2", "stable_server": "s1", "canary_server": "c:1"}
    assert router.check_params(good) == []

    def fields(params: dict[str, object]) -> list[str]:
        return [error["field"] for error in router.check_params(params)]

    assert fields({}) == ["router.backend", "router.stable_server", "router.canary_server"]
    assert fields({**good, "weight": 3}) == ["router.weight"]
    for name in ("a b", "a/b", "a;b", "a\nb", "", "x" * 65, 3):
        assert fields({**good, "backend": name}) == ["router.backend"], name
    assert fields({**good, "canary_server": "s1"}) == ["router.canary_server"]
    with pytest.raises(ValueError, match="socket"):
        HaproxyRouter("lb", "relative.sock")
