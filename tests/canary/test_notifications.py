"""Notifications from every caller: the API, `/execute`, the controller's breach and the PagerDuty
webhook all go through the one interpreter, so each transition reaches the channel exactly once.

Real PostgreSQL, a real Prometheus scraping a real metrics app for the breach, the real outbox
worker delivering to a local receiver standing in for a chat webhook.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.pagerduty import SECRET, deliver, incident_event
from tests.support.app import Harness, running_app
from tests.support.metrics_app import MetricsApp
from tests.support.notify_receiver import NotifyReceiver
from tests.support.prometheus import PrometheusServer

SERVICE = "notified"
PD_SERVICE = "PNOTIFY1"
ERRORS = (
    '(sum(rate(http_requests_total{service="{service}",version="{canary_version}",code=~"5.."}'
    '[3s])) or vector(0)) / sum(rate(http_requests_total{service="{service}",'
    'version="{canary_version}"}[3s]))'
)


@pytest.fixture
def receiver() -> AsyncIterator[NotifyReceiver]:
    with NotifyReceiver() as running:
        yield running  # type: ignore[misc]


@pytest.fixture
async def api(
    pg_url: str,
    key_file: Path,
    tmp_path: Path,
    receiver: NotifyReceiver,
    prometheus: PrometheusServer,
) -> AsyncIterator[Harness]:
    channels = tmp_path / "channels.json"
    channels.write_text(json.dumps({"ops": {"type": "webhook", "url": f"{receiver.url}/ops",
                                            "secret": "n" * 32}}))  # fmt: skip
    async with running_app(
        pg_url, key_file, notifications_file=channels, pagerduty_worker_enabled=False,
        pagerduty_webhook_secrets=SECRET, prometheus_url=prometheus.url,
    ) as harness:  # fmt: skip
        policy = {
            "steps": [{"weight": 10, "wait": "1m"}, {"weight": 100, "wait": "1m"}],
            "interval": "1s",
            "gates": [{"name": "errors", "query": ERRORS, "op": "<", "threshold": 0.05,
                       "on_no_data": "pass"}],
            "notify": [{"channel": "ops"}],
            "pagerduty": {"service_ids": [PD_SERVICE], "urgencies": ["high"]},
        }  # fmt: skip
        response = await harness.put(f"/services/{SERVICE}", policy)
        assert response.status_code == 200, response.text
        yield harness


async def delivered(api: Harness, receiver: NotifyReceiver) -> list[tuple[str, str, str]]:
    """Run the outbox worker until idle; (event, triggered_by, actor) of everything received, in
    the order of the transitions (the worker sends in parallel, so arrival order may differ)."""
    while await api.runtime.delivery.run_once():
        pass
    documents = sorted((r.json for r in receiver.accepted()), key=lambda d: d["delivery_id"])
    return [(d["event"], d["triggered_by"], d["actor"]) for d in documents]


async def test_every_caller_notifies_each_transition_once(
    api: Harness,
    receiver: NotifyReceiver,
    metrics_app: MetricsApp,
    prometheus: PrometheusServer,
) -> None:
    # Given the API starts v2 and promotes it, and an admin pins its weight through /execute,
    assert (await api.post("/canary/promote", {"service": SERVICE, "version": "v2"})).is_success
    api.clock.advance(minutes=1)
    await api.tick()  # the gate measured: no traffic, which it passes
    assert (await api.post("/canary/promote", {"service": SERVICE})).is_success
    pin = {"operation": "set-weight",
           "params": {"service": SERVICE, "weight": 40, "reason": "hold for the sale"}}  # fmt: skip
    assert (await api.post("/execute", pin, "admin", "root")).is_success
    assert (await api.post("/canary/rollback", {"service": SERVICE, "reason": "done"})).is_success
    # then each of those transitions reached the channel once, saying who did it.
    assert await delivered(api, receiver) == [
        ("started", "user", "operator-user"),
        ("awaiting_promotion", "controller", "controller"),
        ("promoted", "user", "operator-user"),
        ("paused", "user", "root"),
        ("rolled_back", "user", "operator-user"),
    ]

    # When v3's errors breach its gate, the controller's rollback notifies once.
    metrics_app.set(SERVICE, "v3", rps=40, error_ratio=0.5)
    assert (await api.post("/canary/promote", {"service": SERVICE, "version": "v3"})).is_success
    prometheus.wait_for(
        ERRORS.replace("{service}", SERVICE).replace("{canary_version}", "v3"),
        lambda value: value is not None and value > 0.2, timeout=20,
    )  # fmt: skip
    api.clock.advance(seconds=2)
    await api.tick()
    view = (await api.get(f"/canary/{SERVICE}")).json()
    assert (view["state"], view["triggered_by"]) == ("rolled_back", "controller"), view
    metrics_app.remove(SERVICE, "v3")

    # When PagerDuty reports an incident on v4, its rollback notifies once.
    assert (await api.post("/canary/promote", {"service": SERVICE, "version": "v4"})).is_success
    incident = incident_event(event_id="01NOTIFYEVERYCALLER", service_id=PD_SERVICE, urgency="high")
    assert (await deliver(api, incident)).json()["outcome"] == "rolled_back"
    # A redelivery of the same incident acts (and notifies) no more.
    assert (await deliver(api, incident)).json()["outcome"] == "ignored"

    assert (await delivered(api, receiver))[5:] == [
        ("started", "user", "operator-user"),
        ("rolled_back", "controller", "controller"),
        ("started", "user", "operator-user"),
        ("rolled_back", "pagerduty", "pagerduty"),
    ]
    # and the rollout view shows its notifications and their delivery.
    notifications = (await api.get(f"/canary/{SERVICE}")).json()["notifications"]
    assert [(n["event"], n["state"]) for n in notifications] == [
        ("started", "delivered"),
        ("rolled_back", "delivered"),
    ]


async def test_a_router_that_keeps_failing_is_notified_once(
    pg_url: str, key_file: Path, tmp_path: Path, receiver: NotifyReceiver
) -> None:
    channels = tmp_path / "channels.json"
    channels.write_text(json.dumps({"ops": {"type": "webhook", "url": f"{receiver.url}/ops",
                                            "secret": "n" * 32}}))  # fmt: skip
    routers = tmp_path / "routers.json"
    # a webhook router whose receiver is gone (nothing listens on port 9 here)
    routers.write_text(json.dumps({"hook": {"type": "webhook", "url": "http://127.0.0.1:9/w",
                                            "secret": "s" * 32, "timeout": 1}}))  # fmt: skip
    async with running_app(
        pg_url, key_file, notifications_file=channels, routers_file=routers,
        pagerduty_worker_enabled=False,
    ) as api:  # fmt: skip
        policy = {"steps": [{"weight": 10, "wait": "1m"}, {"weight": 100, "wait": "1m"}],
                  "gates": [], "router": {"name": "hook"},
                  "notify": [{"channel": "ops", "events": ["router_failed"]}]}  # fmt: skip
        assert (await api.put("/services/routed", policy)).status_code == 200
        started = await api.post("/canary/promote", {"service": "routed", "version": "v2"})
        rollout_id = started.json()["id"]
        # when the router fails again and again (the request's apply, then reconcile's retries)
        for _ in range(6):
            await api.runtime.traffic.apply(rollout_id, "routed", reason="reconcile")

        # then the channel hears once that the router is failing, and why
        assert [event for event, *_ in await delivered(api, receiver)] == ["router_failed"]
        [request] = receiver.accepted()
        assert request.json["triggered_by"] == "system"
        assert "hook" in request.json["reason"]
