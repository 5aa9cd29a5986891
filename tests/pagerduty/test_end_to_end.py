"""PagerDuty both ways with the real controller, a real Prometheus and the local Events API:
a breach rolls back and pages; a signed incident for another service rolls that one back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.pagerduty import (
    ROUTING_KEY,
    SECRET,
    deliver,
    incident_event,
    truncate_pagerduty_tables,
)
from tests.support.app import Harness, running_app
from tests.support.metrics_app import MetricsApp
from tests.support.pagerduty_server import EventsApiServer
from tests.support.prometheus import PrometheusServer

WINDOW = "3s"


def error_rate_gate() -> dict[str, Any]:
    requests = 'http_requests_total{service="{service}",version="{canary_version}"%s}'
    errors, total = requests % ',code=~"5.."', requests % ""
    query = f"sum(rate({errors}[{WINDOW}])) / sum(rate({total}[{WINDOW}]))"
    return {"name": "error-rate", "query": query, "op": "<", "threshold": 0.05, "for": "2s"}


def policy(pd_service: str) -> dict[str, Any]:
    return {
        "steps": [{"weight": 10, "wait": "1h"}, {"weight": 100, "wait": "1h"}],
        "interval": "1s",
        "gates": [error_rate_gate()],
        "pagerduty": {"service_ids": [pd_service], "priorities": ["P1"], "urgencies": ["high"],
                      "routing_key": ROUTING_KEY},
    }  # fmt: skip


@pytest.fixture
def events_api(tmp_path: Path) -> Iterator[EventsApiServer]:
    with EventsApiServer(tmp_path) as server:
        yield server


@pytest.fixture
async def live(
    pg_url: str, key_file: Path, prometheus: PrometheusServer, events_api: EventsApiServer
) -> AsyncIterator[Harness]:
    """The app on the system clock: controller, delivery worker, real Prometheus, Events API."""
    await truncate_pagerduty_tables(pg_url)
    async with running_app(
        pg_url,
        key_file,
        real_time=True,
        prometheus_url=prometheus.url,
        pagerduty_events_url=events_api.url,
        pagerduty_ca_file=events_api.ca_file,
        pagerduty_webhook_secrets=SECRET,
        pagerduty_poll_seconds=0.2,
    ) as harness:
        yield harness
    await truncate_pagerduty_tables(pg_url)


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await check():
            return time.monotonic() - started
        await asyncio.sleep(0.2)
    raise AssertionError(f"not within {timeout}s")


async def view(api: Harness, service: str) -> dict[str, Any]:
    return dict((await api.get(f"/canary/{service}")).json())


async def start(api: Harness, service: str, pd_service: str) -> int:
    assert (await api.put(f"/services/{service}", policy(pd_service))).status_code == 200
    started = await api.post("/canary/promote", {"service": service, "version": "v2"})
    assert started.status_code == 200, started.text
    return int(started.json()["id"])


async def test_breach_pages_and_an_incident_rolls_back_another_service(
    live: Harness, metrics_app: MetricsApp, events_api: EventsApiServer
) -> None:
    # given two canaries: pd-failing serving half errors, pd-healthy serving none
    metrics_app.set("pd-failing", "v2", rps=30, error_ratio=0.5)
    metrics_app.set("pd-healthy", "v2", rps=30)
    failing_id = await start(live, "pd-failing", "PFAIL01")
    healthy_id = await start(live, "pd-healthy", "PHLTH02")

    # when the controller sees the error gate breach
    async def paged() -> bool:
        return bool(events_api.accepted())

    await eventually(paged, timeout=30)

    # then pd-failing is rolled back by the controller and PagerDuty got one trigger for it
    failing = await view(live, "pd-failing")
    assert (failing["state"], failing["triggered_by"]) == ("rolled_back", "controller")
    [event] = events_api.accepted()
    assert event["event_action"] == "trigger"
    assert event["dedup_key"] == f"opsapi-rollout-{failing_id}"
    assert event["routing_key"] == ROUTING_KEY
    assert "error-rate" in event["payload"]["summary"]
    assert "pd-failing" in event["payload"]["summary"]
    assert event["payload"]["custom_details"]["rollout"] == "/internal/ops/canary/pd-failing"

    async def delivered() -> bool:
        alerts = (await view(live, "pd-failing"))["alerts"]
        return bool(alerts and alerts[0]["state"] == "delivered")

    await eventually(delivered, timeout=5)
    # and pd-healthy is untouched so far
    assert (await view(live, "pd-healthy"))["state"] in ("progressing", "awaiting_promotion")

    # when a signed incident.triggered (P1) arrives for pd-healthy's PagerDuty service
    document = incident_event(event_id="01E2EINCIDENTFORHEALTHY", service_id="PHLTH02")
    started = time.monotonic()
    response = await deliver(live, document)
    took = time.monotonic() - started

    # then pd-healthy is rolled back by pagerduty, traffic at 0, answered well within 5 s
    assert response.status_code == 200, response.text
    assert took < 5
    [answer] = response.json()["services"]
    # (pull router: the 0 % is published; it is applied when a client fetches it)
    assert (answer["rollout_id"], answer["traffic_at_zero"]) == (healthy_id, False)
    healthy = await live.fetch_weight("pd-healthy")
    assert (healthy["state"], healthy["triggered_by"]) == ("rolled_back", "pagerduty")
    assert healthy["desired_weight"] == healthy["applied_weight"] == 0
    assert healthy["traffic_at_zero"] is True
    assert "#2" in healthy["reason"]
    # and no page for a rollback PagerDuty itself asked for
    await asyncio.sleep(0.5)
    assert len(events_api.accepted()) == 1
    metrics_app.remove("pd-failing", "v2")
    metrics_app.remove("pd-healthy", "v2")
