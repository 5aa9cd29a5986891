"""Change control beyond rollback (DESIGN §12): an open PagerDuty incident and a freeze window hold
starts and promotions (never a rollback), a version rolled back by a breach is not started again,
and an admin may override each with a reason, audited as such."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.pagerduty import SECRET, deliver, incident_event
from tests.support.app import Harness, running_app
from tests.support.metrics_app import MetricsApp
from tests.support.prometheus import PrometheusServer

SERVICE = "guarded"
PD_SERVICE = "PGUARD01"
STEPS = [{"weight": 10, "wait": "1m"}, {"weight": 50, "wait": "1m"}, {"weight": 100, "wait": "1m"}]


@pytest.fixture
async def api(pg_url: str, key_file: Path) -> AsyncIterator[Harness]:
    async with running_app(
        pg_url, key_file, pagerduty_webhook_secrets=SECRET, pagerduty_worker_enabled=False
    ) as harness:
        # incidents on PGUARD01 hold changes; their priority does not call for a rollback
        policy = {"steps": STEPS, "gates": [],
                  "pagerduty": {"service_ids": [PD_SERVICE], "priorities": ["P0"],
                                "urgencies": ["low"], "dependants": ["cart"]}}  # fmt: skip
        assert (await harness.put(f"/services/{SERVICE}", policy)).status_code == 200
        assert (await harness.put("/services/cart", {"steps": STEPS, "gates": []})).is_success
        yield harness


def incident(status: str, event_id: str) -> dict[str, Any]:
    document = copy.deepcopy(incident_event(event_id=event_id, service_id=PD_SERVICE))
    document["event"]["event_type"] = f"incident.{status}"
    document["event"]["data"]["status"] = status
    return document


async def start(api: Harness, service: str, version: str, **extra: Any) -> Any:
    role = "admin" if extra else "operator"
    return await api.post("/canary/promote", {"service": service, "version": version, **extra},
                          role)  # fmt: skip


async def test_an_open_incident_holds_promotions_but_never_a_rollback(api: Harness) -> None:
    # given a rollout at 10 %, ready to promote
    assert (await start(api, SERVICE, "v2")).is_success
    api.clock.advance(minutes=1)

    # when PagerDuty reports an incident on the service (one that does not call for a rollback)
    triggered = await deliver(api, incident("triggered", "01GUARD-TRIGGERED"))
    assert triggered.json()["outcome"] == "ignored"

    # then promoting it is refused, naming the incident
    refused = await api.post("/canary/promote", {"service": SERVICE})
    assert refused.status_code == 409
    problem = refused.json()
    assert problem["reason_code"] == "incident_open"
    assert "PGR0VU2" in problem["detail"]
    assert [hold["kind"] for hold in problem["holds"]] == ["incident_open"]
    # and the rollout view says what holds it; a dependant service is held too
    view = (await api.get(f"/canary/{SERVICE}")).json()
    assert [hold["kind"] for hold in view["holds"]] == ["incident_open"]
    cart = await start(api, "cart", "v9")
    assert (cart.status_code, cart.json()["reason_code"]) == (409, "incident_open")
    assert "on guarded" in cart.json()["detail"]

    # but a rollback is never held
    rolled = await api.post("/canary/rollback", {"service": SERVICE, "reason": "incident"})
    assert rolled.status_code == 200
    assert rolled.json()["state"] == "rolled_back"

    # an admin may break the glass, with a reason, audited as such
    plain = await start(api, SERVICE, "v3")
    assert plain.json()["reason_code"] == "incident_open"
    forced = await start(api, SERVICE, "v3", break_glass=True, reason="the fix for the incident")
    assert forced.status_code == 200, forced.text
    [event] = await api.audit_events(action="canary.promote.override")
    assert event.details["override"]["reason"] == "the fix for the incident"
    assert event.details["override"]["holds"][0]["kind"] == "incident_open"
    no_reason = await start(api, SERVICE, "v4", break_glass=True)
    assert no_reason.status_code in (409, 422)

    # when the incident is resolved, the hold lifts
    await deliver(api, incident("resolved", "01GUARD-RESOLVED"))
    api.clock.advance(minutes=1)
    promoted = await api.post("/canary/promote", {"service": SERVICE})
    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["desired_weight"] == 50
    assert (await api.get(f"/canary/{SERVICE}")).json()["holds"] == []


async def test_a_freeze_window_holds_starts_and_auto_promotion_inside_it(api: Harness) -> None:
    now = api.clock()
    auto = {"steps": STEPS, "gates": [], "auto_promote": True}
    assert (await api.put("/services/auto", auto)).is_success
    assert (await start(api, "auto", "v2")).is_success
    # given a freeze window from 2 minutes from now, for 10 minutes
    window = {"name": "deploy-freeze", "services": ["auto", SERVICE], "reason": "audit week",
              "starts_at": (now + timedelta(minutes=2)).isoformat(),
              "ends_at": (now + timedelta(minutes=12)).isoformat()}  # fmt: skip
    created = await api.post("/freezes", window, "admin")
    assert created.status_code == 201, created.text

    # before it, starts go through and auto-promotion moves on
    api.clock.advance(minutes=1)
    await api.tick()
    assert (await api.get("/canary/auto")).json()["desired_weight"] == 50

    # inside it, starts are refused and a ready step waits instead of auto-promoting
    api.clock.advance(minutes=2)
    refused = await start(api, SERVICE, "v2")
    assert (refused.status_code, refused.json()["reason_code"]) == (409, "frozen")
    assert "deploy-freeze" in refused.json()["detail"]
    await api.tick()
    held = (await api.get("/canary/auto")).json()
    assert (held["state"], held["desired_weight"]) == ("awaiting_promotion", 50)
    assert held["holds"][0]["kind"] == "frozen"
    listed = (await api.get("/freezes")).json()["windows"]
    assert [(w["name"], w["active"]) for w in listed] == [("deploy-freeze", True)]

    # after it, both go on
    api.clock.advance(minutes=10)
    await api.tick()
    assert (await api.get("/canary/auto")).json()["desired_weight"] == 100
    assert (await start(api, SERVICE, "v2")).status_code == 200


async def test_a_version_rolled_back_by_a_breach_is_not_started_again(
    pg_url: str, key_file: Path, metrics_app: MetricsApp, prometheus: PrometheusServer
) -> None:
    errors = ('(sum(rate(http_requests_total{service="{service}",version="{canary_version}",'
              'code=~"5.."}[3s])) or vector(0)) / sum(rate(http_requests_total{'
              'service="{service}",version="{canary_version}"}[3s]))')  # fmt: skip
    async with running_app(pg_url, key_file, prometheus_url=prometheus.url) as api:
        policy = {
            "steps": STEPS,
            "interval": "1s",
            "gates": [{"name": "errors", "query": errors, "op": "<", "threshold": 0.05}],
        }
        assert (await api.put("/services/rejecting", policy)).is_success
        # given v2 whose errors breach its gate, rolled back by the controller
        metrics_app.set("rejecting", "v2", rps=40, error_ratio=0.5)
        assert (await start(api, "rejecting", "v2")).is_success
        prometheus.wait_for(
            errors.replace("{service}", "rejecting").replace("{canary_version}", "v2"),
            lambda value: value is not None and value > 0.2, timeout=20,
        )  # fmt: skip
        api.clock.advance(seconds=2)
        await api.tick()
        assert (await api.get("/canary/rejecting")).json()["state"] == "rolled_back"
        metrics_app.remove("rejecting", "v2")

        # when someone starts v2 again, it is refused
        again = await start(api, "rejecting", "v2")
        assert (again.status_code, again.json()["reason_code"]) == (409, "version_rejected")
        [rejection] = (await api.get("/services/rejecting/rejections")).json()["items"]
        assert rejection["version"] == "v2"
        assert "errors" in rejection["reason"]

        # an admin may override, with a reason, audited
        forced = await start(api, "rejecting", "v2", override_rejection=True,
                             reason="the breach was the load balancer")  # fmt: skip
        assert forced.status_code == 200, forced.text
        [event] = await api.audit_events(action="canary.promote.override")
        assert event.details["override"]["rejected_version"] == "v2"
        await api.post("/canary/rollback", {"service": "rejecting", "reason": "done"})

        # and lifting the rejection (audited) lets anyone start it
        lift = {"version": "v2", "reason": "root cause fixed in the load balancer"}
        lifted = await api.post("/services/rejecting/rejections/lift", lift, "admin")
        assert lifted.status_code == 200, lifted.text
        assert (await start(api, "rejecting", "v2")).status_code == 200
        [lift_event] = await api.audit_events(action="rejection.lift")
        assert lift_event.details["reason"] == lift["reason"]
