"""Time to safe, measured for every rollback (DESIGN §12): the instants from the cause to traffic
confirmed at 0 are on the rollout, in its audit log and in a histogram; a rollback whose traffic is
not confirmed within the bound pages.

Real PostgreSQL, a real HAProxy in front of two slot backends, a real Prometheus for the breach.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.app import Harness, running_app
from tests.support.databases import unavailable
from tests.support.metrics_app import MetricsApp
from tests.support.prometheus import PrometheusServer
from tests.support.proxies import Haproxy, find_binary
from tests.support.slots import running_slot_haproxy, slot_backends

ROUTING_KEY = "R0UT1NGKEYsafe0123456789abcdef42"
ERRORS = (
    '(sum(rate(http_requests_total{service="{service}",version="{canary_version}",code=~"5.."}'
    '[3s])) or vector(0)) / sum(rate(http_requests_total{service="{service}",'
    'version="{canary_version}"}[3s]))'
)


@pytest.fixture
def haproxy() -> Iterator[Haproxy]:
    binary = find_binary("haproxy")
    if binary is None:
        unavailable("haproxy")
        raise AssertionError("unreachable")
    with slot_backends(blue="v1", green="v2") as slots:
        addresses = {slot: backend.address for slot, backend in slots.items()}
        with running_slot_haproxy(binary, addresses) as running:
            yield running


@pytest.fixture
async def api(
    pg_url: str, key_file: Path, tmp_path: Path, haproxy: Haproxy, prometheus: PrometheusServer
) -> AsyncIterator[Harness]:
    routers = tmp_path / "routers.json"
    routers.write_text(json.dumps({"lb": {"type": "haproxy", "socket": haproxy.socket,
                                          "timeout": 1}}))  # fmt: skip
    async with running_app(
        pg_url, key_file, routers_file=routers, prometheus_url=prometheus.url,
        pagerduty_worker_enabled=False,
    ) as harness:  # fmt: skip
        yield harness


def policy(**extra: Any) -> dict[str, Any]:
    return {
        "steps": [{"weight": 25, "wait": "1m"}, {"weight": 100, "wait": "1m"}],
        "interval": "1s",
        "router": {"name": "lb", "backend": "checkout",
                   "slots": {"blue": "srv_blue", "green": "srv_green"}},
        "pagerduty": {"service_ids": [], "routing_key": ROUTING_KEY},
        **extra,
    }  # fmt: skip


def histogram_count(text: str, trigger: str) -> float:
    for family in text_string_to_metric_families(text):
        if family.name == "opsapi_rollback_time_to_safe_seconds":
            return sum(s.value for s in family.samples if s.name.endswith("_count")
                       and s.labels == {"trigger": trigger, "router": "lb"})  # fmt: skip
    return 0.0


def instants(view: dict[str, Any]) -> list[datetime]:
    safe = view["time_to_safe"]
    names = ("detected_at", "decided_at", "committed_at", "applied_at", "confirmed_at")
    return [datetime.fromisoformat(safe[name]) for name in names]


async def test_every_rollback_records_its_time_to_safe(
    api: Harness, metrics_app: MetricsApp, prometheus: PrometheusServer
) -> None:
    gate = {"name": "errors", "query": ERRORS, "op": "<", "threshold": 0.05}
    assert (await api.put("/services/breached", policy(gates=[gate]))).is_success
    assert (await api.put("/services/manual", policy(gates=[]))).is_success

    # given a canary whose errors breach its gate, rolled back by the controller
    metrics_app.set("breached", "v2", rps=40, error_ratio=0.5)
    assert (await api.post("/canary/promote", {"service": "breached", "version": "v2"})).is_success
    prometheus.wait_for(
        ERRORS.replace("{service}", "breached").replace("{canary_version}", "v2"),
        lambda value: value is not None and value > 0.2, timeout=20,
    )  # fmt: skip
    api.clock.advance(seconds=2)
    await api.tick()
    metrics_app.remove("breached", "v2")
    # and a canary rolled back by a person
    assert (await api.post("/canary/promote", {"service": "manual", "version": "v2"})).is_success
    rolled = await api.post("/canary/rollback", {"service": "manual", "reason": "latency"})

    # then each rollback's instants are present and ordered: seen ≤ decided ≤ applied = confirmed
    for service, trigger in (("breached", "controller"), ("manual", "user")):
        view = (await api.get(f"/canary/{service}")).json()
        assert view["state"] == "rolled_back"
        seen, decided, committed, applied, confirmed = instants(view)
        assert seen <= decided <= committed <= applied == confirmed
        safe = view["time_to_safe"]
        assert (safe["trigger"], safe["router"]) == (trigger, "lb")
        assert safe["seconds"] == (confirmed - seen).total_seconds()
        [event] = await api.audit_events(action="rollout.safe", service=service)
        assert event.details["confirmed_at"] == safe["confirmed_at"]
    assert rolled.json()["time_to_safe"]["confirmed_at"] is not None
    # and the histogram counted both, by trigger and router
    metrics = (await api.client.get("/metrics")).text
    assert histogram_count(metrics, "controller") == 1
    assert histogram_count(metrics, "user") == 1


async def test_a_rollback_never_confirmed_pages_after_the_bound(
    api: Harness, haproxy: Haproxy
) -> None:
    assert (await api.put("/services/stuck", policy(gates=[]))).is_success
    assert (await api.post("/canary/promote", {"service": "stuck", "version": "v2"})).is_success
    # given a router that stops answering
    haproxy.stop()

    # when the canary is rolled back, the answer says traffic is not yet at 0
    rolled = await api.post("/canary/rollback", {"service": "stuck", "reason": "errors"})
    assert rolled.status_code == 200
    assert rolled.json()["traffic_at_zero"] is False
    assert rolled.json()["time_to_safe"]["confirmed_at"] is None
    # and nothing pages before the bound (10 s)
    api.clock.advance(seconds=9)
    assert await api.runtime.traffic.page_unconfirmed() == 0

    # then past it, one page is enqueued and the rollout says so
    api.clock.advance(seconds=2)
    assert await api.runtime.traffic.page_unconfirmed() == 1
    assert await api.runtime.traffic.page_unconfirmed() == 0  # once
    view = (await api.get("/canary/stuck")).json()
    assert view["time_to_safe"]["unconfirmed_paged_at"] is not None
    [page] = [a for a in view["alerts"] if a["kind"] == "pagerduty.trigger"]
    assert page["dedup_key"] == f"opsapi-rollout-{view['id']}"
    [event] = await api.audit_events(action="rollout.unconfirmed")
    assert event.outcome == "error"
    assert "haproxy" in (event.details["router_error"] or "")


async def test_a_pull_rollback_is_safe_when_a_client_fetches_it_and_never_paged(
    api: Harness,
) -> None:
    # given a pull rollout at 25 % that a client has fetched
    pull = {"steps": [{"weight": 25, "wait": "1m"}, {"weight": 100, "wait": "1m"}], "gates": [],
            "pagerduty": {"service_ids": [], "routing_key": ROUTING_KEY}}  # fmt: skip
    assert (await api.put("/services/pulled", pull)).is_success
    assert (await api.post("/canary/promote", {"service": "pulled", "version": "v2"})).is_success
    assert (await api.fetch_weight("pulled"))["applied_weight"] == 25

    # when it is rolled back
    rolled = await api.post("/canary/rollback", {"service": "pulled", "reason": "errors"})

    # then committing is not applying: until a client fetches the 0 %, traffic is not at zero
    body = rolled.json()
    safe = body["time_to_safe"]
    assert (safe["router"], safe["applied_at"], safe["seconds"]) == ("pull", None, None)
    assert (body["applied_weight"], body["traffic_at_zero"]) == (25, False)
    # past the bound nothing pages: with no client polling there is no traffic to move
    api.clock.advance(seconds=30)
    assert await api.runtime.traffic.page_unconfirmed() == 0

    # when a client fetches the rollback 30 s after the decision
    view = await api.fetch_weight("pulled")

    # then it is applied at that fetch (time to safe 30 s, counted), still nothing to confirm
    assert view["applied_weight"] == 0
    safe = view["time_to_safe"]
    assert view["traffic_at_zero"] is True
    assert (safe["confirmed_at"], safe["seconds"]) == (None, 30.0)
    assert safe["applied_at"] == "2026-11-22T12:00:30+00:00"
    metrics = (await api.client.get("/metrics")).text
    counts = [s.value for family in text_string_to_metric_families(metrics)
              if family.name == "opsapi_rollback_time_to_safe_seconds"
              for s in family.samples if s.name.endswith("_count")
              and s.labels == {"trigger": "user", "router": "pull"}]  # fmt: skip
    assert counts == [1]
    # a second fetch of the same generation records nothing more
    assert (await api.get("/canary/pulled/weight")).status_code == 200
    audit = (await api.get("/audit?action=router.apply&service=pulled", role="auditor")).json()
    applies = [event["details"] for event in audit["items"]]
    assert [(a["weight"], a["reason"]) for a in applies] == [
        (0, "fetched by viewer-user"),
        (25, "fetched by viewer-user"),
    ]
    assert await api.runtime.traffic.page_unconfirmed() == 0
