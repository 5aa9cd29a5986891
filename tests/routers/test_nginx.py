"""The nginx router against a real nginx on loopback, in front of real backends: slot `blue` is
the backend answering "stable", slot `green` the one answering "canary" (the canary's slot)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from opsapi.routers.base import Router, RouterError, RouteTarget, is_slot_name, slot_weights
from opsapi.routers.nginx import NginxParams, NginxRouter, file_percent, render, slot_labels
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
from tests.support.slots import SlotBackend, slot_backends, slot_shares

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
        params={"upstream": "checkout", "slots": {"blue": servers.stable, "green": servers.canary}},
        canary_slot="green",
        stable_slot="blue",
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


async def test_consecutive_releases_alternate_slots(nginx: Nginx) -> None:
    router = router_for(nginx)
    path = nginx.upstreams_dir / "checkout.conf"
    with slot_backends(blue="v1", green="v2") as slots:
        # Given v1 stable in blue, when v2's canary in green gets 25 %,
        first = release(slots, canary="green", stable="blue", versions=("v1", "v2"))
        await router.apply(first, 25)
        # then a quarter of real requests reach green.
        measured = await shares(nginx.port, 400)
        assert abs(measured["green"] - 25) <= 7, measured
        assert abs(measured["blue"] - 75) <= 7, measured
        assert await router.read_back(first) == 25
        assert "# slot green: v2 (canary)" in path.read_text()

        # When v2 reaches 100 % and succeeds (green becomes the stable slot),
        await router.apply(first, 100)
        assert await shares(nginx.port, 400) == {"green": 100}
        succeeded = replace(first, stable_slot="green")
        await router.apply(succeeded, 100)
        assert await shares(nginx.port, 400) == {"green": 100}
        assert await router.read_back(succeeded) == 100
        assert "# slot green: v2 (stable)" in path.read_text()

        # then the second release deploys v3 into the other slot, blue, and gets 50 %:
        slots["blue"].deploy("v3")
        second = release(slots, canary="blue", stable="green", versions=("v2", "v3"))
        await router.apply(second, 50)
        answers = await asyncio.to_thread(split, nginx.port, 400)
        assert set(answers) == {"blue v3", "green v2"}, answers
        assert abs(slot_shares(answers)["blue"] - 50) <= 7, answers
        assert await router.read_back(second) == 50
        content = path.read_text()
        assert "# slot blue: v3 (canary)" in content
        assert "# slot green: v2 (stable)" in content

        # When v3 is rolled back, no request reaches blue: all go to v2 in green.
        await router.apply(second, 0)
        assert await asyncio.to_thread(split, nginx.port, 300) == Counter({"green v2": 300})
        assert await router.read_back(second) == 0
        assert f"server {slots['blue'].address} down;" in path.read_text()


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


class LoopHold:
    """The most CPU the event loop's thread spent between two ticks of a task that wakes every
    few milliseconds: how long one callback kept every other request waiting. CPU, not wall
    time, so that another process taking the core does not count."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.thread_time()
        while True:
            await asyncio.sleep(0.002)
            now = time.thread_time()
            self.longest = max(self.longest, now - last)
            last = now

    async def __aenter__(self) -> LoopHold:
        self._task = asyncio.create_task(self._tick())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def test_an_apply_never_holds_the_event_loop(nginx: Nginx, servers: Backends) -> None:
    # Given a router that confirms each apply by probing nginx a few times
    router = router_for(nginx)
    await router.apply(target(servers), 10)
    # When it applies and reads back, with a task watching the event loop
    async with LoopHold() as hold:
        await router.apply(target(servers), 0)
        assert await router.read_back(target(servers)) == 0
    # Then no step kept the loop (the API's other requests, the controller) for more than a
    # few milliseconds of CPU: a probe client loading the CA bundle held it 25-65 ms each time.
    assert hold.longest < 0.012, f"the event loop was held {hold.longest * 1000:.1f} ms"


async def test_a_file_nginx_does_not_run_is_not_read_back(nginx: Nginx, servers: Backends) -> None:
    router = router_for(nginx)
    await router.apply(target(servers), 25)
    path = nginx.upstreams_dir / "checkout.conf"
    # Someone writes another file without reloading: what nginx runs is still 25 % to green.
    params = NginxParams("checkout", target(servers).params["slots"])
    path.write_text(render("edge", "checkout", params, {"blue": 40, "green": 60}, 1, nginx.probe))
    assert await router.read_back(target(servers)) == 25
    assert await router.read_back(replace(target(servers), canary_slot="blue")) == 75
    assert abs(await measured(nginx, 1000) - 25) <= 3


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
        params={
            "upstream": "checkout",
            "slots": {"blue": servers.stable, "green": "x; include /etc:1"},
        },
    )
    with pytest.raises(RouterError, match=r"router\.slots\.green") as error:
        await router.apply(bad, 10)
    assert "include" not in str(error.value)
    with pytest.raises(RouterError, match="canary slot red is not one of the policy's slots"):
        await router.apply(replace(target(servers), canary_slot="red"), 10)
    with pytest.raises(RouterError, match="invalid service name"):
        await router.apply(RouteTarget("../etc", params=target(servers).params), 10)
    with pytest.raises(RouterError, match="0-100"):
        await router.apply(target(servers), 101)
    assert not (nginx.upstreams_dir / "checkout.conf").exists()


