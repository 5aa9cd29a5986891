"""The controller against a real Prometheus scraping a real metrics app, in real time.

Every test owns its service name, so they share one Prometheus and one metrics app. Waits are
seconds long and gate windows short (`[3s]`), so each test takes seconds, not minutes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.app import Harness, running_app
from tests.support.metrics_app import MetricsApp
from tests.support.prometheus import PrometheusServer, running_prometheus

WINDOW = "3s"


def error_rate_gate(**overrides: Any) -> dict[str, Any]:
    requests = 'http_requests_total{service="{service}",version="{canary_version}"%s}'
    errors = requests % ',code=~"5.."'
    total = requests % ""
    # A healthy canary has no 5xx series at all: its error share is 0, not missing.
    query = f"(sum(rate({errors}[{WINDOW}])) or vector(0)) / sum(rate({total}[{WINDOW}]))"
    gate = {"name": "error-rate", "query": query, "op": "<", "threshold": 0.05, "for": "2s"}
    return {**gate, **overrides}


def latency_gate(**overrides: Any) -> dict[str, Any]:
    query = (
        "histogram_quantile(0.95, sum by (le) (rate(http_request_duration_seconds_bucket"
        f'{{service="{{service}}",version="{{canary_version}}"}}[{WINDOW}])))'
    )
    gate = {"name": "p95-latency", "query": query, "op": "<", "threshold": 1.0, "for": "2s"}
    return {**gate, **overrides}


def policy(*, wait: str = "2s", auto_promote: bool = True, **extra: Any) -> dict[str, Any]:
    steps = [{"weight": w, "wait": wait} for w in (10, 25, 50, 75)]
    return {
        "steps": [*steps, {"weight": 100, "wait": wait}],
        "interval": "1s",
        "auto_promote": auto_promote,
        "gates": [error_rate_gate(), latency_gate()],
        **extra,
    }


@pytest.fixture
async def live(pg_url: str, key_file: Path, prometheus: PrometheusServer) -> AsyncIterator[Harness]:
    """The app on the system clock with its controller, gates measured by the real Prometheus."""
    async with running_app(
        pg_url, key_file, real_time=True, prometheus_url=prometheus.url
    ) as harness:
        yield harness


async def eventually(
    check: Callable[[], Awaitable[bool]], *, timeout: float, interval: float = 0.2
) -> float:
    """Wait until `check()` holds; return the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await check():
            return time.monotonic() - started
        await asyncio.sleep(interval)
    raise AssertionError(f"not within {timeout}s")


async def rollout(api: Harness, service: str) -> dict[str, Any]:
    return dict((await api.get(f"/canary/{service}")).json())


async def in_state(api: Harness, service: str, state: str) -> bool:
    return (await rollout(api, service))["state"] == state


async def start(api: Harness, service: str, body: dict[str, Any], version: str = "v2") -> int:
    assert (await api.put(f"/services/{service}", body)).status_code == 200
    started = await api.post("/canary/promote", {"service": service, "version": version})
    assert started.status_code == 200, started.text
    return int(started.json()["id"])


