"""The release checklist's default gates, unmodified, against a real Prometheus.

The metrics app emits only what a real app emits: a canary that never failed has no 5xx series,
no failed-webhook series, no database-error series. Prometheus data is real (scraped every
second, `[5m]` windows over the seconds the app has run); the controller runs one pass at a time
on a hand-moved clock, which is what it judges `for` and step waits with, so `for: 5m` takes no
real time.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from opsapi.canary.policy import CHECKLIST_GATES
from tests.support.app import Harness, running_app
from tests.support.metrics_app import MetricsApp
from tests.support.prometheus import PrometheusServer

GATES = {gate.name: gate for gate in CHECKLIST_GATES}


def checklist_policy(wait: str) -> dict[str, Any]:
    """Short steps, auto_promote, and the checklist's gates exactly as the product defines them."""
    gates = [
        gate.model_dump(mode="json", by_alias=True, exclude_none=True) for gate in GATES.values()
    ]
    return {
        "steps": [{"weight": weight, "wait": wait} for weight in (10, 50, 100)],
        "interval": "1s",
        "auto_promote": True,
        "gates": gates,
    }


@pytest.fixture
async def judged(
    pg_url: str, key_file: Path, prometheus: PrometheusServer
) -> AsyncIterator[Harness]:
    """The app on a manual clock, no background controller, gates measured by real Prometheus."""
    async with running_app(pg_url, key_file, prometheus_url=prometheus.url) as harness:
        yield harness


_names = itertools.count(1)


@pytest.fixture
def canary(metrics_app: MetricsApp) -> Iterator[str]:
    """A service name no other test of the session uses (Prometheus keeps every test's data)."""
    service = f"checklist-{next(_names)}"
    yield service
    metrics_app.remove(service, "v2")


async def start(api: Harness, service: str, *, wait: str) -> None:
    assert (await api.put(f"/services/{service}", checklist_policy(wait))).status_code == 200
    started = await api.post("/canary/promote", {"service": service, "version": "v2"})
    assert started.status_code == 200, started.text


async def view(api: Harness, service: str) -> dict[str, Any]:
    return dict((await api.get(f"/canary/{service}")).json())


async def until_traffic_is_scraped(prometheus: PrometheusServer, service: str) -> None:
    """Wait (real time) until Prometheus has a rate for each metric the checklist reads."""
    selector = f'service="{service}",version="v2"'
    for metric in (
        "http_requests_total",
        "http_request_duration_seconds_count",
        "webhook_signature_verifications_total",
        "db_connection_attempts_total",
    ):
        query = f"sum(rate({metric}{{{selector}}}[5m]))"
        await asyncio.to_thread(prometheus.wait_for, query, lambda v: bool(v), timeout=20)


async def test_a_healthy_canary_passes_every_checklist_gate_and_auto_promotes(
    judged: Harness, metrics_app: MetricsApp, prometheus: PrometheusServer, canary: str
) -> None:
    api = judged
    # given a canary that never fails: it exports no 5xx, webhook-failure or db-error series
    metrics_app.set(canary, "v2", rps=30, latency_seconds=0.05)
    await start(api, canary, wait="1m")
    await until_traffic_is_scraped(prometheus, canary)
    selector = f'service="{canary}",version="v2"'
    for absent in (
        f'http_requests_total{{{selector},code=~"5.."}}',
        f'webhook_signature_verifications_total{{{selector},result="fail"}}',
        f'db_connection_attempts_total{{{selector},result="error"}}',
    ):
        assert prometheus.query(absent) == [], absent

    # when the controller runs a pass after each step's wait
    for _ in range(8):
        api.clock.advance(minutes=1)
        await api.tick()
        if (await view(api, canary))["state"] == "succeeded":
            break

    # then it climbed every step by itself and succeeded
    rollout = await view(api, canary)
    assert rollout["state"] == "succeeded", rollout
    promoted = await api.audit_events(service=canary, action="rollout.promoted")
    assert [event.details["to_weight"] for event in promoted] == [50, 100]
    assert {event.details["triggered_by"] for event in promoted} == {"controller"}
    # and every checklist gate passed on a measured value at every pass, never on "no data":
    # the missing error series read as 0, the missing failure series as 0
    evaluations = (await api.get(f"/rollouts/{rollout['id']}/evaluations?limit=1000")).json()
    items = evaluations["items"]
    assert {item["gate"] for item in items} == set(GATES)
    assert {item["weight"] for item in items} == {10, 50, 100}
    assert [item for item in items if item["phase"] != "pass"] == []
    by_gate: dict[str, set[float]] = {}
    for item in items:
        by_gate.setdefault(item["gate"], set()).add(item["value"])
    assert by_gate["error-rate"] == {0.0}
    assert by_gate["db-connection-failures"] == {0.0}
    assert by_gate["success-rate"] == {1.0}
    assert by_gate["webhook-signature-verification"] == {1.0}
    assert all(0 < value <= 0.05 for value in by_gate["p95-latency"])