GOOD = {"upstream": "checkout_v2", "slots": {"blue": "10.0.0.1:8080", "green": "[::1]:8081"}}
BLUE, GREEN, SLOTS = "router.slots.blue", "router.slots.green", "router.slots"
G = "10.0.0.2:80"  # a good address for green, when blue's is the one tested
SLOT_CASES: list[tuple[str, Any, list[str]]] = [
    ("host names and other slot names", {"a-1": "canary.internal:80", "b_2": "10.0.0.1:80"}, []),
    ("turn-1 names as slot names", {"stable": "10.0.0.1:80", "canary": G}, []),
    ("one slot", {"blue": "10.0.0.1:80"}, [SLOTS]),
    ("three slots", {"a": "10.0.0.1:80", "b": G, "c": "10.0.0.3:80"}, [SLOTS]),
    ("no slots", {}, [SLOTS]),
    ("a list", ["10.0.0.1:80", G], [SLOTS]),
    ("a string", "10.0.0.1:80,10.0.0.2:80", [SLOTS]),
    ("upper-case name", {"Blue": "10.0.0.1:80", "green": G}, [SLOTS]),
    ("name with a space", {"b lue": "10.0.0.1:80", "green": G}, [SLOTS]),
    ("name with a brace", {"b}": "10.0.0.1:80", "green": G}, [SLOTS]),
    ("name too long", {"b" * 33: "10.0.0.1:80", "green": G}, [SLOTS]),
    ("name starting with -", {"-b": "10.0.0.1:80", "green": G}, [SLOTS]),
    ("same address twice", {"blue": "10.0.0.1:80", "green": "10.0.0.1:80"}, [GREEN]),
    ("same host, other case", {"blue": "App.internal:80", "green": "app.INTERNAL:80"}, [GREEN]),
    ("same IPv6, other spelling", {"blue": "[::1]:80", "green": "[0:0::1]:80"}, [GREEN]),
    ("a number", {"blue": 8080, "green": G}, [BLUE]),
    ("null", {"blue": None, "green": G}, [BLUE]),
    ("a nested object", {"blue": {"host": "h"}, "green": G}, [BLUE]),
    ("no port", {"blue": "10.0.0.1", "green": G}, [BLUE]),
    ("injected include", {"blue": "10.0.0.1:80; include /etc/passwd", "green": G}, [BLUE]),
    ("injected directive", {"blue": "10.0.0.1:80\nserver evil:80", "green": G}, [BLUE]),
    ("injected block end", {"blue": "10.0.0.1:80;}", "green": G}, [BLUE]),
    ("server option", {"blue": "10.0.0.1:80 backup", "green": G}, [BLUE]),
    ("nginx variable", {"blue": "$host:80", "green": G}, [BLUE]),
    ("unix socket", {"blue": "unix:/tmp/x.sock", "green": G}, [BLUE]),
    ("a URL", {"blue": "http://h:80", "green": G}, [BLUE]),
    ("port too high", {"blue": "h:123456", "green": G}, [BLUE]),
    ("port 0", {"blue": "h:0", "green": G}, [BLUE]),
    ("bad IPv6", {"blue": "[zz]:80", "green": G}, [BLUE]),
    ("bare IPv6", {"blue": "::1:80", "green": G}, [BLUE]),
    ("host starting with -", {"blue": "-h:80", "green": G}, [BLUE]),
    ("huge host", {"blue": "h" * 300 + ":80", "green": G}, [BLUE]),
    ("both values bad", {"blue": "x y", "green": 1}, [BLUE, GREEN]),
]


def nginx_router() -> NginxRouter:
    return NginxRouter(
        "edge", Path("/etc/nginx/nginx.conf"), Path("/etc/nginx"), Path("/etc/nginx/opsapi"),
        probe="127.0.0.1:8099",
    )  # fmt: skip


@pytest.mark.parametrize(("slots", "expected"), [case[1:] for case in SLOT_CASES],
                         ids=[case[0] for case in SLOT_CASES])  # fmt: skip
