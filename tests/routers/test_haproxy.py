"""The HAProxy router against a real HAProxy on loopback, over its runtime API. Backend
`checkout` has servers `stable` and `canary` (slots blue and green, as the migration of turn-1
policies named them); the release tests use a backend with one server per slot."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from opsapi.routers.base import Router, RouterError, RouteTarget, is_slot_name
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
from tests.support.slots import running_slot_haproxy, slot_backends, slot_shares

STEPS = (10, 25, 50, 75, 100)
TARGET = RouteTarget(
    "checkout",
    rollout_id=7,
    params={"backend": "checkout", "slots": {"blue": "stable", "green": "canary"}},
    canary_slot="green",
    stable_slot="blue",
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


async def test_consecutive_releases_alternate_slots() -> None:
    binary = find_binary("haproxy")
    if binary is None:
        unavailable("haproxy")
        return
    with (
        slot_backends(blue="v1", green="v2") as slots,
        running_slot_haproxy(binary, {n: b.address for n, b in slots.items()}) as haproxy,
    ):
        router = HaproxyRouter("lb", haproxy.socket)
        params = {"backend": "checkout", "slots": {"blue": "srv_blue", "green": "srv_green"}}

        def release(canary: str, stable: str, versions: tuple[str, str]) -> RouteTarget:
            return RouteTarget("checkout", 1, params, canary, stable, *versions)

        async def answers(requests: int) -> Counter[str]:
            return await asyncio.to_thread(split, haproxy.port, requests)

        # Given v1 stable in blue (the configuration's weights), when v2's canary in green gets
        # 25 %, then a quarter of real requests reach green.
        first = release("green", "blue", ("v1", "v2"))
        assert await router.read_back(first) == 0
        await router.apply(first, 25)
        measured = slot_shares(await answers(400))
        assert abs(measured["green"] - 25) <= 7, measured
        assert await router.read_back(first) == 25

        # When v2 reaches 100 % and succeeds (green becomes the stable slot),
        await router.apply(first, 100)
        succeeded = replace(first, stable_slot="green")
        await router.apply(succeeded, 100)
        assert await answers(400) == Counter({"green v2": 400})
        assert await router.read_back(succeeded) == 100

        # then the second release deploys v3 into the other slot, blue, and gets 50 %:
        slots["blue"].deploy("v3")
        second = release("blue", "green", ("v2", "v3"))
        await router.apply(second, 50)
        measured_second = await answers(400)
        assert set(measured_second) == {"blue v3", "green v2"}, measured_second
        assert abs(slot_shares(measured_second)["blue"] - 50) <= 7, measured_second
        assert await router.read_back(second) == 50
        assert await runtime_api(haproxy.socket, "get weight checkout/srv_blue") == (
            "50 (initial 100)"
        )

        # When v3 is rolled back, no request reaches blue: all go to v2 in green.
        await router.apply(second, 0)
        assert await answers(300) == Counter({"green v2": 300})
        assert await router.read_back(second) == 0
        assert (
            await runtime_api(haproxy.socket, "get weight checkout/srv_blue") == "0 (initial 100)"
        )
        assert await runtime_api(haproxy.socket, "get weight checkout/srv_green") == (
            "100 (initial 0)"
        )


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
        await router.read_back(
            RouteTarget("checkout", params={**params, "slots": {"blue": "stable", "green": "x"}})
        )
    with pytest.raises(RouterError, match="static LB algorithm"):
        await router.apply(RouteTarget("checkout", params={**params, "backend": "fixed"}), 10)
    with pytest.raises(RouterError, match=r"router\.backend"):
        await router.apply(RouteTarget("checkout", params={**params, "backend": "a/b; x"}), 10)
    with pytest.raises(RouterError, match="canary slot red is not one of the policy's slots"):
        await router.apply(replace(TARGET, canary_slot="red"), 10)
    assert await runtime_api(haproxy.socket, "get weight checkout/canary") == "0 (initial 0)"


SLOTS, BLUE, GREEN = "router.slots", "router.slots.blue", "router.slots.green"
SLOT_CASES: list[tuple[str, Any, list[str]]] = [
    ("server names", {"blue": "srv_blue", "green": "srv-green.v2:1"}, []),
    ("any two slot names", {"a1": "s1", "b-2": "s2"}, []),
    ("one slot", {"blue": "srv_blue"}, [SLOTS]),
    ("three slots", {"a": "s1", "b": "s2", "c": "s3"}, [SLOTS]),
    ("no slots", {}, [SLOTS]),
    ("a list", ["s1", "s2"], [SLOTS]),
    ("upper-case name", {"BLUE": "s1", "green": "s2"}, [SLOTS]),
    ("name with a slash", {"b/x": "s1", "green": "s2"}, [SLOTS]),
    ("same server twice", {"blue": "srv", "green": "srv"}, [GREEN]),
    ("a number", {"blue": 1, "green": "s2"}, [BLUE]),
    ("null", {"blue": None, "green": "s2"}, [BLUE]),
    ("empty", {"blue": "", "green": "s2"}, [BLUE]),
    ("too long", {"blue": "s" * 65, "green": "s2"}, [BLUE]),
    ("a space", {"blue": "srv blue", "green": "s2"}, [BLUE]),
    ("backend/server", {"blue": "other/srv", "green": "s2"}, [BLUE]),
    ("second command", {"blue": "srv;disable server checkout/s2", "green": "s2"}, [BLUE]),
    ("newline command", {"blue": "srv\nshutdown sessions server checkout/s2", "green": "s2"},
     [BLUE]),
    ("both bad", {"blue": "a b", "green": "c;d"}, [BLUE, GREEN]),
]  # fmt: skip


@pytest.mark.parametrize(("slots", "expected"), [case[1:] for case in SLOT_CASES],
                         ids=[case[0] for case in SLOT_CASES])  # fmt: skip
def test_check_params_slots(slots: Any, expected: list[str]) -> None:
    errors = HaproxyRouter("lb", "127.0.0.1:9999").check_params(
        {"backend": "checkout", "slots": slots}
    )
    assert [error["field"] for error in errors] == expected
    # Field errors never echo a value, nor a slot name that is not a valid one.
    shown = " ".join(f"{error['field']} {error['message']}" for error in errors)
    values = list(slots.values()) if isinstance(slots, dict) else [slots]
    names = [name for name in slots if not is_slot_name(name)] if isinstance(slots, dict) else []
    for value in [*values, *names]:
        if value not in (None, 1, ""):  # too short to tell
            assert str(value) not in shown


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"backend": "be_checkout.v2", "slots": {"blue": "s1", "green": "c:1"}}, []),
        ({}, ["router.backend", "router.slots"]),
        ({"backend": "b", "slots": {"blue": "s1", "green": "s2"}, "weight": 3}, ["router.weight"]),
        *[({"backend": name, "slots": {"blue": "s1", "green": "s2"}}, ["router.backend"])
          for name in ("a b", "a/b", "a;b", "a\nb", "", "x" * 65, 3)],
        # Turn-1 parameters: refused, told to use slots.
        ({"backend": "b", "stable_server": "s1", "canary_server": "s2"},
         ["router.canary_server", "router.stable_server", "router.slots"]),
    ],
)  # fmt: skip
def test_check_params(params: dict[str, Any], expected: list[str]) -> None:
    router = HaproxyRouter("lb", "127.0.0.1:9999")
    errors = router.check_params(params)
    assert [error["field"] for error in errors] == expected
    if "stable_server" in params:
        assert errors[1]["message"] == (
            'no longer accepted: name two slots instead, "slots": {"blue": "srv_blue", "green": '
            '"srv_green"}'
        )


def test_socket_must_be_absolute_or_host_port() -> None:
    with pytest.raises(ValueError, match="socket"):
        HaproxyRouter("lb", "relative.sock")
