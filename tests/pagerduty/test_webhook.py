"""POST /internal/ops/webhooks/pagerduty: signatures, which events act, replays, audit.

Real app on real PostgreSQL; payloads shaped like PagerDuty's documented v3 examples
(tests/pagerduty/fixtures), signed with real HMAC-SHA256.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from opsapi.config import Settings
from opsapi.pagerduty.models import PagerDutyEvent
from tests.pagerduty import (
    SECRET,
    audit_text,
    body_of,
    deliver,
    fixture,
    incident_event,
    policy,
    signature,
    truncate_pagerduty_tables,
)
from tests.support.app import Harness, running_app

SERVICE = "checkout"
PD_SERVICE = "PF9KMXH"  # the service of the documented example incident
OLD_SECRET = "whsec-previous-0a9b8c7d6e5f4a3b"


@pytest.fixture
async def clean_url(pg_url: str) -> AsyncIterator[str]:
    await truncate_pagerduty_tables(pg_url)
    yield pg_url
    await truncate_pagerduty_tables(pg_url)


@pytest.fixture
async def hook(clean_url: str, key_file: Path) -> AsyncIterator[Harness]:
    """The app with the webhook secret configured (manual clock, no background loops)."""
    async with running_app(
        clean_url, key_file, pagerduty_webhook_secrets=SECRET, pagerduty_worker_enabled=False
    ) as api:
        yield api


async def mapped_rollout(
    api: Harness, service: str = SERVICE, *, pd_service: str = PD_SERVICE, **pagerduty: Any
) -> int:
    """A service mapped to `pd_service` with an open rollout at 10 %; returns the rollout id."""
    body = policy(service_ids=[pd_service], **pagerduty)
    assert (await api.put(f"/services/{service}", body)).status_code == 200
    started = await api.post("/canary/promote", {"service": service, "version": "v2"})
    assert started.status_code == 200, started.text
    return int(started.json()["id"])


async def rollout(api: Harness, service: str = SERVICE) -> dict[str, Any]:
    return dict((await api.get(f"/canary/{service}")).json())


async def webhook_events(api: Harness) -> list[Any]:
    return await api.audit_events(source="pagerduty")


# --- acting -------------------------------------------------------------------------------------


async def test_triggered_p1_incident_rolls_back_the_mapped_service(hook: Harness) -> None:
    # given checkout, mapped to PagerDuty service PF9KMXH, with an open rollout at 10 %
    rollout_id = await mapped_rollout(hook)

    # when PagerDuty sends the documented incident.triggered (P1, high urgency) for PF9KMXH
    response = await deliver(hook, fixture("incident_triggered"))

    # then the rollout is rolled back by pagerduty within PagerDuty's 5 s (the pull router's 0 %
    # is published; traffic is at zero once a client has fetched it)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["outcome"] == "rolled_back"
    assert answer["services"] == [
        {
            "service": SERVICE,
            "rollout_id": rollout_id,
            "outcome": "rolled_back",
            "reason": answer["services"][0]["reason"],
            "traffic_at_zero": False,
        }
    ]
    view = await hook.fetch_weight(SERVICE)
    assert view["traffic_at_zero"] is True
    assert view["state"] == "rolled_back"
    assert view["triggered_by"] == "pagerduty"
    assert view["desired_weight"] == view["applied_weight"] == 0
    # and the reason quotes the incident's number, title and URL
    assert "#2" in view["reason"]
    assert '"A little bump in the road"' in view["reason"]
    assert "https://acme.pagerduty.com/incidents/PGR0VU2" in view["reason"]
    # and one audit event by pagerduty says so, in the rollback's transaction
    [event] = await webhook_events(hook)
    assert (event.action, event.outcome, event.actor) == (
        "rollout.rolled_back",
        "success",
        "pagerduty",
    )
    assert (event.service, event.rollout_id) == (SERVICE, rollout_id)
    assert event.details["triggered_by"] == "pagerduty"
    assert event.details["event_id"] == "01DEN2SN4OJM3HXZKPLB0SMTXB"
    assert event.details["incident"]["number"] == 2
    assert event.details["reason"] == view["reason"]
    assert event.request_id == response.headers["x-request-id"]
    # and the event id is remembered
    async with hook.runtime.sessions() as session:
        stored = await session.get(PagerDutyEvent, "01DEN2SN4OJM3HXZKPLB0SMTXB")
    assert stored is not None
    assert stored.outcome == "success"


async def test_one_pagerduty_service_mapped_twice_rolls_back_both(hook: Harness) -> None:
    await mapped_rollout(hook, "checkout")
    await mapped_rollout(hook, "payments")

    response = await deliver(hook, fixture("incident_triggered"))

    assert response.status_code == 200, response.text
    assert [s["service"] for s in response.json()["services"]] == ["checkout", "payments"]
    for name in ("checkout", "payments"):
        assert (await rollout(hook, name))["state"] == "rolled_back"
    assert len(await hook.audit_events(action="rollout.rolled_back", source="pagerduty")) == 2


# (event, priority, urgency, policy priorities, policy urgencies) -> rolls back?
RULES = [
    ("incident_triggered", "P1", "high", ["P1"], ["high"], True),
    ("incident_triggered", "P1", "low", ["P1"], ["high"], True),  # by priority
    ("incident_triggered", None, "high", ["P1"], ["high"], True),  # by urgency, no priority set
    ("incident_triggered", "P2", "low", ["P1", "P2"], ["high"], True),
    ("incident_triggered", "P3", "low", ["P1"], ["high"], False),
    ("incident_triggered", None, "low", ["P1"], ["high"], False),
    ("incident_triggered", "P1", "high", [], [], False),  # empty lists: never
    ("incident_triggered", "P3", "high", ["P1"], [], False),  # urgency rule switched off
    ("incident_priority_updated", "P1", "low", ["P1"], ["high"], True),
    ("incident_priority_updated", "P3", "high", ["P1"], ["high"], False),  # priority only
    ("incident_priority_updated", None, "high", ["P1"], ["high"], False),
    ("incident_reopened", "P1", "low", ["P1"], ["high"], True),
    ("incident_reopened", None, "high", ["P1"], ["high"], True),
    ("incident_reopened", "P4", "low", ["P1"], ["high"], False),
]


@pytest.mark.parametrize(
    ("name", "priority", "urgency", "priorities", "urgencies", "acts"),
    RULES,
    ids=[f"{r[0]}-{r[1]}-{r[2]}-{'+'.join(r[3])}-{'+'.join(r[4])}" for r in RULES],
)
async def test_priority_and_urgency_rules(
    hook: Harness,
    name: str,
    priority: str | None,
    urgency: str,
    priorities: list[str],
    urgencies: list[str],
    acts: bool,
) -> None:
    await mapped_rollout(hook, priorities=priorities, urgencies=urgencies)

    document = incident_event(name, priority=priority, urgency=urgency)
    response = await deliver(hook, document)

    assert response.status_code == 200, response.text
    assert response.json()["outcome"] == ("rolled_back" if acts else "ignored")
    assert (await rollout(hook))["state"] == ("rolled_back" if acts else "progressing")
    [event] = await webhook_events(hook)
    if acts:
        assert (event.action, event.outcome) == ("rollout.rolled_back", "success")
    else:
        assert (event.action, event.outcome) == ("pagerduty.webhook", "ignored")
        assert "does not qualify" in event.details["reason"]
        assert event.service == SERVICE


# --- ignored ------------------------------------------------------------------------------------


async def _own_alert(api: Harness) -> dict[str, Any]:
    return incident_event(incident_key="opsapi-rollout-7")


async def _no_open_rollout(api: Harness) -> dict[str, Any]:
    rolled = await api.post("/canary/rollback", {"service": SERVICE, "reason": "by hand"})
    assert rolled.status_code == 200
    return fixture("incident_triggered")


async def _unmapped(api: Harness) -> dict[str, Any]:
    return incident_event(service_id="PUNKNWN")


async def _acknowledged(api: Harness) -> dict[str, Any]:
    return fixture("incident_acknowledged")


async def _ping(api: Harness) -> dict[str, Any]:
    return fixture("pagey_ping")


async def _not_qualifying(api: Harness) -> dict[str, Any]:
    return incident_event(priority="P4", urgency="low")


async def _no_service(api: Harness) -> dict[str, Any]:
    document = fixture("incident_triggered")
    del document["event"]["data"]["service"]
    return document


IGNORED = [
    pytest.param(_acknowledged, "event type incident.acknowledged does not act", id="acknowledged"),
    pytest.param(_ping, "event type pagey.ping does not act", id="pagey.ping"),
    pytest.param(_unmapped, "PagerDuty service PUNKNWN is not mapped", id="unmapped-service"),
    pytest.param(_not_qualifying, "does not qualify", id="not-qualifying"),
    pytest.param(_no_open_rollout, "no open rollout", id="no-open-rollout"),
    pytest.param(_own_alert, "opsapi's own alert opsapi-rollout-7", id="own-alert"),
    pytest.param(_no_service, "the event names no PagerDuty service", id="no-service"),
]


@pytest.mark.parametrize(("given", "reason"), IGNORED)
async def test_everything_else_is_2xx_ignored_and_audited_with_the_reason(
    hook: Harness, given: Any, reason: str
) -> None:
    # given a mapped service with an open rollout (rolled back by hand in one case)
    await mapped_rollout(hook)
    document = await given(hook)
    before = await rollout(hook)

    # when PagerDuty sends the event
    response = await deliver(hook, document)

    # then it is answered 2xx, nothing changes, and the reason is audited as ignored
    assert response.status_code == 200, response.text
    assert response.json()["outcome"] == "ignored"
    after = await rollout(hook)
    assert (after["state"], after["updated_at"]) == (before["state"], before["updated_at"])
    [event] = await webhook_events(hook)
    assert (event.action, event.outcome, event.actor) == (
        "pagerduty.webhook",
        "ignored",
        "pagerduty",
    )
    assert reason in event.details["reason"]
    assert event.details["event_id"] == document["event"]["id"]
    assert event.details["event_type"] == document["event"]["event_type"]


# --- replays ------------------------------------------------------------------------------------


async def test_a_replayed_event_acts_once(hook: Harness) -> None:
    # given a delivered incident.triggered that rolled back checkout
    await mapped_rollout(hook)
    body = body_of(fixture("incident_triggered"))
    assert (await deliver(hook, body)).json()["outcome"] == "rolled_back"
    # and a new rollout of the service since (past the incident's hold: an admin's break glass)
    body_v3 = {"service": SERVICE, "version": "v3", "break_glass": True, "reason": "the fix"}
    started = await hook.post("/canary/promote", body_v3, "admin")
    assert started.status_code == 200, started.text

    # when PagerDuty delivers the same event again (at-least-once delivery)
    again = await deliver(hook, body)

    # then it answers 2xx and does nothing: the new rollout is untouched
    assert again.status_code == 200, again.text
    assert again.json()["outcome"] == "ignored"
    assert again.json()["reason"] == "duplicate event"
    assert (await rollout(hook))["state"] == "progressing"
    events = await webhook_events(hook)
    assert [(e.action, e.outcome) for e in events] == [
        ("rollout.rolled_back", "success"),
        ("pagerduty.webhook", "ignored"),
    ]
    assert events[1].details["reason"] == "duplicate event"


async def test_concurrent_deliveries_of_one_event_act_once(hook: Harness) -> None:
    await mapped_rollout(hook)
    body = body_of(incident_event(event_id="01CONCURRENTDELIVERY"))

    answers = await asyncio.gather(*(deliver(hook, body) for _ in range(4)))

    assert [a.status_code for a in answers] == [200] * 4
    assert sorted(a.json()["outcome"] for a in answers) == ["ignored"] * 3 + ["rolled_back"]
    assert len(await hook.audit_events(action="rollout.rolled_back")) == 1
    duplicates = await hook.audit_events(action="pagerduty.webhook", outcome="ignored")
    assert [e.details["reason"] for e in duplicates] == ["duplicate event"] * 3


async def test_event_ids_are_forgotten_after_30_days(hook: Harness) -> None:
    assert (await deliver(hook, fixture("pagey_ping"))).status_code == 200
    purge = hook.app.state.pagerduty_worker.purge_events

    assert await purge() == 0  # remembered while PagerDuty may still redeliver
    hook.clock.advance(days=31)
    hook.app.state.pagerduty_worker._next_purge = None
    assert await purge() == 1
    again = await deliver(hook, fixture("pagey_ping"))
    assert again.json()["reason"] == "event type pagey.ping does not act"


# --- authentication -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "configured",
    [f"{OLD_SECRET},{SECRET}", OLD_SECRET, SECRET, f" {SECRET} , {OLD_SECRET} "],
    ids=["both", "old-only", "new-only", "spaces"],
)
async def test_rotation_any_configured_secret_matches_any_v1_entry(
    clean_url: str, key_file: Path, configured: str
) -> None:
    # given a header carrying two signatures, as PagerDuty sends during a secret rotation
    async with running_app(
        clean_url, key_file, pagerduty_webhook_secrets=configured, pagerduty_worker_enabled=False
    ) as api:
        await mapped_rollout(api)
        body = body_of(fixture("incident_triggered"))

        response = await deliver(api, body, header=signature(body, OLD_SECRET, SECRET))

        assert response.status_code == 200, response.text
        assert response.json()["outcome"] == "rolled_back"


async def test_secrets_come_from_the_environment_comma_separated(
    clean_url: str, key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPSAPI_PAGERDUTY_WEBHOOK_SECRETS", f"{OLD_SECRET},{SECRET}")
    assert Settings().webhook_secrets == [OLD_SECRET, SECRET]
    async with running_app(clean_url, key_file, pagerduty_worker_enabled=False) as api:
        await mapped_rollout(api)
        response = await deliver(api, fixture("incident_triggered"), OLD_SECRET)
        assert response.json()["outcome"] == "rolled_back"


def _tampered(body: bytes) -> tuple[bytes, str]:
    return body.replace(b"A little bump", b"A massive bump"), signature(body, SECRET)


def _missing(body: bytes) -> tuple[bytes, str]:
    return body, ""


def _other_prefix_only(body: bytes) -> tuple[bytes, str]:
    return body, signature(body, SECRET).replace("v1=", "v0=")


def _wrong_secret(body: bytes) -> tuple[bytes, str]:
    return body, signature(body, "whsec-someone-else")


def _uppercase_scheme(body: bytes) -> tuple[bytes, str]:
    return body, signature(body, SECRET).replace("v1=", "V1=")


def _bare_hex(body: bytes) -> tuple[bytes, str]:
    return body, signature(body, SECRET).removeprefix("v1=")


UNSIGNED = [
    pytest.param(_tampered, "signature mismatch", id="tampered-body"),
    pytest.param(_missing, "missing signature", id="missing-header"),
    pytest.param(_other_prefix_only, "no v1 signature", id="non-v1-prefix-only"),
    pytest.param(_wrong_secret, "signature mismatch", id="wrong-secret"),
    pytest.param(_uppercase_scheme, "no v1 signature", id="uppercase-scheme"),
    pytest.param(_bare_hex, "no v1 signature", id="bare-hex"),
]


@pytest.mark.parametrize(("forge", "reason"), UNSIGNED)
async def test_unsigned_or_badly_signed_is_401_audited_without_secrets(
    hook: Harness, forge: Any, reason: str
) -> None:
    # given a mapped service with an open rollout
    await mapped_rollout(hook)
    body, header = forge(body_of(fixture("incident_triggered")))

    # when a request arrives without a valid signature
    headers = {"Content-Type": "application/json"}
    if header:
        headers["X-PagerDuty-Signature"] = header
    response = await hook.client.post(
        "/internal/ops/webhooks/pagerduty", content=body, headers=headers
    )

    # then 401 problem+json, nothing done, nothing remembered
    assert response.status_code == 401, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["status"] == 401
    assert (await rollout(hook))["state"] == "progressing"
    async with hook.runtime.sessions() as session:
        assert await session.get(PagerDutyEvent, "01DEN2SN4OJM3HXZKPLB0SMTXB") is None
    # and one denied event by pagerduty, with neither the secret nor the signature in the log
    [event] = await webhook_events(hook)
    assert (event.action, event.outcome, event.actor) == (
        "pagerduty.webhook",
        "denied",
        "pagerduty",
    )
    assert event.details["reason"] == reason
    assert event.details["status"] == 401
    text = await audit_text(hook)
    assert SECRET not in text
    for part in header.split(","):
        if len(part) > 8:
            assert part.split("=")[-1] not in text
    assert SECRET not in response.text


async def test_without_a_configured_secret_everything_is_refused(
    clean_url: str, key_file: Path
) -> None:
    async with running_app(clean_url, key_file, pagerduty_worker_enabled=False) as api:
        await mapped_rollout(api)
        response = await deliver(api, fixture("incident_triggered"))
        assert response.status_code == 401
        [event] = await webhook_events(api)
        assert event.details["reason"] == "no webhook secret is configured"
        assert (await rollout(api))["state"] == "progressing"


# --- bodies -------------------------------------------------------------------------------------


async def test_oversize_body_is_413_before_anything_else(hook: Harness) -> None:
    await mapped_rollout(hook)
    document = fixture("incident_triggered")
    document["event"]["data"]["title"] = "x" * (70 * 1024)

    response = await deliver(hook, document)  # validly signed, but too large

    assert response.status_code == 413
    assert response.headers["content-type"].startswith("application/problem+json")
    assert (await rollout(hook))["state"] == "progressing"
    [event] = await webhook_events(hook)
    assert (event.outcome, event.details["status"]) == ("error", 413)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"messages": []}',
        b'{"event": {"event_type": "incident.triggered"}}',
    ],
    ids=["not-json", "array", "webhooks-v2", "no-event-id"],
)
async def test_signed_but_not_a_v3_event_is_400(hook: Harness, body: bytes) -> None:
    response = await deliver(hook, body)

    assert response.status_code == 400, response.text
    [event] = await webhook_events(hook)
    assert (event.outcome, event.details["status"]) == ("error", 400)


async def test_the_route_is_in_the_openapi_document(hook: Harness) -> None:
    document = (await hook.client.get("/internal/ops/openapi.json")).json()
    assert "post" in document["paths"]["/internal/ops/webhooks/pagerduty"]
    assert json.dumps(document).count("X-PagerDuty-Signature") >= 1


# --- odd text in a signed body (issue "Hardening" 8) ----------------------------------------


@pytest.mark.parametrize(
    "odd", [pytest.param("\u0000", id="NUL"), pytest.param("\ud800", id="lone-surrogate")]
)
async def test_a_signed_incident_with_odd_text_still_rolls_back(hook: Harness, odd: str) -> None:
    # given a mapped service with an open rollout
    rollout_id = await mapped_rollout(hook)
    # when PagerDuty sends a qualifying incident whose title (and summaries) carry a NUL or an
    # unpaired surrogate, which PostgreSQL cannot store (json.dumps writes them as \u escapes)
    document = incident_event()
    document["event"]["data"]["title"] = f"bump {odd} in the road"
    document["event"]["agent"]["summary"] = odd
    response = await deliver(hook, document)

    # then the rollback is done, and the odd character is stored as U+FFFD
    assert response.status_code == 200, response.text
    assert response.json()["outcome"] == "rolled_back"
    view = await rollout(hook)
    assert (view["id"], view["state"]) == (rollout_id, "rolled_back")
    assert '"bump \ufffd in the road"' in view["reason"]
    [event] = await webhook_events(hook)
    assert (event.action, event.outcome) == ("rollout.rolled_back", "success")
    assert event.details["incident"]["title"] == "bump \ufffd in the road"
    # and a redelivery of the same body is recognised as the same event
    again = await deliver(hook, document)
    assert (again.status_code, again.json()["reason"]) == (200, "duplicate event")


@pytest.mark.parametrize(
    "event_id",
    [
        pytest.param("01DEN\u0000X", id="NUL"),
        pytest.param("01DEN\ud800X", id="lone-surrogate"),
        pytest.param("01DEN X", id="space"),
        pytest.param("01DEN\u00e9X", id="non-ASCII"),
        pytest.param("x" * 129, id="too-long"),
        pytest.param("", id="empty"),
    ],
)
async def test_a_bad_event_id_is_400_audited_and_nothing_is_done(
    hook: Harness, event_id: str
) -> None:
    # given a mapped service with an open rollout
    await mapped_rollout(hook)
    # when a signed incident arrives whose event id is not an identifier
    response = await deliver(hook, incident_event(event_id=event_id))
    # then 400 problem+json, audited, and nothing is done or remembered
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "event id" in response.json()["detail"]
    assert (await rollout(hook))["state"] == "progressing"
    [event] = await webhook_events(hook)
    assert (event.actor, event.outcome, event.details["status"]) == ("pagerduty", "error", 400)
    async with hook.runtime.sessions() as session:
        assert (await session.exec(select(PagerDutyEvent))).all() == []


@pytest.mark.parametrize(
    ("body", "status"),
    [
        pytest.param(b"[" * 1000 + b"]" * 1000, 400, id="1000-levels"),
        pytest.param(
            b'{"event": {"id": "01X", "event_type": "pagey.ping", "n": NaN}}', 422, id="NaN"
        ),
        pytest.param(
            b'{"event": {"id": "01X", "event_type": "pagey.ping", "n": 1e999}}', 422, id="1e999"
        ),
    ],
)
async def test_a_signed_body_the_strict_reader_refuses_is_audited(
    hook: Harness, body: bytes, status: int
) -> None:
    response = await deliver(hook, body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    [event] = await webhook_events(hook)
    assert (event.actor, event.outcome, event.details["status"]) == ("pagerduty", "error", status)
