"""Who may call what: every /internal/ops route against every kind of caller, end to end.

Real app, real PostgreSQL (a fresh database per case), real tokens from the embedded signer.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from sqlmodel import col, select

from opsapi.canary.models import RejectedVersion, RolloutRecord, ServiceRecord
from opsapi.runtime import flush_polls
from opsapi.storage.idempotency import IdempotencyRecord
from tests.support.app import API, Harness

SERVICE = "checkout"

# Callers, in the order of the matrix's columns.
CALLERS = (None, "viewer", "operator", "admin", "auditor")

# fmt: off
# The RBAC matrix: (method, path, state before the request) -> status per caller.
# "started" = an open rollout at its first step; "paused" = the same rollout, paused;
# "succeeded" = v2 released to 100 % after v1 (a revert goes back to v1).
RBAC: dict[tuple[str, str, str], tuple[int, int, int, int, int]] = {
    #  method  path                            given          none viewer operator admin auditor
    ("POST", "/canary/promote",               "nothing"):   (401,  403,   200,    200,  403),
    ("POST", "/canary/rollback",              "started"):   (401,  403,   200,    200,  403),
    ("POST", "/canary/revert",                "succeeded"): (401,  403,   200,    200,  403),
    ("POST", "/canary/pause",                 "started"):   (401,  403,   200,    200,  403),
    ("POST", "/canary/resume",                "paused"):    (401,  403,   200,    200,  403),
    ("GET",  "/canary",                       "started"):   (401,  200,   200,    200,  200),
    ("GET",  "/canary/checkout",              "started"):   (401,  200,   200,    200,  200),
    ("GET",  "/canary/checkout/history",      "started"):   (401,  200,   200,    200,  200),
    ("GET",  "/canary/checkout/weight",       "started"):   (401,  200,   200,    200,  200),
    ("GET",  "/rollouts/1/evaluations",       "started"):   (401,  200,   200,    200,  200),
    ("GET",  "/services",                     "started"):   (401,  200,   200,    200,  200),
    ("GET",  "/services/checkout",            "nothing"):   (401,  200,   200,    200,  200),
    ("PUT",  "/services/checkout",            "nothing"):   (401,  403,   403,    200,  403),
    ("GET",  "/services/checkout/rejections", "nothing"):   (401,  200,   200,    200,  200),
    ("POST", "/services/checkout/rejections/lift", "rejected"): (401, 403,  403,    200,  403),
    ("GET",  "/freezes",                      "nothing"):   (401,  200,   200,    200,  200),
    ("POST", "/freezes",                      "nothing"):   (401,  403,   403,    201,  403),
    ("DELETE", "/freezes/1",                  "frozen"):    (401,  403,   403,    200,  403),
    # each operation's own role is covered in tests/execute/test_execute.py
    ("POST", "/execute",                      "nothing"):   (401,  200,   200,    200,  200),
    ("GET",  "/openapi.json",                 "nothing"):   (200,  200,   200,    200,  200),
    ("GET",  "/audit?service=checkout",       "started"):   (401,  403,   403,    403,  200),
    ("GET",  "/audit/export?format=csv",      "started"):   (401,  403,   403,    403,  200),
    ("GET",  "/audit/verify",                 "started"):   (401,  403,   403,    403,  200),
}
# fmt: on

# Routes outside the JWT matrix. The PagerDuty webhook is authenticated by its HMAC signature
# (X-PagerDuty-Signature), never by a token or a role; tests/pagerduty/test_webhook.py covers
# its authentication (valid, rotated, tampered, missing, wrong-prefix signatures, all audited).
NOT_JWT = {("POST", "/webhooks/pagerduty")}

NEW_POLICY = {
    "steps": [{"weight": 50, "wait": "5m"}, {"weight": 100, "wait": "1h"}],
    "interval": "30s",
}

# Bodies that succeed for an authorised caller in the given state.
BODIES: dict[tuple[str, str], Any] = {
    ("POST", "/canary/promote"): {"service": SERVICE, "version": "v2", "reason": "release"},
    ("POST", "/canary/rollback"): {"service": SERVICE, "reason": "error rate up"},
    ("POST", "/canary/revert"): {"service": SERVICE, "reason": "v2 leaks memory"},
    ("POST", "/canary/pause"): {"service": SERVICE, "reason": "investigating"},
    ("POST", "/canary/resume"): {"service": SERVICE},
    ("PUT", "/services/checkout"): NEW_POLICY,
    ("POST", "/execute"): {"operation": "health-check"},
    ("POST", "/services/checkout/rejections/lift"): {"version": "v2", "reason": "fixed config"},
    ("POST", "/freezes"): {
        "name": "release-train",
        "services": ["checkout"],
        "reason": "audit",
        "cron": "0 17 * * FRI",
        "duration": "64h",
        "timezone": "Europe/Berlin",
    },
}

PUBLIC = {("GET", "/openapi.json")}


def _cases() -> list[Any]:
    cases = []
    for (method, path, given), statuses in RBAC.items():
        for caller, status in zip(CALLERS, statuses, strict=True):
            case_id = f"{method} {path} as {caller or 'anonymous'} -> {status}"
            cases.append(pytest.param(method, path, given, caller, status, id=case_id))
    return cases


async def given_state(api: Harness, given: str) -> None:
    """Put the database in the named state (through the API, as an operator)."""
    if given == "nothing":
        return
    if given == "rejected":
        await reject_v2(api)
        return
    if given == "frozen":
        freeze = {"name": "f", "services": ["*"], "reason": "r", "cron": "0 0 1 1 *",
                  "duration": "1h"}  # fmt: skip
        assert (await api.post("/freezes", freeze, role="admin")).status_code == 201
        return
    if given == "succeeded":
        body = {"service": SERVICE, "version": "v2", "stable_version": "v1", "target_percent": 100}
        assert (await api.post("/canary/promote", body, role="admin")).status_code == 200
        done = await api.post("/canary/promote", {"service": SERVICE, "force": True}, role="admin")
        assert done.json()["state"] == "succeeded", done.text
        return
    started = await api.post("/canary/promote", {"service": SERVICE, "version": "v2"})
    assert started.status_code == 200, started.text
    if given == "paused":
        paused = await api.post("/canary/pause", {"service": SERVICE})
        assert paused.status_code == 200, paused.text
        assert paused.json()["state"] == "paused"


async def reject_v2(api: Harness) -> None:
    """v2 rolled back by an incident: a standing rejection (written as the interpreter does)."""
    async with api.runtime.sessions() as session, session.begin():
        session.add(RejectedVersion(service=SERVICE, version="v2", reason="incident",
                                    rejected_at=api.clock()))  # fmt: skip


async def send(
    api: Harness, method: str, path: str, body: Any, token: str | None, **headers: str
) -> httpx.Response:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return await api.client.request(
        method,
        API + path,
        content=None if body is None else json.dumps(body).encode(),
        headers={**({"Content-Type": "application/json"} if body is not None else {}), **headers},
    )


async def snapshot(api: Harness) -> dict[str, list[dict[str, Any]]]:
    """Every row a request could change (audit aside)."""
    async with api.runtime.sessions() as session:
        rollouts = (await session.exec(select(RolloutRecord).order_by(col(RolloutRecord.id)))).all()
        services = (await session.exec(select(ServiceRecord))).all()
        keys = (await session.exec(select(IdempotencyRecord))).all()
    return {
        "rollouts": [r.model_dump() for r in rollouts],
        "services": [s.model_dump() for s in services],
        "idempotency": [k.model_dump() for k in keys],
    }


async def audit_text(api: Harness) -> str:
    """Every audit event, every column, as one string."""
    events = await api.audit_events()
    return json.dumps([event.model_dump(mode="json") for event in events])


def assert_no_token_in(text: str, token: str) -> None:
    assert token not in text
    for part in token.split("."):
        if len(part) >= 16:
            assert part not in text


def assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.headers["www-authenticate"].split()[0] == "Bearer"
    problem = response.json()
    assert problem["status"] == 401
    assert problem["title"] == "Unauthorized"


@pytest.mark.parametrize(("method", "path", "given", "caller", "expected"), _cases())
async def test_rbac_matrix(
    api: Harness, method: str, path: str, given: str, caller: str | None, expected: int
) -> None:
    # given the state the route needs to succeed, in a fresh database
    await given_state(api, given)
    before = await snapshot(api)
    events_before = len(await api.audit_events())
    token = api.token(caller) if caller else None

    # when the caller sends a request that would succeed for an authorised caller
    response = await send(api, method, path, BODIES.get((method, path)), token)

    # then the matrix's status is answered
    assert response.status_code == expected, response.text
    if path.endswith("/weight") and response.status_code == 200:
        # the data plane's polls are audited per caller, service and minute
        assert await flush_polls(api.runtime, final=True) == 1
        # and the pull router records the first fetch of the weight as applied (by the system)
        await api.runtime.weights.settle()
    new_events = (await api.audit_events())[events_before:]
    if path.endswith("/weight") and response.status_code == 200:
        applied = [e for e in new_events if e.action == "router.apply"]
        assert [(e.actor, e.details["reason"]) for e in applied] == [
            ("router", f"fetched by {caller}-user")
        ]
        new_events = [e for e in new_events if e.action != "router.apply"]
    if (method, path) in PUBLIC:
        assert "paths" in response.json()
        return
    # and exactly one audit event tells who did (or tried) what
    assert len(new_events) == 1, [e.model_dump() for e in new_events]
    event = new_events[0]
    if event.action == "canary.weight.polls":
        assert (event.actor, event.outcome, event.details["polls"]) == (
            f"{caller}-user",
            "success",
            1,
        )
        return
    assert event.details["status"] == expected
    assert event.actor == (f"{caller}-user" if caller else "anonymous")
    assert event.request_id == response.headers["x-request-id"]
    if expected in (401, 403):
        # a refusal is audited as denied and changes nothing
        assert event.outcome == "denied"
        assert await snapshot(api) == before
        if expected == 401:
            assert_unauthorized(response)
            assert event.roles == []
        else:
            assert response.headers["content-type"].startswith("application/problem+json")
            assert event.roles == [caller]
    else:
        assert 200 <= expected < 300
        assert event.outcome == "success"
    # and the token never reaches the audit log
    if token is not None:
        assert_no_token_in(await audit_text(api), token)


async def test_matrix_covers_every_api_route(api: Harness) -> None:
    """A route added to the app but not to the matrix fails here."""
    mount = next(r for r in api.app.routes if getattr(r, "path", None) == API)
    served = {
        (method, route.path)
        for route in mount.routes  # type: ignore[attr-defined]
        for method in route.methods - {"HEAD"}
    }
    in_matrix = {
        (
            method,
            path.partition("?")[0]
            .replace(f"/{SERVICE}", "/{service}")
            .replace("/1/", "/{rollout_id}/")
            .replace("/freezes/1", "/freezes/{freeze_id}"),
        )
        for method, path, _ in RBAC
    }
    assert served - NOT_JWT == in_matrix
    assert served >= NOT_JWT


# --- privileged parts of promote ------------------------------------------------------------

# (extra body, audited action, minutes waited at 10 %, weight an admin reaches)
PRIVILEGED = [
    pytest.param({"force": True}, "canary.promote.force", 0, 25, id="force"),
    # a jump still needs the current step to be ready; it skips 25 % and 50 %
    pytest.param({"target_percent": 75}, "canary.promote.target", 30, 75, id="target_percent"),
]


@pytest.mark.parametrize(("extra", "action", "waited", "admin_weight"), PRIVILEGED)
async def test_privileged_promote_is_refused_to_an_operator(
    api: Harness, extra: dict[str, Any], action: str, waited: int, admin_weight: int
) -> None:
    # given a rollout at 10 %
    await given_state(api, "started")
    api.clock.advance(minutes=waited)
    before = await snapshot(api)

    # when an operator promotes with a privileged option
    response = await api.post("/canary/promote", {"service": SERVICE, **extra}, role="operator")

    # then it is forbidden, audited as denied under the privileged action, and nothing moved
    assert response.status_code == 403, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert await snapshot(api) == before
    [event] = await api.audit_events(action=action)
    assert (event.outcome, event.actor) == ("denied", "operator-user")
    assert (await api.get(f"/canary/{SERVICE}")).json()["desired_weight"] == 10


@pytest.mark.parametrize(("extra", "action", "waited", "admin_weight"), PRIVILEGED)
async def test_privileged_promote_is_allowed_to_an_admin(
    api: Harness, extra: dict[str, Any], action: str, waited: int, admin_weight: int
) -> None:
    # given a rollout at 10 %
    await given_state(api, "started")
    api.clock.advance(minutes=waited)

    # when an admin promotes with the privileged option
    response = await api.post("/canary/promote", {"service": SERVICE, **extra}, role="admin")

    # then the rollout moves where a plain promote could not take it
    assert response.status_code == 200, response.text
    assert response.json()["desired_weight"] == admin_weight
    [event] = await api.audit_events(action=action)
    assert (event.outcome, event.actor) == ("success", "admin-user")


async def test_operator_cannot_start_a_rollout_at_a_target(api: Harness) -> None:
    # when an operator starts a rollout directly at 50 %
    body = {"service": SERVICE, "version": "v2", "target_percent": 50}
    response = await api.post("/canary/promote", body, role="operator")

    # then it is forbidden and no rollout exists
    assert response.status_code == 403, response.text
    assert await api.rollouts(SERVICE) == []
    # while an admin may
    response = await api.post("/canary/promote", body, role="admin")
    assert response.status_code == 200, response.text
    assert response.json()["desired_weight"] == 50


async def test_explicit_false_force_is_not_privileged(api: Harness) -> None:
    body = {"service": SERVICE, "version": "v2", "force": False, "target_percent": None}
    response = await api.post("/canary/promote", body, role="operator")
    assert response.status_code == 200, response.text
    assert response.json()["desired_weight"] == 10


# --- bad credentials -------------------------------------------------------------------------


def _expired(api: Harness) -> str:
    return api.signer.mint(subject="old", roles=["admin"], now=time.time() - 7200, ttl_seconds=60)


def _tampered(api: Harness) -> str:
    header, _, signature = api.token("viewer").split(".")
    forged = api.token("admin").split(".")[1]
    return f"{header}.{forged}.{signature}"


BAD_CREDENTIALS = [
    pytest.param(lambda api: "Bearer not-a-jwt-but-a-secret-1234567890", id="garbage"),
    pytest.param(lambda api: f"Bearer {_expired(api)}", id="expired"),
    pytest.param(lambda api: f"Bearer {_tampered(api)}", id="tampered"),
    pytest.param(lambda api: f"Basic {api.token('admin')}", id="wrong-scheme"),
    pytest.param(lambda api: "Bearer ", id="empty"),
    pytest.param(lambda api: api.token("admin"), id="no-scheme"),
]


@pytest.mark.parametrize("authorization", BAD_CREDENTIALS)
async def test_bad_credentials_are_401_audited_and_never_logged(
    api: Harness, authorization: Any
) -> None:
    header = authorization(api)
    token = header.split(" ", 1)[-1]

    # when a caller promotes with credentials that do not authenticate
    response = await api.client.post(
        API + "/canary/promote",
        json={"service": SERVICE, "version": "v2"},
        headers={"Authorization": header},
    )

    # then 401 problem+json, one denied event by "anonymous", no rollout, no token in the log
    assert_unauthorized(response)
    assert await api.rollouts(SERVICE) == []
    [event] = await api.audit_events()
    assert (event.outcome, event.actor, event.action) == ("denied", "anonymous", "canary.promote")
    if len(token.strip()) >= 16:
        assert_no_token_in(await audit_text(api), token.strip())
        assert token.strip() not in response.text


async def test_valid_token_text_never_in_audit_details(api: Harness) -> None:
    # given a session of successful and refused calls by several roles
    tokens = {role: api.token(role) for role in ("viewer", "operator", "admin")}
    body = {"service": SERVICE, "version": "v2"}
    for role in ("viewer", "operator", "admin"):
        auth = {"Authorization": f"Bearer {tokens[role]}"}
        await api.client.post(API + "/canary/promote", json=body, headers=auth)
        await api.client.put(API + f"/services/{SERVICE}", json=NEW_POLICY, headers=auth)
        await api.client.get(API + f"/canary/{SERVICE}", headers=auth)
    outcomes = {e.outcome for e in await api.audit_events()}
    assert outcomes >= {"success", "denied", "conflict"}

    # then no audit event holds any of the tokens
    text = await audit_text(api)
    for token in tokens.values():
        assert_no_token_in(text, token)