async def test_healthy_canary_is_promoted_through_every_step_and_succeeds(
    live: Harness, metrics_app: MetricsApp
) -> None:
    # given a healthy canary and a policy with 2 s waits and auto_promote
    metrics_app.set("healthy", "v2", rps=30, error_ratio=0.0, latency_seconds=0.05)
    rollout_id = await start(live, "healthy", policy())

    # when the controller runs
    await eventually(lambda: in_state(live, "healthy", "succeeded"), timeout=45)

    # then it climbed every step once, by itself, and recorded its evaluations
    promoted = await live.audit_events(service="healthy", action="rollout.promoted")
    assert [e.details["to_weight"] for e in promoted] == [25, 50, 75, 100]
    assert {e.details["triggered_by"] for e in promoted} == {"controller"}
    assert len(await live.audit_events(service="healthy", action="rollout.succeeded")) == 1
    evaluations = (await live.get(f"/rollouts/{rollout_id}/evaluations?limit=1000")).json()
    assert {item["gate"] for item in evaluations["items"]} == {"error-rate", "p95-latency"}
    assert {item["weight"] for item in evaluations["items"]} >= {10, 25, 50, 75, 100}
    assert all(item["phase"] in ("pass", "no_data") for item in evaluations["items"])
    assert (await rollout(live, "healthy"))["stable_version"] == "v2"
    # and the product's own metrics count it
    metrics = (await live.client.get("/metrics")).text
    assert 'opsapi_gate_evaluations_total{phase="pass"}' in metrics
    assert (
        'opsapi_rollout_transitions_total{transition="rollout.promoted",triggered_by="controller"}'
        in metrics
    )
    assert "opsapi_gate_evaluation_duration_seconds_count" in metrics
    assert "opsapi_controller_tick_lag_seconds" in metrics


async def test_errors_at_25_roll_back_within_for_plus_two_intervals(
    live: Harness, metrics_app: MetricsApp
) -> None:
    # given a canary promoted by hand to 25 %
    metrics_app.set("errors", "v2", rps=30)
    await start(live, "errors", policy(auto_promote=False))
    await eventually(lambda: in_state(live, "errors", "awaiting_promotion"), timeout=20)
    assert (await live.post("/canary/promote", {"service": "errors"})).status_code == 200

    # when it starts failing half its requests
    metrics_app.set("errors", "v2", rps=30, error_ratio=0.5)
    took = await eventually(lambda: in_state(live, "errors", "rolled_back"), timeout=20)

    # then the controller rolled it back within `for` (2 s) + 2 intervals (2 s), allowing 2 s
    # for the 1 s scrape and the rate window to show the errors
    assert took <= 2 + 2 + 2
    view = await live.fetch_weight("errors")
    assert view["desired_weight"] == view["applied_weight"] == 0
    assert view["triggered_by"] == "controller"
    assert "error-rate" in view["reason"]
    assert "0.05" in view["reason"]
    [event] = await live.audit_events(service="errors", action="rollout.rolled_back")
    assert event.source == "controller"
    assert event.details["triggered_by"] == "controller"
    assert event.details["from_weight"] == 25
    assert event.details["breach"]["gate"] == "error-rate"
    assert event.details["breach"]["value"] >= 0.05


async def test_a_blip_shorter_than_for_blocks_readiness_but_does_not_roll_back(
    live: Harness, metrics_app: MetricsApp
) -> None:
    # given a rollout whose error gate must fail 10 s before it breaches
    metrics_app.set("blip", "v2", rps=30)
    body = policy(wait="1s", auto_promote=False, gates=[error_rate_gate(**{"for": "10s"})])
    await start(live, "blip", body)
    await eventually(lambda: in_state(live, "blip", "awaiting_promotion"), timeout=20)

    # when errors appear for 2.5 s (a first error creates the 5xx series, and rate() sees only
    # increases between two scrapes of it: the blip spans at least two 1 s scrapes; the gate then
    # fails for about the blip plus the 3 s window, well short of 10 s)
    metrics_app.set("blip", "v2", rps=30, error_ratio=0.6)
    await asyncio.sleep(2.5)
    metrics_app.set("blip", "v2", rps=30, error_ratio=0.0)

    # then readiness is lost while the gate fails, and a promote is refused naming the gate
    async def failing() -> bool:
        return bool((await rollout(live, "blip"))["gates"][0]["phase"] == "fail")

    await eventually(failing, timeout=10)
    view = await rollout(live, "blip")
    assert view["ready"] is False
    assert view["blocked_by"] == ["error-rate"]
    refused = await live.post("/canary/promote", {"service": "blip"})
    assert refused.status_code == 409
    assert refused.json()["failing_gates"] == ["error-rate"]

    # and once it passes again the step is ready, and nothing was rolled back
    await eventually(lambda: in_state(live, "blip", "awaiting_promotion"), timeout=20)
    assert (await rollout(live, "blip"))["desired_weight"] == 10
    assert await live.audit_events(service="blip", action="rollout.rolled_back") == []