# (traffic profile, the checklist gates it must fail with about these values)
UNHEALTHY = [
    pytest.param({"error_ratio": 0.2}, {"error-rate": 0.2, "success-rate": 0.8}, id="errors-20"),
    # No 2xx series at all: success-rate is 0 and fails, it is not "no data".
    pytest.param({"error_ratio": 1.0}, {"error-rate": 1.0, "success-rate": 0.0}, id="only-errors"),
    # No result="ok" series at all: 0, which fails rather than passing on no data.
    pytest.param(
        {"webhook_fail_ratio": 1.0}, {"webhook-signature-verification": 0.0}, id="webhooks-fail"
    ),
    pytest.param({"db_fail_ratio": 0.2}, {"db-connection-failures": 0.2}, id="db-failures"),
]


async def until_failing(api: Harness, service: str, failing: dict[str, float]) -> dict[str, Any]:
    """Controller passes a (clock) second apart until the rollout shows `failing`'s gates failing
    with about those values; the rollout view then. Real time runs while Prometheus scrapes."""
    for _ in range(80):
        api.clock.advance(seconds=1)
        await api.tick()
        rollout = await view(api, service)
        gates = {gate["name"]: gate for gate in rollout["gates"]}
        if all(
            gates[name]["phase"] == "fail" and abs(gates[name]["value"] - want) <= 0.1
            for name, want in failing.items()
        ):
            return rollout
        await asyncio.sleep(0.25)
    raise AssertionError(f"the gates never showed {failing}: {rollout['gates']}")


@pytest.mark.parametrize(("profile", "failing"), UNHEALTHY)
async def test_an_unhealthy_canary_is_rolled_back_once_a_checklist_gate_fails_for_its_for(
    judged: Harness,
    metrics_app: MetricsApp,
    canary: str,
    profile: dict[str, float],
    failing: dict[str, float],
) -> None:
    api = judged
    # given a canary at 10 % whose checklist gates fail (seen by the controller's passes)
    metrics_app.set(canary, "v2", rps=30, latency_seconds=0.05, **profile)
    await start(api, canary, wait="30m")
    rollout = await until_failing(api, canary, failing)
    breach_at = min(
        datetime.fromisoformat(gate["failing_since"]) + GATES[gate["name"]].for_
        for gate in rollout["gates"]
        if gate["name"] in failing
    )

    # when the controller judges it a second before the first gate has failed for its `for`
    api.clock.advance(seconds=(breach_at - api.clock.now).total_seconds() - 1)
    await api.tick()

    # then nothing is rolled back yet
    rollout = await view(api, canary)
    assert (rollout["state"], rollout["desired_weight"]) == ("progressing", 10)
    assert await api.audit_events(service=canary, action="rollout.rolled_back") == []

    # when the failure has lasted `for`
    api.clock.advance(seconds=1)
    await api.tick()

    # then the controller rolled it back, naming a failing checklist gate
    rollout = await view(api, canary)
    assert rollout["state"] == "rolled_back", rollout
    assert rollout["desired_weight"] == 0
    assert rollout["triggered_by"] == "controller"
    [event] = await api.audit_events(service=canary, action="rollout.rolled_back")
    assert event.details["breach"]["gate"] in failing
    assert event.details["breach"]["gate"] in rollout["reason"]
