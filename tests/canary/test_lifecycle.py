"""The life of a service through consecutive releases, on real routers carrying real traffic.

Each slot is a real backend answering `<slot> <version>`; a release deploys its version into the
slot the API names, as a deploy pipeline would. Given v1 stable in blue: v2 runs in green through
every step to success; v3 goes to blue (the other slot), is rolled back, is released again to
success, and is reverted — and at every point the measured traffic goes where the API says.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.app import Harness, running_app
from tests.support.databases import unavailable
from tests.support.proxies import find_binary, running_nginx, split
from tests.support.slots import SlotBackend, running_slot_haproxy, slot_backends, slot_shares

SERVICE = "checkout"
STEPS = [10, 25, 50, 75, 100]


def _binary(name: str) -> str:
    binary = find_binary(name)
    if binary is None:
        unavailable(name)
        raise AssertionError("unreachable")
    return binary


@dataclass
class Edge:
    """A real router in front of two slot backends, and the policy naming it."""

    port: int
    instance: dict[str, Any]
    router: dict[str, Any]
    slots: dict[str, SlotBackend]


@pytest.fixture(params=["nginx", "haproxy"])
def edge(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Edge]:
    # v1 runs in blue before opsapi knows the service; green is empty until a release uses it.
    with slot_backends(blue="v1", green="(empty)") as slots:
        addresses = {slot: backend.address for slot, backend in slots.items()}
        if request.param == "nginx":
            with running_nginx(_binary("nginx"), tmp_path / "nginx") as nginx:
                instance = {
                    "type": "nginx", "conf": str(nginx.conf), "prefix": str(nginx.directory),
                    "upstreams_dir": str(nginx.upstreams_dir), "binary": nginx.binary,
                    "probe": nginx.probe,
                }  # fmt: skip
                router = {"name": "edge", "upstream": SERVICE, "slots": addresses}
                yield Edge(nginx.port, instance, router, slots)
        else:
            with running_slot_haproxy(_binary("haproxy"), addresses) as haproxy:
                instance = {"type": "haproxy", "socket": haproxy.socket}
                servers = {slot: f"srv_{slot}" for slot in slots}
                router = {"name": "edge", "backend": SERVICE, "slots": servers}
                yield Edge(haproxy.port, instance, router, slots)


@pytest.fixture
async def api(pg_url: str, key_file: Path, tmp_path: Path, edge: Edge) -> AsyncIterator[Harness]:
    routers_file = tmp_path / "routers.json"
    routers_file.write_text(json.dumps({"edge": edge.instance}))
    # A hand-moved clock for the waits; routers, database and traffic are real.
    async with running_app(pg_url, key_file, routers_file=routers_file) as harness:
        policy = {
            "steps": [{"weight": weight, "wait": "1m"} for weight in STEPS],
            "router": edge.router,
        }
        assert (await harness.put(f"/services/{SERVICE}", policy)).status_code == 200
        yield harness


async def traffic(edge: Edge, requests: int = 200) -> Counter[str]:
    return await asyncio.to_thread(split, edge.port, requests)


async def deploy_next_release(api: Harness, edge: Edge, version: str) -> str:
    """What a deploy pipeline does before promote: deploy into the slot that is not stable."""
    status = (await api.get(f"/services/{SERVICE}")).json()["status"]
    [slot] = [name for name in status["targets"] if name != status["stable_slot"]]
    edge.slots[slot].deploy(version)
    return slot


async def promote(api: Harness, **body: Any) -> dict[str, Any]:
    api.clock.advance(minutes=1)  # each step's wait is over
    response = await api.post("/canary/promote", {"service": SERVICE, **body})
    assert response.status_code == 200, response.text
    return dict(response.json())


async def release_to_success(
    api: Harness, edge: Edge, version: str, *, stable: str, measure: bool
) -> dict[str, Any]:
    """Start `version`, promote it through every step (measuring each split), to success."""
    slot = await deploy_next_release(api, edge, version)
    start: dict[str, Any] = {"version": version}
    if stable == "v1":
        start["stable_version"] = "v1"
    rollout = await promote(api, **start)
    assert (rollout["canary_slot"], rollout["canary_version"]) == (slot, version)
    assert rollout["stable_version"] == stable
    for weight in STEPS:
        assert rollout["desired_weight"] == rollout["applied_weight"] == weight, rollout
        if measure and weight < 100:
            answers = await traffic(edge)
            assert set(answers) <= {f"{slot} {version}", f"{rollout['stable_slot']} {stable}"}
            assert abs(slot_shares(answers).get(slot, 0) - weight) <= 8, (weight, answers)
        rollout = await promote(api, from_percent=weight)
    assert rollout["state"] == "succeeded", rollout
    return rollout


async def test_three_releases_rollback_and_revert(api: Harness, edge: Edge) -> None:
    # Given v1 stable in blue, when v2 is released through every step to success,
    done = await release_to_success(api, edge, "v2", stable="v1", measure=True)

    # then green serves v2 as the stable version, and v1 in blue is what a revert goes back to.
    assert (done["stable_version"], done["stable_slot"]) == ("v2", "green")
    assert done["previous"] == {"version": "v1", "slot": "blue"}
    assert done["applied_weight"] == 100
    assert await traffic(edge) == Counter({"green v2": 200})
    service = (await api.get(f"/services/{SERVICE}")).json()["status"]
    assert (service["stable_version"], service["stable_slot"]) == ("v2", "green")

    # When v3 starts, it goes to the other slot, blue (the pipeline redeploys blue as v3),
    slot = await deploy_next_release(api, edge, "v3")
    assert slot == "blue"
    started = await promote(api, version="v3")
    assert (started["canary_slot"], started["stable_slot"]) == ("blue", "green")
    assert started["stable_version"] == "v2"
    # and v1's slot is now taken: there is nothing left to revert to.
    refused = await api.post("/canary/revert", {"service": SERVICE, "reason": "too late"})
    assert (refused.status_code, refused.json()["reason_code"]) == (409, "open_rollout")
    at_25 = await promote(api, from_percent=10)
    answers = await traffic(edge)
    assert set(answers) == {"blue v3", "green v2"}, answers
    assert abs(slot_shares(answers)["blue"] - at_25["applied_weight"]) <= 8

    # When v3 is rolled back, no request reaches v3: all go to v2 in green.
    rolled = await api.post("/canary/rollback", {"service": SERVICE, "reason": "5xx"})
    assert rolled.json()["traffic_at_zero"] is True, rolled.text
    assert await traffic(edge, 500) == Counter({"green v2": 500})
    assert rolled.json()["previous"] is None
    gone = await api.post("/canary/revert", {"service": SERVICE, "reason": "v2 is bad too"})
    assert (gone.status_code, gone.json()["reason_code"]) == (409, "nothing_to_revert")

    # When v3 is released again, in blue, to success,
    again = await release_to_success(api, edge, "v3", stable="v2", measure=False)
    assert (again["stable_version"], again["stable_slot"]) == ("v3", "blue")
    assert again["previous"] == {"version": "v2", "slot": "green"}
    assert await traffic(edge) == Counter({"blue v3": 200})

    # and then reverted, v2 in green serves everything again and is the stable version.
    reverted = await api.post("/canary/revert", {"service": SERVICE, "reason": "v3 leaks"})
    assert reverted.status_code == 200, reverted.text
    view = reverted.json()
    assert (view["state"], view["stable_version"], view["stable_slot"]) == (
        "reverted", "v2", "green",
    )  # fmt: skip
    assert view["traffic_at_zero"] is True
    assert await traffic(edge, 500) == Counter({"green v2": 500})
    service = (await api.get(f"/services/{SERVICE}")).json()["status"]
    assert (service["stable_version"], service["stable_slot"], service["previous"]) == (
        "v2", "green", None,
    )  # fmt: skip
    # and a revert is audited like a rollback, by the person, with the reason.
    [event] = await api.audit_events(action="canary.revert", outcome="success")
    assert event.outcome == "success"
    assert event.details["reason"] == "v3 leaks"
    assert event.details["transition"] == "rollout.reverted"
    assert (event.details["reverted_version"], event.details["stable_version"]) == ("v3", "v2")