async def test_min_sample_not_met_never_promotes(live: Harness, metrics_app: MetricsApp) -> None:
    # given a quiet canary and a guard asking for far more requests than it serves
    metrics_app.set("quiet", "v2", rps=2)
    guard = {
        "query": 'sum(increase(http_requests_total{service="{service}",'
        'version="{canary_version}"}[10s]))',
        "min": 1_000_000,
    }
    await start(live, "quiet", policy(wait="1s", min_sample=guard))

    # when its waits are long over
    await asyncio.sleep(6)

    # then it is still at 10 %, every gate says why
    view = await rollout(live, "quiet")
    assert view["state"] == "progressing"
    assert view["desired_weight"] == 10
    assert {gate["phase"] for gate in view["gates"]} == {"no_data"}
    assert all("sample too small" in gate["detail"] for gate in view["gates"])
    assert await live.audit_events(service="quiet", action="rollout.promoted") == []


async def test_baseline_gate_rolls_back_a_canary_slower_than_stable(
    live: Harness, metrics_app: MetricsApp
) -> None:
    # given v1 is the stable version (a first rollout without gates that succeeded)
    one_step = {"steps": [{"weight": 100, "wait": "1s"}], "interval": "1s", "gates": []}
    await start(live, "baseline", one_step, version="v1")
    await eventually(lambda: in_state(live, "baseline", "succeeded"), timeout=15)
    metrics_app.set("baseline", "v1", rps=30, latency_seconds=0.1)
    metrics_app.set("baseline", "v2", rps=30, latency_seconds=0.5)

    # when v2 starts with a gate "canary p99 below 1.2 x stable"
    p99 = (
        "histogram_quantile(0.99, sum by (le) (rate(http_request_duration_seconds_bucket"
        '{service="{service}",version="{%s}"}[' + WINDOW + "])))"
    )
    gate = {
        "name": "p99-vs-stable",
        "query": p99 % "canary_version",
        "baseline_query": p99 % "stable_version",
        "op": "<",
        "threshold": 1.2,
        "for": "2s",
    }
    await start(live, "baseline", policy(wait="30s", gates=[gate]))

    # then it is rolled back, the reason naming the gate
    await eventually(lambda: in_state(live, "baseline", "rolled_back"), timeout=20)
    view = await rollout(live, "baseline")
    assert view["stable_version"] == "v1"
    assert "p99-vs-stable" in view["reason"]


async def test_prometheus_down_holds_then_continues(
    pg_url: str, key_file: Path, metrics_app: MetricsApp, tmp_path: Path
) -> None:
    metrics_app.set("blind", "v2", rps=30)
    with running_prometheus([metrics_app.target], tmp_path) as prometheus:
        async with running_app(
            pg_url, key_file, real_time=True, prometheus_url=prometheus.url,
            prometheus_timeout_seconds=0.5,
        ) as api:  # fmt: skip
            # given a rollout at 10 % with gates, waits of 1 s
            await start(api, "blind", policy(wait="1s"))

            # when Prometheus stops
            prometheus.stop()
            await asyncio.sleep(6)

            # then nothing is promoted, nothing is rolled back, and the view says why
            view = await rollout(api, "blind")
            assert view["state"] == "progressing"
            assert view["desired_weight"] == 10
            assert {gate["phase"] for gate in view["gates"]} == {"no_data"}
            assert all("prometheus" in gate["detail"] for gate in view["gates"])
            assert await api.audit_events(service="blind", action="rollout.rolled_back") == []

            # and when it is back the rollout continues
            prometheus.start()
            prometheus.wait_ready()

            async def past_10() -> bool:
                return int((await rollout(api, "blind"))["desired_weight"]) > 10

            await eventually(past_10, timeout=30)
