"""Outbound alerts: outbox rows written with their cause, delivered by the worker to a local
HTTPS Events API v2 through the real `pagerduty` client — retries, failure, crashes, and the
event loop kept free while PagerDuty hangs.

The app runs on a manual clock; its controller is driven by `tick()` with gates measured by a
provider whose value the test sets, and the worker by `run_once()` (unless a test runs it in
the background to show it does not block).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from opsapi.pagerduty import outbox
from opsapi.pagerduty.models import OutboxKind
from opsapi.pagerduty.worker import DeliveryWorker
from tests.pagerduty import (
    ROUTING_KEY,
    SECRET,
    FixedProvider,
    audit_text,
    deliver,
    fixture,
    outbox_rows,
    pagerduty_app,
    policy,
    truncate_pagerduty_tables,
)
from tests.support.app import Harness
from tests.support.clock import ManualClock
from tests.support.pagerduty_server import EventsApiServer

SERVICE = "checkout"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EventsApiServer]:
    with EventsApiServer(tmp_path_factory.mktemp("events-api")) as running:
        yield running


@pytest.fixture
async def clean_url(pg_url: str, server: EventsApiServer) -> AsyncIterator[str]:
    server.reset()
    await truncate_pagerduty_tables(pg_url)
    yield pg_url
    await truncate_pagerduty_tables(pg_url)


def pd_settings(server: EventsApiServer, **overrides: Any) -> dict[str, Any]:
    return {
        "pagerduty_events_url": server.url,
        "pagerduty_ca_file": server.ca_file,
        "pagerduty_timeout_seconds": 0.5,
        "pagerduty_worker_enabled": False,
        **overrides,
    }


@pytest.fixture
def gates() -> FixedProvider:
    return FixedProvider(0.0)


@pytest.fixture
async def api(
    clean_url: str, key_file: Path, server: EventsApiServer, gates: FixedProvider
) -> AsyncIterator[Harness]:
    async with pagerduty_app(clean_url, key_file, provider=gates, **pd_settings(server)) as app:
        yield app


def worker(api: Harness) -> DeliveryWorker:
    return api.app.state.pagerduty_worker  # type: ignore[no-any-return]


ERROR_GATE = {"name": "error-rate", "query": "errors", "op": "<", "threshold": 0.05, "for": "30s"}


def gated_policy(**extra: Any) -> dict[str, Any]:
    """10 % for 1 m then a 1 m bake, evaluated every 10 s, auto-promoted; one error gate."""
    return policy(
        service_ids=["PF9KMXH"],
        steps=[{"weight": 10, "wait": "1m"}, {"weight": 100, "wait": "1m"}],
        interval="10s",
        auto_promote=True,
        gates=[ERROR_GATE],
        **extra,
    )


async def breach(api: Harness, gates: FixedProvider, version: str = "v2") -> int:
    """Start a rollout and let the controller roll it back on a breach; its id."""
    gates.value = 0.0
    started = await api.post("/canary/promote", {"service": SERVICE, "version": version})
    assert started.status_code == 200, started.text
    gates.value = 0.5
    for _ in range(6):
        api.clock.advance(seconds=10)
        await api.tick()
    view = (await api.get(f"/canary/{SERVICE}")).json()
    assert view["state"] == "rolled_back", view
    assert view["triggered_by"] == "controller"
    return int(started.json()["id"])


async def succeed(api: Harness, gates: FixedProvider, version: str) -> int:
    """Start a healthy rollout and let the controller carry it to success; its id."""
    gates.value = 0.0
    started = await api.post("/canary/promote", {"service": SERVICE, "version": version})
    assert started.status_code == 200, started.text
    for _ in range(20):
        api.clock.advance(seconds=10)
        await api.tick()
    view = (await api.get(f"/canary/{SERVICE}")).json()
    assert view["state"] == "succeeded", view
    return int(started.json()["id"])


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    prefix = f"{name}{{{wanted}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return 0.0


# --- what is sent, and when ---------------------------------------------------------------------


async def test_one_trigger_per_automatic_rollback_and_one_resolve_on_the_next_success(
    api: Harness, server: EventsApiServer, gates: FixedProvider
) -> None:
    assert (await api.put(f"/services/{SERVICE}", gated_policy())).status_code == 200

    # when the controller rolls a breaching canary back
    rollout_id = await breach(api, gates)

    # then one trigger waits in the outbox (committed with the rollback), and the rollback's
    # audit event says a page was enqueued
    [row] = await outbox_rows(api)
    assert (row.kind, row.state, row.dedup_key) == (
        "pagerduty.trigger",
        "pending",
        f"opsapi-rollout-{rollout_id}",
    )
    [rolled_back] = await api.audit_events(action="rollout.rolled_back")
    assert rolled_back.details["page"] == "enqueued"
    assert rolled_back.details["dedup_key"] == f"opsapi-rollout-{rollout_id}"

    # when the worker runs (twice: nothing is sent twice)
    assert await worker(api).run_once() == 1
    assert await worker(api).run_once() == 0

    # then PagerDuty got exactly one critical trigger, deduplicated per rollout, naming the gate
    [event] = server.accepted()
    assert event["event_action"] == "trigger"
    assert event["routing_key"] == ROUTING_KEY
    assert event["dedup_key"] == f"opsapi-rollout-{rollout_id}"
    payload = event["payload"]
    assert (payload["severity"], payload["source"]) == ("critical", "opsapi")
    for part in ("checkout", "v2", "error-rate", "0.5", "0.05"):
        assert part in payload["summary"]
    details = payload["custom_details"]
    assert details["rollout_id"] == rollout_id
    assert details["rollout"] == "/internal/ops/canary/checkout"
    assert (details["gate"], details["value"], details["threshold"]) == ("error-rate", 0.5, 0.05)
    assert "error-rate" in details["reason"]
    assert details["gates"] == [
        {"name": "error-rate", "phase": "fail", "value": 0.5, "threshold": 0.05}
    ]
    # and the rollout view shows the alert delivered
    view = (await api.get(f"/canary/{SERVICE}")).json()
    [alert] = view["alerts"]
    assert alert["delivered_at"]
    assert {
        key: alert[key] for key in ("kind", "state", "attempts", "last_error", "dedup_key")
    } == {
        "kind": "pagerduty.trigger",
        "state": "delivered",
        "attempts": 1,
        "last_error": None,
        "dedup_key": f"opsapi-rollout-{rollout_id}",
    }

    # when the service's next rollout succeeds (and one more after it)
    next_id = await succeed(api, gates, "v3")
    await worker(api).run_once()
    await succeed(api, gates, "v4")
    await worker(api).run_once()

    # then the earlier alert was resolved exactly once, with the key it was triggered with
    events = server.accepted()
    assert [(e["event_action"], e["dedup_key"]) for e in events] == [
        ("trigger", f"opsapi-rollout-{rollout_id}"),
        ("resolve", f"opsapi-rollout-{rollout_id}"),
    ]
    assert events[1]["routing_key"] == ROUTING_KEY
    assert next_id != rollout_id
    # and the routing key is nowhere in the audit log, nor in any answer
    assert ROUTING_KEY not in await audit_text(api)
    assert ROUTING_KEY not in (await api.get(f"/canary/{SERVICE}")).text
    metrics = (await api.client.get("/metrics")).text
    assert (
        metric(metrics, "opsapi_pagerduty_deliveries_total", kind="trigger", result="delivered")
        == 1
    )
    assert (
        metric(metrics, "opsapi_pagerduty_deliveries_total", kind="resolve", result="delivered")
        == 1
    )
    assert metric(metrics, "opsapi_pagerduty_pending") == 0


async def test_no_routing_key_no_page_and_the_rollback_says_so(
    api: Harness, gates: FixedProvider
) -> None:
    assert (
        await api.put(f"/services/{SERVICE}", gated_policy(routing_key=None))
    ).status_code == 200

    await breach(api, gates)

    assert await outbox_rows(api) == []
    [rolled_back] = await api.audit_events(action="rollout.rolled_back")
    assert rolled_back.details["page"] == "no routing key"


async def test_a_rollback_by_a_person_does_not_page(api: Harness) -> None:
    assert (await api.put(f"/services/{SERVICE}", gated_policy())).status_code == 200
    await api.post("/canary/promote", {"service": SERVICE, "version": "v2"})

    response = await api.post("/canary/rollback", {"service": SERVICE, "reason": "by hand"})

    assert response.status_code == 200
    assert response.json()["alerts"] == []
    assert await outbox_rows(api) == []


async def test_router_failing_five_times_pages_once(
    clean_url: str, key_file: Path, server: EventsApiServer, tmp_path: Path
) -> None:
    # given a webhook router instance whose receiver is down
    routers_file = tmp_path / "routers.json"
    down = {
        "type": "webhook",
        "url": "http://127.0.0.1:9/weights",
        "secret": "router-secret-0123456789",
    }
    routers_file.write_text(json.dumps({"hook": down}))
    settings = pd_settings(server, routers_file=routers_file)
    async with pagerduty_app(clean_url, key_file, **settings) as api:
        body = policy(router={"name": "hook"})
        assert (await api.put(f"/services/{SERVICE}", body)).status_code == 200

        # when the rollout's applies fail, and the reconcile pass retries them with back-off
        started = await api.post("/canary/promote", {"service": SERVICE, "version": "v2"})
        assert started.json()["router_error"]
        for attempt in range(2, 9):
            api.clock.advance(seconds=61)
            await api.runtime.traffic.reconcile()
            if attempt == 4:
                assert await outbox_rows(api) == []  # four failures: no page yet

        # then the fifth failure enqueued one trigger, and the later ones none
        view = (await api.get(f"/canary/{SERVICE}")).json()
        assert view["router_attempts"] == 8
        [row] = await outbox_rows(api)
        assert row.cause == f"router-failure:{view['id']}"
        await api.app.state.pagerduty_worker.run_once()
        [event] = server.accepted()
        assert event["dedup_key"] == f"opsapi-rollout-{view['id']}"
        assert "router hook failed 5 times" in event["payload"]["summary"]
        assert "127.0.0.1" in event["payload"]["summary"]
        assert event["payload"]["custom_details"]["router"] == "hook"


# --- failures and retries -----------------------------------------------------------------------


async def enqueue_trigger(api: Harness, cause: str = "test:1") -> None:
    """Enqueue through the function the controller, traffic layer and resolves use."""
    async with api.runtime.sessions() as session, session.begin():
        created = await outbox.enqueue(
            session,
            kind=OutboxKind.TRIGGER,
            cause=cause,
            service=SERVICE,
            rollout_id=1,
            dedup_key="opsapi-rollout-1",
            routing_key=ROUTING_KEY,
            payload={"summary": "checkout: test", "source": "opsapi", "severity": "critical",
                     "custom_details": {"rollout_id": 1}},
            now=api.clock(),
        )  # fmt: skip
        assert created


@pytest.mark.parametrize("failure", [400, 429, 500, ("hang", 3)], ids=["400", "429", "500", "hang"])
async def test_failures_are_retried_with_backoff_then_failed(
    clean_url: str, key_file: Path, server: EventsApiServer, failure: Any
) -> None:
    server.default = failure
    settings = pd_settings(server, pagerduty_max_attempts=4)
    async with pagerduty_app(clean_url, key_file, **settings) as api:
        await enqueue_trigger(api)
        run = worker(api).run_once

        # first attempt: one request (the client's own retries are off), next try in 1 s
        assert await run() == 1
        [row] = await outbox_rows(api)
        assert (row.state, row.attempts) == ("pending", 1)
        assert row.next_attempt_at == api.clock() + timedelta(seconds=1)
        assert row.last_error
        assert ROUTING_KEY not in row.last_error
        # not due yet: nothing is sent
        api.clock.advance(seconds=0.9)
        assert await run() == 0
        # then 1 s, 2 s, 4 s apart
        for wait, attempts in ((0.1, 2), (2, 3), (4, 4)):
            api.clock.advance(seconds=wait)
            assert await run() == 1
            [row] = await outbox_rows(api)
            assert row.attempts == attempts
        # bounded: after max_attempts the alert is failed, audited and counted
        assert row.state == "failed"
        api.clock.advance(seconds=120)
        assert await run() == 0
        assert len(server.requests) == 4
        [event] = await api.audit_events(action="pagerduty.delivery_failed")
        assert (event.outcome, event.source, event.service) == ("error", "system", SERVICE)
        assert event.details["attempts"] == 4
        assert event.details["last_error"] == row.last_error
        assert ROUTING_KEY not in await audit_text(api)
        metrics = (await api.client.get("/metrics")).text
        assert (
            metric(metrics, "opsapi_pagerduty_deliveries_total", kind="trigger", result="retry")
            == 3
        )
        assert (
            metric(metrics, "opsapi_pagerduty_deliveries_total", kind="trigger", result="failed")
            == 1
        )
    expected = "ReadTimeout" if isinstance(failure, tuple) else f"HTTP {failure}"
    assert expected in row.last_error


async def test_a_retry_that_succeeds_is_delivered(api: Harness, server: EventsApiServer) -> None:
    server.script(500, 429)
    await enqueue_trigger(api)

    for _ in range(3):
        await worker(api).run_once()
        api.clock.advance(seconds=60)

    [row] = await outbox_rows(api)
    assert (row.state, row.attempts, row.last_error) == ("delivered", 3, None)
    assert [r.answer for r in server.requests] == [500, 429, 202]
    assert len(await api.audit_events(action="pagerduty.delivered")) == 1


async def test_the_worker_never_blocks_the_event_loop(
    clean_url: str, key_file: Path, server: EventsApiServer, gates: FixedProvider
) -> None:
    # given PagerDuty hanging and the worker running in the background
    server.default = ("hang", 4)
    settings = pd_settings(
        server, pagerduty_worker_enabled=True, pagerduty_poll_seconds=0.05,
        pagerduty_timeout_seconds=3,
    )  # fmt: skip
    async with pagerduty_app(clean_url, key_file, provider=gates, **settings) as api:
        assert (await api.put(f"/services/{SERVICE}", gated_policy())).status_code == 200
        await api.post("/canary/promote", {"service": "other", "version": "v2"})
        await enqueue_trigger(api)
        deadline = time.monotonic() + 5
        while not server.requests and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert server.requests, "the worker did not send"

        # when, while the worker waits on PagerDuty, the controller rolls back on a breach and
        # a person rolls back another service
        started = time.monotonic()
        rollout_id = await breach(api, gates)
        rolled = await api.post("/canary/rollback", {"service": "other", "reason": "by hand"})
        took = time.monotonic() - started

        # then both finish at once, the breach's page only enqueued
        assert rolled.status_code == 200
        assert rolled.json()["state"] == "rolled_back"
        assert took < 1.0, took
        causes = [row.cause for row in await outbox_rows(api)]
        assert f"breach:{rollout_id}" in causes
        # and the event loop stayed responsive all along
        lag_started = time.monotonic()
        await asyncio.sleep(0.01)
        assert time.monotonic() - lag_started < 0.2


async def test_an_alert_committed_before_a_crash_is_delivered_after_restart(
    clean_url: str, key_file: Path, server: EventsApiServer, gates: FixedProvider
) -> None:
    # given a rollback committed with its page, and the process gone before the worker ran
    clock = ManualClock()
    async with pagerduty_app(clean_url, key_file, clock=clock, provider=gates,
                             **pd_settings(server)) as first:  # fmt: skip
        assert (await first.put(f"/services/{SERVICE}", gated_policy())).status_code == 200
        rollout_id = await breach(first, gates)
    assert server.requests == []

    # when a new instance starts (its worker running in the background)
    settings = pd_settings(server, pagerduty_worker_enabled=True, pagerduty_poll_seconds=0.05)
    async with pagerduty_app(clean_url, key_file, clock=clock, **settings) as second:
        deadline = time.monotonic() + 10
        while not server.accepted() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

        # then the alert is delivered (the worker records it just after PagerDuty's answer)
        [event] = server.accepted()
        assert event["dedup_key"] == f"opsapi-rollout-{rollout_id}"
        while (await outbox_rows(second))[0].state != "delivered":
            assert time.monotonic() < deadline, "the delivery was never recorded"
            await asyncio.sleep(0.05)


async def test_a_send_interrupted_by_a_crash_is_sent_again_after_the_lease(
    clean_url: str, key_file: Path, server: EventsApiServer
) -> None:
    # given a row claimed by a worker that died before recording anything
    clock = ManualClock()
    async with pagerduty_app(clean_url, key_file, clock=clock, **pd_settings(server)) as first:
        await enqueue_trigger(first)
        claimed = await worker(first)._claim()
        assert len(claimed) == 1

    async with pagerduty_app(clean_url, key_file, clock=clock, **pd_settings(server)) as second:
        # then nobody sends it while the lease holds, and the next worker does after it
        assert await worker(second).run_once() == 0
        clock.advance(seconds=worker(second).lease.total_seconds())
        assert await worker(second).run_once() == 1
        assert len(server.accepted()) == 1


async def test_a_resolve_waits_for_its_pending_trigger(
    api: Harness, server: EventsApiServer
) -> None:
    # given a trigger failing (retrying later) and then a resolve of the same key
    server.script(500)
    await enqueue_trigger(api)
    await worker(api).run_once()
    async with api.runtime.sessions() as session, session.begin():
        await outbox.enqueue(
            session, kind=OutboxKind.RESOLVE, cause="resolve:opsapi-rollout-1", service=SERVICE,
            rollout_id=1, dedup_key="opsapi-rollout-1", routing_key=ROUTING_KEY, payload={},
            now=api.clock(),
        )  # fmt: skip

    # then the resolve is not sent before the trigger is
    assert await worker(api).run_once() == 0
    api.clock.advance(seconds=1)
    await worker(api).run_once()
    await worker(api).run_once()
    actions = [e["event_action"] for e in server.accepted()]
    assert actions == ["trigger", "resolve"]


# --- the routing key in policy answers ----------------------------------------------------------


async def test_routing_key_is_redacted_in_answers_and_a_redacted_put_keeps_it(api: Harness) -> None:
    assert (await api.put(f"/services/{SERVICE}", gated_policy())).status_code == 200

    read = (await api.get(f"/services/{SERVICE}")).json()
    assert read["pagerduty"]["routing_key"] == "…" + ROUTING_KEY[-4:]
    assert ROUTING_KEY not in json.dumps(read)

    # a PUT sending back what it read keeps the stored key
    read["interval"] = "20s"
    written = await api.put(f"/services/{SERVICE}", read)
    assert written.status_code == 200, written.text
    assert written.json()["pagerduty"]["routing_key"] == "…" + ROUTING_KEY[-4:]
    async with api.runtime.sessions() as session:
        assert await outbox.routing_key_of(session, SERVICE) == ROUTING_KEY

    # a redacted value that is not the stored key's is refused
    read["pagerduty"]["routing_key"] = "…zzzz"
    refused = await api.put(f"/services/{SERVICE}", read)
    assert refused.status_code == 422
    # and a new key replaces it
    read["pagerduty"]["routing_key"] = "N3WKEY" + "0" * 26
    assert (await api.put(f"/services/{SERVICE}", read)).status_code == 200
    async with api.runtime.sessions() as session:
        assert await outbox.routing_key_of(session, SERVICE) == "N3WKEY" + "0" * 26


# --- the embedded database ----------------------------------------------------------------------


async def test_both_directions_on_sqlite(
    sqlite_url: str, key_file: Path, server: EventsApiServer, gates: FixedProvider
) -> None:
    server.reset()
    settings = pd_settings(server, pagerduty_webhook_secrets=SECRET)
    async with pagerduty_app(sqlite_url, key_file, provider=gates, **settings) as api:
        assert (await api.put(f"/services/{SERVICE}", gated_policy())).status_code == 200
        rollout_id = await breach(api, gates)
        assert await worker(api).run_once() == 1
        assert [e["dedup_key"] for e in server.accepted()] == [f"opsapi-rollout-{rollout_id}"]

        started = await api.post("/canary/promote", {"service": SERVICE, "version": "v3"})
        document = fixture("incident_triggered")
        first, again = await deliver(api, document), await deliver(api, document)

        assert first.json()["outcome"] == "rolled_back"
        assert again.json()["reason"] == "duplicate event"
        view = (await api.get(f"/canary/{SERVICE}")).json()
        assert (view["id"], view["triggered_by"]) == (started.json()["id"], "pagerduty")
