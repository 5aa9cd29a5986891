"""The nginx-lua router against real nginx with the Lua module (2 workers, the snippet `opsapi
nginx-config` prints), in front of real backends: slot `blue` answers "stable", slot `green`
"canary" (the canary's slot). No weight change ever reloads nginx."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from opsapi.cli import main
from opsapi.routers.base import Router, RouterError, RouteTarget
from opsapi.routers.instances import RoutersFileError, load_routers
from opsapi.routers.nginx_lua import Entry, NginxLuaRouter, nginx_config, read_state, verifier
from tests.support.app import Harness, running_app
from tests.support.nginx_lua import (
    SECRET,
    LuaNginx,
    admin_addresses,
    admin_call,
    by_caller,
    lua_nginx_binary,
    make_router,
    running_lua_nginx,
)
from tests.support.proxies import Backends, Background, backends, canary_percent, split
from tests.support.slots import SlotBackend, slot_backends, slot_shares

STEPS = (10, 25, 50, 75, 100)
SPLIT_REQUESTS = 4000  # ±3 points is then ~4 standard deviations at 50 %


@pytest.fixture(scope="module")
def binary() -> str:
    return lua_nginx_binary()


@pytest.fixture(scope="module")
def servers() -> Iterator[Backends]:
    with backends() as running:
        yield running


@dataclass
class Edge:
    """The router `edge` and the nginx instances it drives."""

    router: NginxLuaRouter
    nginx: list[LuaNginx]


@pytest.fixture
def edge(binary: str, tmp_path: Path) -> Iterator[Edge]:
    admins = admin_addresses(1)
    router = make_router(tmp_path / "state", admins)
    with running_lua_nginx(binary, tmp_path / "nginx", router, admins[0]) as nginx:
        yield Edge(router, [nginx])


@pytest.fixture
def pair(binary: str, tmp_path: Path) -> Iterator[Edge]:
    """Two nginx instances behind one router (the first admin is a unix socket)."""
    admins = admin_addresses(2, unix=True)
    router = make_router(tmp_path / "state", admins)
    with (
        running_lua_nginx(binary, tmp_path / "a", router, admins[0]) as first,
        running_lua_nginx(binary, tmp_path / "b", router, admins[1]) as second,
    ):
        yield Edge(router, [first, second])


def target(servers: Backends, **changes: Any) -> RouteTarget:
    chosen = RouteTarget(
        "checkout",
        rollout_id=7,
        params={"upstream": "checkout", "slots": {"blue": servers.stable, "green": servers.canary}},
        canary_slot="green",
        stable_slot="blue",
    )
    return replace(chosen, **changes)


async def measured(nginx: LuaNginx, requests: int = SPLIT_REQUESTS) -> float:
    return canary_percent(await asyncio.to_thread(split, nginx.port, requests))


def no_reload(nginx: LuaNginx) -> None:
    assert "reconfiguring" not in nginx.logs()
    assert "signal process started" not in nginx.logs()


async def test_each_step_splits_traffic_as_applied(edge: Edge, servers: Backends) -> None:
    router: Router = edge.router
    (nginx,) = edge.nginx
    assert await router.read_back(target(servers)) is None
    for step in STEPS:
        await router.apply(target(servers), step)
        assert abs(await measured(nginx) - step) <= 3, step
        assert await router.read_back(target(servers)) == step
    no_reload(nginx)


async def test_rollback_sends_nothing_to_canary_once_apply_returns(
    edge: Edge, servers: Backends
) -> None:
    (nginx,) = edge.nginx
    await edge.router.apply(target(servers), 50)
    with Background(nginx.port) as traffic:
        await asyncio.to_thread(traffic.wait_before, 200)
        await edge.router.apply(target(servers), 0)
        traffic.mark()
        await asyncio.to_thread(traffic.wait_after, 500)
    assert traffic.before["canary"] > 0
    assert traffic.after["canary"] == 0, traffic.after
    assert traffic.after["stable"] >= 500


@pytest.mark.parametrize("how", ["header", "cookie"])
async def test_sticky_callers_keep_their_slot_and_only_move_towards_the_canary(
    edge: Edge, servers: Backends, how: str
) -> None:
    (nginx,) = edge.nginx
    name = "X-User" if how == "header" else "session"
    sticky = target(servers, params={**target(servers).params, "sticky": {how: name}})
    callers = [f"user-{i}" for i in range(200)]

    async def slots_of_callers() -> dict[str, str]:
        answers = await asyncio.to_thread(by_caller, nginx.port, callers, 20, how, name)
        # Each caller always gets the same slot over its 20 requests.
        for caller, counts in answers.items():
            assert len(counts) == 1, (caller, counts)
        return {caller: next(iter(counts)) for caller, counts in answers.items()}

    # Given 25 % to the canary, each caller stays on one slot and about a quarter are on the canary.
    await edge.router.apply(sticky, 25)
    at_25 = await slots_of_callers()
    on_canary = {caller for caller, answer in at_25.items() if answer == "canary"}
    assert 30 <= len(on_canary) <= 70, len(on_canary)

    # When the weight goes to 50 %, callers only move from stable to canary, none back.
    await edge.router.apply(sticky, 50)
    at_50 = await slots_of_callers()
    assert all(at_50[caller] == "canary" for caller in on_canary)
    assert 80 <= sum(answer == "canary" for answer in at_50.values()) <= 120

    # When rolled back, everyone is on the stable slot at once.
    await edge.router.apply(sticky, 0)
    assert set((await slots_of_callers()).values()) == {"stable"}

    # Requests without the header or cookie are split at random.
    await edge.router.apply(sticky, 50)
    assert abs(await measured(nginx) - 50) <= 3


async def test_restart_and_reload_come_back_with_the_state_files_weights(
    edge: Edge, servers: Backends
) -> None:
    router, (nginx,) = edge.router, edge.nginx
    await router.apply(target(servers), 25)

    # nginx stopped and started by someone else: the same weights, without an apply.
    nginx.stop()
    nginx.start()
    assert await router.read_back(target(servers)) == 25
    assert abs(await measured(nginx) - 25) <= 3

    # Rolled back, then reloaded by hand under traffic: no request reaches the canary.
    await router.apply(target(servers), 0)
    with Background(nginx.port) as traffic:
        await asyncio.to_thread(traffic.wait_before, 100)
        nginx.reload()
        await asyncio.sleep(0.5)
        traffic.mark()
        await asyncio.to_thread(traffic.wait_after, 300)
    assert traffic.before["canary"] == traffic.after["canary"] == 0
    assert await router.read_back(target(servers)) == 0

    # Stopped and started again: still nothing to the canary.
    nginx.stop()
    nginx.start()
    assert await asyncio.to_thread(split, nginx.port, 500) == Counter({"stable": 500})

    # An apply while nginx is down fails, but the state file already has the weights: nginx
    # starts with them (they are the desired ones), and the retry confirms them.
    nginx.stop()
    with pytest.raises(RouterError, match=r"live on none; failed on .*\(connection refused\)"):
        await router.apply(target(servers), 75)
    nginx.start()
    assert await router.read_back(target(servers)) == 75
    await router.apply(target(servers), 75)
    assert abs(await measured(nginx) - 75) <= 3


async def test_without_weights_requests_fail_rather_than_reach_a_guessed_slot(
    edge: Edge, servers: Backends
) -> None:
    (nginx,) = edge.nginx
    assert not edge.router.state_file.exists()
    assert await asyncio.to_thread(split, nginx.port, 20) == Counter({"status 500": 20})
    assert await edge.router.read_back(target(servers)) is None
    assert "no weights for upstream checkout: refusing to guess a slot" in nginx.logs()


async def test_admin_refuses_calls_without_the_secret_and_is_not_public(
    edge: Edge, servers: Backends
) -> None:
    router, (nginx,) = edge.router, edge.nginx
    await router.apply(target(servers), 25)
    live = read_state(router.state_file)["checkout"]
    hostile = replace(live, generation=live.generation + 1, slots={
        "blue": (0, servers.stable), "green": (100, servers.canary)})  # fmt: skip
    get = "/opsapi/weights?upstream=checkout"

    for headers in ({}, {"Authorization": "Bearer " + "x" * 40},
                    {"Authorization": f"Bearer {SECRET}x"}, {"Authorization": SECRET},
                    {"Authorization": f"Basic {SECRET}"}):  # fmt: skip
        assert admin_call(nginx.admin, "GET", get, headers=headers) == (401, "unauthorized\n")
        status, _ = admin_call(nginx.admin, "POST", "/opsapi/weights", hostile.line(), headers)
        assert status == 401
    # With the secret, on the public listener: proxied to a backend like any request (which
    # answers a GET with its name and a POST with 501), never to the admin location.
    right = {"Authorization": f"Bearer {SECRET}"}
    public = f"127.0.0.1:{nginx.port}"
    assert admin_call(public, "GET", get, headers=right)[1] in ("stable", "canary")
    assert admin_call(public, "POST", "/opsapi/weights", hostile.line(), right)[0] == 501
    assert await router.read_back(target(servers)) == 25

    # With the secret on the admin address: malformed entries and older generations refused.
    assert admin_call(nginx.admin, "POST", "/opsapi/weights", "upstream=checkout", right)[0] == 400
    older = replace(hostile, generation=live.generation - 1)
    assert admin_call(nginx.admin, "POST", "/opsapi/weights", older.line(), right) == (
        409, live.line() + "\n")  # fmt: skip
    assert await router.read_back(target(servers)) == 25
    assert abs(await measured(nginx, 2000) - 25) <= 3
    assert SECRET not in nginx.logs()


async def test_drift_is_read_back_and_repaired(edge: Edge, servers: Backends) -> None:
    router, (nginx,) = edge.router, edge.nginx
    await router.apply(target(servers), 25)
    live = read_state(router.state_file)["checkout"]
    # Someone sets other weights through the admin location by hand.
    by_hand = replace(live, generation=live.generation + 1, slots={
        "blue": (40, servers.stable), "green": (60, servers.canary)})  # fmt: skip
    right = {"Authorization": f"Bearer {SECRET}"}
    assert admin_call(nginx.admin, "POST", "/opsapi/weights", by_hand.line(), right)[0] == 200
    assert await router.read_back(target(servers)) == 60

    await router.apply(target(servers), 25)
    assert await router.read_back(target(servers)) == 25
    assert abs(await measured(nginx) - 25) <= 3

    # An entry newer than the state file's (set by hand, or a restored state file): the apply
    # goes once more above it rather than being refused.
    ahead = replace(by_hand, generation=live.generation + 10**12)
    assert admin_call(nginx.admin, "POST", "/opsapi/weights", ahead.line(), right)[0] == 200
    await router.apply(target(servers), 10)
    assert await router.read_back(target(servers)) == 10
    assert read_state(router.state_file)["checkout"].generation == ahead.generation + 1


async def test_every_instance_gets_the_weights_and_a_stopped_one_is_named(
    pair: Edge, servers: Backends
) -> None:
    router, (first, second) = pair.router, pair.nginx
    await router.apply(target(servers), 25)
    for nginx in pair.nginx:
        assert abs(await measured(nginx, 2000) - 25) <= 4

    # Given the second instance stopped, an apply raises naming it, and the first is live.
    second.stop()
    with pytest.raises(RouterError) as error:
        await router.apply(target(servers), 50)
    assert str(error.value) == (
        f"nginx-lua router 'edge': live on {first.admin}; "
        f"failed on {second.admin} (connection refused)"
    )
    assert abs(await measured(first, 2000) - 50) <= 4
    assert await router.read_back(target(servers)) is None  # one instance down: unknown

    # When it returns, the re-apply (what reconcile does) finishes it.
    second.start()
    await router.apply(target(servers), 50)
    assert await router.read_back(target(servers)) == 50
    for nginx in pair.nginx:
        assert abs(await measured(nginx, 2000) - 50) <= 4

    # Instances that disagree read back as unknown.
    live = read_state(router.state_file)["checkout"]
    other = replace(live, generation=live.generation + 1, slots={
        "blue": (90, servers.stable), "green": (10, servers.canary)})  # fmt: skip
    right = {"Authorization": f"Bearer {SECRET}"}
    assert admin_call(second.admin, "POST", "/opsapi/weights", other.line(), right)[0] == 200
    assert await router.read_back(target(servers)) is None
    assert await router.health() == f"nginx-lua admin {first.admin}, {second.admin} answers"


async def test_an_expired_lease_sends_everything_to_the_stable_slot(
    edge: Edge, servers: Backends
) -> None:
    (nginx,) = edge.nginx
    leased = target(servers, valid_until=time.time() + 2)
    await edge.router.apply(leased, 50)
    assert await edge.router.read_back(leased) == 50
    assert (await asyncio.to_thread(split, nginx.port, 100))["canary"] > 0

    await asyncio.sleep(max(0.0, leased.valid_until - time.time()) + 0.1)  # type: ignore[operator]

    assert await asyncio.to_thread(split, nginx.port, 300) == Counter({"stable": 300})
    assert await edge.router.read_back(leased) == 0
    # A renewal brings the canary back.
    await edge.router.apply(replace(leased, valid_until=time.time() + 60), 50)
    assert (await asyncio.to_thread(split, nginx.port, 200))["canary"] > 0


def release(
    slots: dict[str, SlotBackend], canary: str, stable: str, versions: tuple[str, str]
) -> RouteTarget:
    """The target of a rollout with its canary in `canary`; versions (stable, canary)."""
    return RouteTarget(
        "checkout",
        rollout_id=1,
        params={"upstream": "checkout", "slots": {n: b.address for n, b in slots.items()}},
        canary_slot=canary,
        stable_slot=stable,
        stable_version=versions[0],
        canary_version=versions[1],
    )


async def shares(port: int, requests: int) -> dict[str, float]:
    return slot_shares(await asyncio.to_thread(split, port, requests))


async def test_consecutive_releases_alternate_slots(edge: Edge) -> None:
    router, (nginx,) = edge.router, edge.nginx
    with slot_backends(blue="v1", green="v2") as slots:
        # Given v1 stable in blue, when v2's canary in green gets 25 %,
        first = release(slots, canary="green", stable="blue", versions=("v1", "v2"))
        await router.apply(first, 25)
        # then a quarter of real requests reach green.
        measured = await shares(nginx.port, 2000)
        assert abs(measured["green"] - 25) <= 4, measured
        assert await router.read_back(first) == 25

        # When v2 reaches 100 % and succeeds (green becomes the stable slot),
        await router.apply(first, 100)
        assert await shares(nginx.port, 400) == {"green": 100}
        succeeded = replace(first, stable_slot="green")
        await router.apply(succeeded, 100)
        assert await shares(nginx.port, 400) == {"green": 100}
        assert await router.read_back(succeeded) == 100
        assert read_state(router.state_file)["checkout"].stable == "green"

        # then the second release deploys v3 into the other slot, blue, and gets 50 %:
        slots["blue"].deploy("v3")
        second = release(slots, canary="blue", stable="green", versions=("v2", "v3"))
        await router.apply(second, 50)
        answers = await asyncio.to_thread(split, nginx.port, 2000)
        assert set(answers) == {"blue v3", "green v2"}, answers
        assert abs(slot_shares(answers)["blue"] - 50) <= 4, answers
        assert await router.read_back(second) == 50

        # When v3 is rolled back, no request reaches blue: all go to v2 in green.
        await router.apply(second, 0)
        assert await asyncio.to_thread(split, nginx.port, 500) == Counter({"green v2": 500})
        assert await router.read_back(second) == 0
    no_reload(nginx)


async def test_invalid_targets_never_reach_nginx(edge: Edge, servers: Backends) -> None:
    router = edge.router
    bad_slots = {"blue": servers.stable, "green": "x; include /etc:1"}
    with pytest.raises(RouterError, match=r"router\.slots\.green") as error:
        await router.apply(target(servers, params={"upstream": "checkout", "slots": bad_slots}), 10)
    assert "include" not in str(error.value)
    with pytest.raises(RouterError, match="canary slot red is not one of the policy's slots"):
        await router.apply(target(servers, canary_slot="red"), 10)
    with pytest.raises(RouterError, match="invalid service name"):
        await router.apply(target(servers, service="../etc"), 10)
    with pytest.raises(RouterError, match="0-100"):
        await router.apply(target(servers), 101)
    with pytest.raises(RouterError, match="invalid lease"):
        await router.apply(target(servers, valid_until=float("nan")), 10)
    assert not router.state_file.exists()


async def test_wrong_secret_is_a_router_error_without_the_secret(
    edge: Edge, servers: Backends, tmp_path: Path
) -> None:
    wrong = "w" * 40
    router = NginxLuaRouter("edge", [edge.nginx[0].admin], wrong, tmp_path / "other.state")
    with pytest.raises(RouterError, match=r"refused the credentials \(401\)") as error:
        await router.apply(target(servers), 10)
    with pytest.raises(RouterError, match="refused the credentials"):
        await router.health()
    with pytest.raises(RouterError, match="refused the credentials"):
        await router.read_back(target(servers))
    assert wrong not in str(error.value)
    assert "nginx-lua admin" in await edge.router.health()


# --- API end to end -------------------------------------------------------------------------


@pytest.fixture
async def routed(
    pg_url: str, key_file: Path, tmp_path: Path, edge: Edge, servers: Backends
) -> AsyncIterator[Harness]:
    """The API with a routers file naming the nginx-lua instance `edge`."""
    routers_file = tmp_path / "routers.json"
    instance = {"type": "nginx-lua", "admin": edge.nginx[0].admin, "secret": SECRET,
                "state_file": str(edge.router.state_file)}  # fmt: skip
    routers_file.write_text(json.dumps({"edge": instance}))
    # On the system clock: nginx compares the weights' lease with its own.
    async with running_app(
        pg_url, key_file, real_time=True, controller_enabled=False, routers_file=routers_file
    ) as api:
        policy = {
            "steps": [{"weight": 25, "wait": "1h"}, {"weight": 100, "wait": "1h"}],
            "interval": "1s",
            "router": {"name": "edge", **target(servers).params, "sticky": {"header": "X-User"}},
        }
        response = await api.put("/services/checkout", policy)
        assert response.status_code == 200, response.text
        yield api


async def test_rollback_through_the_api_answers_once_traffic_is_at_zero(
    routed: Harness, edge: Edge
) -> None:
    (nginx,) = edge.nginx
    # Given a canary at 25 % through the API,
    started = await routed.post("/canary/promote", {"service": "checkout", "version": "v2"})
    assert started.json()["applied_weight"] == 25, started.text
    assert abs(await measured(nginx) - 25) <= 3
    # held under a lease that nginx enforces by itself,
    assert read_state(edge.router.state_file)["checkout"].valid_until > time.time()
    # when an operator rolls back,
    response = await routed.post("/canary/rollback", {"service": "checkout", "reason": "5xx"})
    # then the answer says traffic is at 0, and none of the next 500 requests reach the canary.
    assert response.json()["traffic_at_zero"] is True, response.text
    assert await asyncio.to_thread(split, nginx.port, 500) == Counter({"stable": 500})
    assert read_state(edge.router.state_file)["checkout"].valid_until == 0  # 0 needs no lease


async def test_drift_is_restored_by_reconcile(routed: Harness, edge: Edge) -> None:
    (nginx,) = edge.nginx
    # Given a canary at 25 % through the API, set to 60 % behind opsapi's back,
    await routed.post("/canary/promote", {"service": "checkout", "version": "v2"})
    live = read_state(edge.router.state_file)["checkout"]
    by_hand = replace(live, generation=live.generation + 1, slots={
        "blue": (40, live.slots["blue"][1]), "green": (60, live.slots["green"][1])})  # fmt: skip
    right = {"Authorization": f"Bearer {SECRET}"}
    assert admin_call(nginx.admin, "POST", "/opsapi/weights", by_hand.line(), right)[0] == 200

    # when the drift check is due (every interval: 1 s here),
    await asyncio.sleep(1.1)
    await routed.runtime.traffic.reconcile()

    # then the weights are 25 % again, and the drift is audited.
    assert abs(await measured(nginx) - 25) <= 3
    [drift] = await routed.audit_events(action="router.drift")
    assert (drift.details["live_weight"], drift.details["applied_weight"]) == (60, 25)


async def test_policy_parameters_are_checked(routed: Harness, servers: Backends) -> None:
    policy = {"router": {"name": "edge", "upstream": "checkout",
                         "slots": {"blue": "app.internal:80", "green": servers.canary},
                         "sticky": {"header": "X User"}}}  # fmt: skip
    response = await routed.put("/services/other", policy)
    assert response.status_code == 422
    fields = [error["field"] for error in response.json()["errors"]]
    assert fields == ["router.slots.blue", "router.sticky.header"]
    assert "app.internal" not in response.text


# --- parameters, instances, the snippet -----------------------------------------------------

GOOD = {"upstream": "checkout", "slots": {"blue": "10.0.0.1:8080", "green": "[::1]:8081"}}


def offline_router() -> NginxLuaRouter:
    return NginxLuaRouter("edge", ["127.0.0.1:8098"], SECRET, Path("/var/lib/opsapi/edge.state"))


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (GOOD, []),
        ({**GOOD, "sticky": {"header": "X-User"}}, []),
        ({**GOOD, "sticky": {"cookie": "session_id"}}, []),
        ({}, ["router.upstream", "router.slots"]),
        ({**GOOD, "extra": 1}, ["router.extra"]),
        ({**GOOD, "upstream": "x;}"}, ["router.upstream"]),
        ({**GOOD, "slots": {"blue": "app.internal:80", "green": "10.0.0.2:80"}},
         ["router.slots.blue"]),
        ({**GOOD, "slots": {"blue": "10.0.0.1:80", "green": "10.0.0.1:80"}},
         ["router.slots.green"]),
        ({**GOOD, "slots": {"blue": "10.0.0.1:80;", "green": "10.0.0.2:80"}},
         ["router.slots.blue"]),
        ({**GOOD, "slots": {"blue": "10.0.0.1:80"}}, ["router.slots"]),
        ({**GOOD, "sticky": {"header": "X_User"}}, ["router.sticky.header"]),
        ({**GOOD, "sticky": {"header": "X-User\nServer: evil"}}, ["router.sticky.header"]),
        ({**GOOD, "sticky": {"cookie": "a=b"}}, ["router.sticky.cookie"]),
        ({**GOOD, "sticky": {"query": "user"}}, ["router.sticky"]),
        ({**GOOD, "sticky": {"header": "a", "cookie": "b"}}, ["router.sticky"]),
        ({**GOOD, "sticky": "X-User"}, ["router.sticky"]),
        ({**GOOD, "stable": "10.0.0.1:80"}, ["router.stable"]),
    ],
)  # fmt: skip
def test_check_params(params: dict[str, Any], expected: list[str]) -> None:
    errors = offline_router().check_params(params)
    assert [error["field"] for error in errors] == expected
    shown = " ".join(error["message"] for error in errors)
    assert "app.internal" not in shown
    assert "evil" not in shown


def test_entries_round_trip_through_their_line() -> None:
    entry = Entry("checkout", "checkout", 1732270000123456, "green", "blue",
                  {"blue": (75, "10.0.0.1:8080"), "green": (25, "[::1]:8081")}, 1732270001.5,
                  "header:X-User")  # fmt: skip
    assert Entry.parse(entry.line()) == entry
    assert Entry.parse(entry.line() + " extra=1") is None
    assert Entry.parse(entry.line().replace("generation=", "generation=-")) is None
    assert entry.canary_percent("green", 1732270001.4) == 25
    assert entry.canary_percent("green", 1732270001.5) == 0
    assert entry.canary_percent("blue", 1732270001.5) == 100


INSTANCE = {"type": "nginx-lua", "admin": "127.0.0.1:8098", "secret": SECRET,
            "state_file": "/var/lib/opsapi/edge.state"}  # fmt: skip


def load(tmp_path: Path, instances: dict[str, Any]) -> dict[str, Router]:
    path = tmp_path / "routers.yaml"
    path.write_text(yaml.safe_dump(instances))
    return load_routers(path)


def test_instances_load(tmp_path: Path) -> None:
    routers = load(tmp_path, {
        "edge": INSTANCE,
        "pair": {**INSTANCE, "admin": None, "admins": ["127.0.0.1:8098", "unix:/run/o.sock"],
                 "state_file": "/var/lib/opsapi/pair.state", "timeout": 0.5},
    })  # fmt: skip
    edge, pair = routers["edge"], routers["pair"]
    assert isinstance(edge, NginxLuaRouter)
    assert isinstance(pair, NginxLuaRouter)
    assert edge.admins == ("127.0.0.1:8098",)
    assert (pair.admins, pair.timeout) == (("127.0.0.1:8098", "unix:/run/o.sock"), 0.5)
    assert SECRET not in repr(edge) + str(edge)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"admin": "10.0.0.5:8098"}, "field 'admin': Value error, must be a loopback address"),
        ({"admin": "localhost:8098"}, "field 'admin': Value error, must be a loopback address"),
        ({"admin": "unix:run/x.sock"}, "field 'admin': Value error, must be a loopback address"),
        ({"admins": ["127.0.0.1:1"]}, "give either admin or admins"),
        ({"admin": None}, "give either admin or admins"),
        ({"admin": None, "admins": []}, "field 'admins': List should have at least 1 item"),
        ({"admin": None, "admins": ["127.0.0.1:1", "127.0.0.1:1"]}, "the same address twice"),
        ({"secret": "short"}, "field 'secret': Value error, must be 32 to 4096 visible ASCII"),
        ({"secret": SECRET + " with a space"}, "field 'secret': Value error, must be 32"),
        ({"state_file": "edge.state"}, "field 'state_file': Value error, must be an absolute"),
        ({"statefile": "/x"}, "field 'statefile': Extra inputs are not permitted"),
    ],
)
def test_invalid_instances_are_named_without_their_secret(
    tmp_path: Path, change: dict[str, Any], expected: str
) -> None:
    with pytest.raises(RoutersFileError) as error:
        load(tmp_path, {"edge": {**INSTANCE, **change}})
    assert expected in str(error.value)
    assert SECRET not in str(error.value)
    assert "with a space" not in str(error.value)


def test_two_instances_cannot_share_a_state_file(tmp_path: Path) -> None:
    with pytest.raises(RoutersFileError, match="field 'state_file': already used by instance"):
        load(tmp_path, {"edge": INSTANCE, "edge2": {**INSTANCE, "admin": "127.0.0.1:8097"}})


def test_the_snippet_holds_a_verifier_never_the_secret(tmp_path: Path) -> None:
    snippet = offline_router().nginx_config(["checkout", "payments"])
    assert SECRET not in snippet
    assert verifier("edge", SECRET) in snippet
    assert "listen 127.0.0.1:8098;" in snippet
    assert "lua_shared_dict opsapi_edge 1m;" in snippet
    assert 'opsapi_nginx_lua.balance("checkout")' in snippet
    assert 'opsapi_nginx_lua.balance("payments")' in snippet
    assert "access_log off;" in snippet
    with pytest.raises(ValueError, match="upstream names must match"):
        offline_router().nginx_config(["x; }"])
    pair = NginxLuaRouter("edge", ["127.0.0.1:1", "127.0.0.1:2"], SECRET, tmp_path / "s")
    with pytest.raises(ValueError, match="several admin addresses: name one"):
        pair.nginx_config(["checkout"])
    assert "listen 127.0.0.1:2;" in pair.nginx_config(["checkout"], "127.0.0.1:2")


def test_nginx_config_reads_the_routers_file(tmp_path: Path) -> None:
    path = tmp_path / "routers.json"
    path.write_text(json.dumps({"edge": INSTANCE, "lb": {"type": "haproxy", "socket": "/s"}}))
    assert "upstream checkout {" in nginx_config(path, "edge", ["checkout"])
    with pytest.raises(ValueError, match="router 'lb' is not an nginx-lua instance"):
        nginx_config(path, "lb", ["checkout"])
    with pytest.raises(ValueError, match="OPSAPI_ROUTERS_FILE is not set"):
        nginx_config(None, "edge", ["checkout"])


def test_nginx_config_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "routers.json"
    path.write_text(json.dumps({"edge": INSTANCE}))
    monkeypatch.setenv("OPSAPI_ROUTERS_FILE", str(path))

    assert main(["nginx-config", "--router", "edge", "checkout"]) == 0
    printed = capsys.readouterr()
    assert printed.out == nginx_config(path, "edge", ["checkout"])
    assert SECRET not in printed.out + printed.err

    assert main(["nginx-config", "--router", "nope", "checkout"]) == 2
    assert "router 'nope' is not an nginx-lua instance" in capsys.readouterr().err


async def test_an_nginx_that_lost_its_weights_is_repaired_by_reconcile(
    routed: Harness, edge: Edge, servers: Backends
) -> None:
    (nginx,) = edge.nginx
    # Given a canary at 25 % through the API,
    await routed.post("/canary/promote", {"service": "checkout", "version": "v2"})
    assert abs(await measured(nginx) - 25) <= 3
    # when nginx comes back with no weights at all (its state file lost with it),
    nginx.stop()
    edge.router.state_file.unlink()
    nginx.start()
    assert await edge.router.read_back(target(servers)) is None

    # then the drift check, which cannot read back a weight it should, applies it again.
    await asyncio.sleep(1.1)
    await routed.runtime.traffic.reconcile()
    assert abs(await measured(nginx) - 25) <= 3
