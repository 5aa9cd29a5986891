"""`POST /execute`: every operation and every role, parameter validation, dry runs, results."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from opsapi.routers.base import RouteTarget
from opsapi.routers.haproxy import HaproxyRouter
from tests.support.app import Harness, running_app
from tests.support.databases import unavailable
from tests.support.metrics_app import MetricsApp
from tests.support.prometheus import PrometheusServer
from tests.support.proxies import Backends, Haproxy, backends, find_binary, running_haproxy

ROLES = ("viewer", "operator", "admin", "auditor")
PARAMS: dict[str, dict[str, Any]] = {
    "health-check": {},
    "gate-check": {"service": "checkout"},
    "router-sync": {"service": "checkout"},
    "set-weight": {"service": "checkout", "weight": 0, "reason": "incident 42"},
    "pagerduty-test": {"service": "checkout"},
}
# fmt: off
MATRIX = {
    #                viewer operator admin auditor
    "health-check": (200,   200,     200,  200),
    "gate-check":   (403,   200,     200,  403),
    "router-sync":  (403,   200,     200,  403),
    "set-weight":   (403,   403,     200,  403),
    # 404 for an admin: the matrix's service has no routing key (the real send is tested below)
    "pagerduty-test": (403, 403,     404,  403),
}
# fmt: on


async def execute(
    api: Harness, operation: str, params: dict[str, Any], role: str = "admin", dry_run: bool = False
) -> Any:
    body = {"operation": operation, "params": params, "dry_run": dry_run}
    return await api.post("/execute", body, role)


@pytest.mark.parametrize(
    ("operation", "role", "status"),
    [
        pytest.param(op, role, status, id=f"{op} as {role} -> {status}")
        for op, statuses in MATRIX.items()
        for role, status in zip(ROLES, statuses, strict=True)
    ],
)
async def test_every_operation_for_every_role(
    api: Harness, operation: str, role: str, status: int
) -> None:
    await api.post("/canary/promote", {"service": "checkout", "version": "v2"})

    response = await execute(api, operation, PARAMS[operation], role)

    assert response.status_code == status, response.text
    [event] = await api.audit_events(action=f"execute.{operation}")
    assert event.outcome == {200: "success", 403: "denied", 404: "error"}[status]
    assert event.details["params"] == PARAMS[operation]
    if status == 200:
        assert response.json()["operation"] == operation
        assert "result" in event.details
        assert "result" in event.details


async def test_anonymous_is_401(api: Harness) -> None:
    response = await api.client.post("/internal/ops/execute", json={"operation": "health-check"})
    assert response.status_code == 401


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({}, "params.service"),
        ({"service": "Bad_Name"}, "params.service"),
        ({"service": "checkout", "weight": 101, "reason": "x"}, "params.weight"),
        ({"service": "checkout", "weight": 10}, "params.reason"),
        ({"service": "checkout", "weight": 10, "reason": "x", "extra": 1}, "params.extra"),
    ],
)
async def test_parameters_are_validated(api: Harness, params: dict[str, Any], field: str) -> None:
    response = await execute(api, "set-weight", params)
    assert response.status_code == 422
    assert field in [error["field"] for error in response.json()["errors"]]


async def test_unknown_operation_is_404_and_audited(api: Harness) -> None:
    response = await execute(api, "reboot-prod", {})
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert "health-check" in response.json()["detail"]
    [event] = await api.audit_events(action="execute")
    assert event.outcome == "error"


async def test_secrets_in_params_never_reach_the_audit_log(api: Harness) -> None:
    response = await execute(api, "health-check", {"token": "hunter2-secret"})
    assert response.status_code == 422
    assert "hunter2" not in json.dumps([e.details for e in await api.audit_events()])


async def test_set_weight_dry_run_changes_nothing(api: Harness) -> None:
    await api.post("/canary/promote", {"service": "checkout", "version": "v2"})
    before = (await api.get("/canary/checkout")).json()

    response = await execute(
        api, "set-weight", {"service": "checkout", "weight": 0, "reason": "x"}, dry_run=True
    )

    assert response.status_code == 200
    plan = response.json()["result"]
    assert plan["from_weight"] == 10
    assert plan["to_weight"] == 0
    assert plan["pauses_rollout"] is True
    after = (await api.get("/canary/checkout")).json()
    assert {k: v for k, v in after.items() if k not in ("time_left", "waited")} == {
        k: v for k, v in before.items() if k not in ("time_left", "waited")
    }


async def test_set_weight_overrides_and_pauses_the_rollout(api: Harness) -> None:
    await api.post("/canary/promote", {"service": "checkout", "version": "v2"})

    response = await execute(api, "set-weight", {"service": "checkout", "weight": 40,
                                                 "reason": "hold at 40 for the sale"})  # fmt: skip

    assert response.status_code == 200
    assert (await api.get("/canary/checkout/weight")).json()["weight"] == 40
    rollout = await api.fetch_weight("checkout")
    assert rollout["desired_weight"] == rollout["applied_weight"] == 40
    assert rollout["state"] == "paused"
    [event] = await api.audit_events(action="execute.set-weight")
    assert event.details["params"]["reason"] == "hold at 40 for the sale"
    # a rollback still works from the override
    rolled = await api.post("/canary/rollback", {"service": "checkout", "reason": "done"})
    assert (rolled.json()["state"], rolled.json()["desired_weight"]) == ("rolled_back", 0)
    assert (await api.fetch_weight("checkout"))["applied_weight"] == 0


async def test_operations_on_a_service_without_rollout_are_404(api: Harness) -> None:
    for operation in ("gate-check", "router-sync", "set-weight"):
        params = {**PARAMS[operation], "service": "nothing-here"}
        assert (await execute(api, operation, params)).status_code == 404


# With real components ---------------------------------------------------------------------------


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


@pytest.fixture
async def wired(
    pg_url: str, key_file: Path, tmp_path: Path, haproxy: Haproxy, prometheus: PrometheusServer
) -> AsyncIterator[Harness]:
    routers = tmp_path / "routers.json"
    routers.write_text(json.dumps({
        "lb": {"type": "haproxy", "socket": haproxy.socket, "timeout": 1},
        "gone": {"type": "haproxy", "socket": str(tmp_path / "no.sock"), "timeout": 0.5},
    }))  # fmt: skip
    async with running_app(
        pg_url, key_file, real_time=True, controller_enabled=False, routers_file=routers,
        prometheus_url=prometheus.url,
    ) as api:  # fmt: skip
        policy = {
            "steps": [{"weight": 10, "wait": "1h"}, {"weight": 100, "wait": "1h"}],
            "router": {"name": "lb", "backend": "checkout",
                       "slots": {"blue": "stable", "green": "canary"}},
            "gates": [{"name": "traffic", "query": 'sum(rate(http_requests_total{service='
                       '"{service}",version="{canary_version}"}[5s]))', "op": ">", "threshold": 1}],
        }  # fmt: skip
        assert (await api.put("/services/checkout", policy)).status_code == 200
        yield api


async def test_health_check_reports_each_component(wired: Harness) -> None:
    response = await execute(wired, "health-check", {}, "viewer")

    result = response.json()["result"]
    components = result["components"]
    assert components["database"]["status"] == "up"
    assert components["prometheus"]["status"] == "up"
    assert components["router:lb"]["status"] == "up"
    assert "HAProxy" in components["router:lb"]["detail"]
    assert components["router:gone"]["status"] == "down"
    assert result["status"] == "degraded"
    assert result["down"] == ["router:gone"]


async def test_gate_check_measures_now_and_stores_nothing(
    wired: Harness, metrics_app: MetricsApp, prometheus: PrometheusServer
) -> None:
    metrics_app.set("checkout", "v2", rps=20)
    await wired.post("/canary/promote", {"service": "checkout", "version": "v2"})
    prometheus.wait_for(
        'sum(rate(http_requests_total{service="checkout",version="v2"}[5s]))',
        lambda v: v is not None and v > 1, timeout=15,
    )  # fmt: skip
    before = (await wired.get("/canary/checkout")).json()

    response = await execute(wired, "gate-check", {"service": "checkout"}, "operator")

    [gate] = response.json()["result"]["gates"]
    assert gate["phase"] == "pass"
    assert gate["value"] > 1
    assert 'service="checkout"' in gate["query"]
    after = (await wired.get("/canary/checkout")).json()
    assert after["gates"] == before["gates"]
    evaluations = (await wired.get(f"/rollouts/{after['id']}/evaluations")).json()
    assert evaluations["items"] == []


async def test_router_sync_restores_a_drifted_weight(wired: Harness, haproxy: Haproxy) -> None:
    await wired.post("/canary/promote", {"service": "checkout", "version": "v2"})
    slots = {"blue": "stable", "green": "canary"}
    target = RouteTarget("checkout", None, {"backend": "checkout", "slots": slots})
    manual = HaproxyRouter("manual", haproxy.socket)
    await manual.apply(target, 90)

    dry = await execute(wired, "router-sync", {"service": "checkout"}, "operator", dry_run=True)
    assert await manual.read_back(target) == 90  # a dry run changes nothing
    assert "apply 10%" in dry.json()["result"]["would"]

    response = await execute(wired, "router-sync", {"service": "checkout"}, "operator")

    assert response.status_code == 200
    assert response.json()["result"]["applied_weight"] == 10
    assert await manual.read_back(target) == 10


async def test_pagerduty_test_sends_a_trigger_and_its_resolve(
    pg_url: str, key_file: Path, tmp_path: Path
) -> None:
    from tests.support.pagerduty_server import EventsApiServer

    with EventsApiServer(tmp_path) as server:
        async with running_app(
            pg_url, key_file, pagerduty_events_url=server.url, pagerduty_ca_file=server.ca_file
        ) as api:
            key = "R0UT1NGKEY0123456789abcdefabcdef"
            policy = {"pagerduty": {"service_ids": ["PABC123"], "routing_key": key}}
            assert (await api.put("/services/checkout", policy)).status_code == 200

            dry = await execute(api, "pagerduty-test", {"service": "checkout"}, dry_run=True)
            assert server.requests == []
            assert key not in dry.text

            response = await execute(api, "pagerduty-test", {"service": "checkout"})

            result = response.json()["result"]
            assert result["ok"] is True
            assert result["steps"] == {"pagerduty.trigger": "accepted",
                                       "pagerduty.resolve": "accepted"}  # fmt: skip
            [trigger, resolve] = server.accepted()
            assert trigger["event_action"] == "trigger"
            assert resolve["event_action"] == "resolve"
            assert trigger["dedup_key"] == resolve["dedup_key"] == result["dedup_key"]
            assert key not in response.text
            assert key not in json.dumps([e.details for e in await api.audit_events()])