def test_check_params_slots(slots: Any, expected: list[str]) -> None:
    errors = nginx_router().check_params({"upstream": "checkout", "slots": slots})
    assert [error["field"] for error in errors] == expected
    # Field errors never echo a value, nor a slot name that is not a valid one.
    shown = " ".join(f"{error['field']} {error['message']}" for error in errors)
    values = list(slots.values()) if isinstance(slots, dict) else [slots]
    names = [name for name in slots if not is_slot_name(name)] if isinstance(slots, dict) else []
    for value in [*values, *names]:
        if value not in (None, 1):  # too short to tell
            assert str(value) not in shown


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (GOOD, []),
        ({}, ["router.upstream", "router.slots"]),
        ({**GOOD, "extra": 1}, ["router.extra"]),
        ({**GOOD, "upstream": "check out"}, ["router.upstream"]),
        ({**GOOD, "upstream": "x" * 65}, ["router.upstream"]),
        ({**GOOD, "upstream": "x;}"}, ["router.upstream"]),
        ({**GOOD, "upstream": 3}, ["router.upstream"]),
        ({**GOOD, "x; include /etc/passwd": 1}, ["router"]),
        # Turn-1 parameters: refused, told to use slots.
        ({"upstream": "checkout", "stable": "10.0.0.1:80", "canary": "10.0.0.2:80"},
         ["router.canary", "router.stable", "router.slots"]),
        ({**GOOD, "stable": "10.0.0.1:80"}, ["router.stable"]),
    ],
)  # fmt: skip
def test_check_params(params: dict[str, Any], expected: list[str]) -> None:
    errors = nginx_router().check_params(params)
    assert [error["field"] for error in errors] == expected
    assert all("x; include" not in error["message"] for error in errors)


def test_turn_one_parameters_are_told_to_use_slots() -> None:
    errors = nginx_router().check_params({"upstream": "u", "stable": "h:1", "canary": "h:2"})
    assert {"field": "router.stable",
            "message": 'no longer accepted: name two slots instead, "slots": {"blue": '
                       '"10.0.0.1:8080", "green": "10.0.0.2:8080"}'} in errors  # fmt: skip
    assert all("h:1" not in error["message"] for error in errors)


def slots_target(
    canary: str, stable: str, versions: tuple[str | None, str | None] = (None, None)
) -> RouteTarget:
    """A target with the canary in `canary` and the stable in `stable`; versions (stable,
    canary)."""
    return RouteTarget(
        "checkout",
        params={"upstream": "checkout", "slots": {"blue": "10.0.0.1:80", "green": "10.0.0.2:80"}},
        canary_slot=canary,
        stable_slot=stable,
        stable_version=versions[0],
        canary_version=versions[1],
    )


PARAMS = NginxParams("checkout", {"blue": "10.0.0.1:80", "green": "10.0.0.2:80"})


def rendered(canary: str, weight: int, stable: str | None = None,
             versions: tuple[str | None, str | None] = (None, None)) -> str:  # fmt: skip
    other = "blue" if canary == "green" else "green"
    chosen = slots_target(canary, stable or other, versions)
    weights = slot_weights(chosen, weight)
    return render("edge", "checkout", PARAMS, weights, 1, "127.0.0.1:8099", slot_labels(chosen))


def test_render_marks_the_idle_slot_down_whichever_slot_runs_the_canary() -> None:
    assert "server 10.0.0.1:80 weight=100;" in rendered("green", 0)
    assert "server 10.0.0.2:80 down;" in rendered("green", 0)
    assert "server 10.0.0.1:80 down;" in rendered("green", 100)
    assert "server 10.0.0.2:80 weight=100;" in rendered("green", 100)
    # The second release: the canary in blue, the stable in green.
    assert "server 10.0.0.1:80 weight=25;" in rendered("blue", 25)
    assert "server 10.0.0.2:80 weight=75;" in rendered("blue", 25)
    assert "server 10.0.0.1:80 down;" in rendered("blue", 0)
    assert "server 10.0.0.2:80 weight=100;" in rendered("blue", 0)
    for weight in range(101):
        for canary in ("blue", "green"):
            content = rendered(canary, weight)
            assert file_percent(content, PARAMS, canary) == weight
            assert file_percent(content, PARAMS, "green" if canary == "blue" else "blue") == (
                100 - weight
            )


def test_render_names_each_slot_and_its_version() -> None:
    canary = rendered("blue", 25, versions=("v2", "v3"))
    assert "    # slot blue: v3 (canary)\n    server 10.0.0.1:80 weight=25;" in canary
    assert "    # slot green: v2 (stable)\n    server 10.0.0.2:80 weight=75;" in canary
    # After a success the canary's slot is the stable one; the other slot is idle.
    succeeded = rendered("blue", 100, stable="blue", versions=("v2", "v3"))
    assert "    # slot blue: v3 (stable)\n    server 10.0.0.1:80 weight=100;" in succeeded
    assert "    # slot green: idle\n    server 10.0.0.2:80 down;" in succeeded
    unknown = rendered("green", 10)
    assert "# slot green: unknown version (canary)" in unknown
    # A version that is not a valid version never reaches the file (it could end the comment).
    hostile = rendered("green", 10, versions=("v1", "v2\n}\nserver { listen 80; }"))
    assert "listen 80" not in hostile
    assert "# slot green: unknown version (canary)" in hostile


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
