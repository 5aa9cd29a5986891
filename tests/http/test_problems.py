"""Errors as RFC 9457 problem+json, Idempotency-Key replays and X-Request-Id, end to end."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import pytest
from sqlmodel import col, select

from opsapi.canary.models import RolloutRecord
from tests.support.app import API, Harness

SERVICE = "checkout"


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """A problem+json answer with the RFC 9457 members and nothing that looks like a trace."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert isinstance(problem, dict)
    assert isinstance(problem["type"], str)
    assert isinstance(problem["title"], str)
    assert problem["title"]
    assert problem["status"] == status
    assert isinstance(problem["detail"], str)
    assert problem["detail"]
    assert "Traceback" not in response.text
    assert 'File "' not in response.text
    return problem  # type: ignore[no-any-return]


async def rollouts(api: Harness) -> list[dict[str, Any]]:
    async with api.runtime.sessions() as session:
        records = (await session.exec(select(RolloutRecord).order_by(col(RolloutRecord.id)))).all()
    return [record.model_dump() for record in records]


async def start_rollout(api: Harness) -> dict[str, Any]:
    response = await api.post("/canary/promote", {"service": SERVICE, "version": "v2"})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


# --- routing errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/nope", API + "/nope", API + "/canary/checkout/x/y"])
async def test_unknown_path_is_404_problem(api: Harness, path: str) -> None:
    response = await api.client.get(path, headers=api.auth("admin"))
    problem = assert_problem(response, 404)
    assert problem["title"] == "Not Found"


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/canary/promote", "POST"),
        ("PUT", "/canary/rollback", "POST"),
        ("POST", "/canary", "GET"),
        ("DELETE", "/services/checkout", None),
        ("PATCH", "/services/checkout", None),
    ],
)
async def test_wrong_method_is_405_problem(
    api: Harness, method: str, path: str, allowed: str | None
) -> None:
    response = await api.client.request(method, API + path, headers=api.auth("admin"))

    problem = assert_problem(response, 405)
    assert problem["title"] == "Method Not Allowed"
    if allowed is not None:
        assert allowed in response.headers["allow"]


# --- every error answer ------------------------------------------------------------------------


async def _errors(api: Harness) -> list[tuple[int, httpx.Response]]:
    """One of every kind of error the API answers, with the status it must have."""
    await start_rollout(api)
    c, auth = api.client, api.auth
    promote = API + "/canary/promote"
    return [
        (400, await c.post(promote, content=b"{", headers=auth("operator"))),
        (401, await c.post(promote, json={"service": SERVICE})),
        (401, await c.get(API + "/canary", headers={"Authorization": "Bearer x.y.z"})),
        (403, await api.post("/canary/promote", {"service": SERVICE}, role="viewer")),
        (403, await api.post("/canary/promote", {"service": SERVICE, "force": True})),
        (404, await api.get("/canary/unknown-service")),
        (404, await api.post("/canary/pause", {"service": "unknown-service"})),
        (404, await c.get(API + "/missing")),
        (405, await c.delete(promote)),
        (409, await api.post("/canary/promote", {"service": SERVICE})),
        (409, await api.post("/canary/resume", {"service": SERVICE})),
        (413, await c.post(promote, content=b" " * (65 * 1024), headers=auth("operator"))),
        (
            415,
            await c.post(
                promote,
                content=b"{}",
                headers={"Content-Type": "multipart/form-data; boundary=x", **auth("operator")},
            ),
        ),
        (422, await api.post("/canary/promote", [{"service": SERVICE}])),
        (422, await api.post("/canary/promote", {"service": "Bad Name", "extra": 1})),
        (422, await api.get("/canary/checkout/history?limit=1000")),
        (422, await api.get("/canary/checkout/history?cursor=abc")),
        (422, await api.put("/services/checkout", {"steps": []})),
    ]


async def test_every_error_is_a_problem_document_without_a_trace(api: Harness) -> None:
    for status, response in await _errors(api):
        problem = assert_problem(response, status)
        assert problem["type"] == "about:blank"


async def test_no_error_reaches_the_audit_log_with_a_trace(api: Harness) -> None:
    await _errors(api)
    events = await api.audit_events()
    assert any(event.outcome == "error" for event in events)
    assert "Traceback" not in json.dumps([event.model_dump(mode="json") for event in events])


# --- body errors -------------------------------------------------------------------------------


async def test_promote_body_that_is_an_array_is_422(api: Harness) -> None:
    response = await api.post("/canary/promote", [{"service": SERVICE, "version": "v2"}])

    problem = assert_problem(response, 422)
    assert problem["errors"]
    assert [error["field"] for error in problem["errors"]] == ["body"]
    assert await rollouts(api) == []


async def test_promote_body_with_wrong_types_is_422_naming_each_field(api: Harness) -> None:
    body = {"service": 42, "version": ["v2"], "force": "yes please", "target_percent": "lots"}

    response = await api.post("/canary/promote", body, role="admin")

    problem = assert_problem(response, 422)
    fields = {error["field"] for error in problem["errors"]}
    assert fields == {"service", "version", "force", "target_percent"}
    # the input is not echoed back
    assert "yes please" not in response.text
    assert "lots" not in response.text
    assert await rollouts(api) == []
    [event] = await api.audit_events()
    assert (event.action, event.outcome) == ("canary.promote", "error")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"service": SERVICE, "version": "v2", "target_percent": 0}, id="target-0"),
        pytest.param({"service": SERVICE, "version": "v2", "target_percent": 101}, id="target-101"),
        pytest.param({"service": SERVICE, "version": "v 2"}, id="version-space"),
        pytest.param({"service": SERVICE, "version": "v2", "colour": "red"}, id="unknown-field"),
        pytest.param({"version": "v2"}, id="no-service"),
        pytest.param({"service": SERVICE, "version": "v2", "reason": "x" * 2001}, id="long-reason"),
    ],
)
async def test_invalid_promote_body_is_422_and_starts_nothing(
    api: Harness, body: dict[str, Any]
) -> None:
    response = await api.post("/canary/promote", body, role="admin")

    problem = assert_problem(response, 422)
    assert problem["errors"]
    assert await rollouts(api) == []


# --- Idempotency-Key -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["", "has space", "x" * 256, "tab\tin"], ids=["empty", "space", "too-long", "tab"]
)
async def test_invalid_idempotency_key_is_400(api: Harness, key: str) -> None:
    response = await api.post(
        "/canary/promote", {"service": SERVICE, "version": "v2"}, **{"Idempotency-Key": key}
    )

    assert_problem(response, 400)
    assert await rollouts(api) == []
    [event] = await api.audit_events()
    assert (event.outcome, event.details["status"]) == ("error", 400)


async def test_longest_valid_idempotency_key_is_accepted(api: Harness) -> None:
    key = "~" * 255
    body = {"service": SERVICE, "version": "v2"}
    first = await api.post("/canary/promote", body, **{"Idempotency-Key": key})
    again = await api.post("/canary/promote", body, **{"Idempotency-Key": key})
    assert first.status_code == again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"


async def test_idempotency_key_replay_returns_the_first_response(api: Harness) -> None:
    # given a rollout at 10 % whose wait has elapsed
    await start_rollout(api)
    api.clock.advance(minutes=30)
    body = {"service": SERVICE, "reason": "looks good"}
    key = {"Idempotency-Key": "promote-7f3c"}

    # when an operator promotes with an Idempotency-Key
    first = await api.post("/canary/promote", body, **key)
    assert first.status_code == 200, first.text
    assert first.json()["desired_weight"] == 25
    assert "idempotent-replayed" not in first.headers
    after_first = await rollouts(api)
    transitions = await api.audit_events(action="canary.promote", outcome="success")

    # and retries the same request later, when 25 % would itself be ready to advance
    api.clock.advance(minutes=15)
    again = await api.post("/canary/promote", body, **key)

    # then the retry gets the first answer byte for byte, marked as a replay
    assert again.status_code == 200
    assert again.content == first.content
    assert again.headers["content-type"] == first.headers["content-type"]
    assert again.headers["idempotent-replayed"] == "true"
    # and nothing changed: still 25 %, not 50 %
    assert await rollouts(api) == after_first
    assert (await api.get(f"/canary/{SERVICE}")).json()["desired_weight"] == 25
    # and the replay is audited as a replay, not as another promotion
    events = await api.audit_events(action="canary.promote", outcome="success")
    assert len(events) == len(transitions) + 1
    assert events[-1].details == {"idempotent_replay": True, "status": 200}

    # while the same request without the key does promote
    fresh = await api.post("/canary/promote", body)
    assert fresh.status_code == 200, fresh.text
    assert fresh.json()["desired_weight"] == 50


async def test_idempotency_key_replays_a_refusal_too(api: Harness) -> None:
    # given a refused promote (no open rollout and no version) made with a key
    key = {"Idempotency-Key": "k-409"}
    first = await api.post("/canary/promote", {"service": SERVICE}, **key)
    assert_problem(first, 409)

    # when it is retried after a rollout exists
    await start_rollout(api)
    api.clock.advance(minutes=30)
    again = await api.post("/canary/promote", {"service": SERVICE}, **key)

    # then the first refusal is replayed and the rollout stays at 10 %
    assert_problem(again, 409)
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert (await api.get(f"/canary/{SERVICE}")).json()["desired_weight"] == 10


async def test_same_idempotency_key_with_a_different_body_is_422(api: Harness) -> None:
    # given a rollout started with a key
    key = {"Idempotency-Key": "start-checkout"}
    first = await api.post("/canary/promote", {"service": SERVICE, "version": "v2"}, **key)
    assert first.status_code == 200, first.text
    before = await rollouts(api)

    # when the key is reused for a different request
    api.clock.advance(minutes=30)
    other = await api.post("/canary/promote", {"service": SERVICE, "reason": "next"}, **key)

    # then 422 and nothing happened
    assert_problem(other, 422)
    assert "idempotent-replayed" not in other.headers
    assert await rollouts(api) == before
    [event] = (await api.audit_events())[-1:]
    assert (event.outcome, event.details["idempotency_key"]) == ("error", "start-checkout")


async def test_idempotency_keys_belong_to_their_caller(api: Harness) -> None:
    # given alice started a rollout with a key
    key = {"Idempotency-Key": "shared-key"}
    body = {"service": SERVICE, "version": "v2"}
    alice = await api.client.post(
        API + "/canary/promote", json=body, headers={**api.auth("operator", "alice"), **key}
    )
    assert alice.status_code == 200, alice.text

    # when bob sends the same request with the same key
    bob = await api.client.post(
        API + "/canary/promote", json=body, headers={**api.auth("operator", "bob"), **key}
    )

    # then bob's request is his own (refused: a rollout is open), not a replay of alice's answer
    assert bob.status_code == 409, bob.text
    assert "idempotent-replayed" not in bob.headers


# --- X-Request-Id ------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["operator", None], ids=["allowed", "anonymous"])
async def test_request_id_is_echoed_and_audited(api: Harness, role: str | None) -> None:
    headers = {"X-Request-Id": "req-2026.11:abc_DEF", **(api.auth(role) if role else {})}

    response = await api.client.post(
        API + "/canary/promote", json={"service": SERVICE, "version": "v2"}, headers=headers
    )

    assert response.status_code == (200 if role else 401)
    assert response.headers["x-request-id"] == "req-2026.11:abc_DEF"
    [event] = await api.audit_events()
    assert event.request_id == "req-2026.11:abc_DEF"


@pytest.mark.parametrize(
    "supplied", ["has space", "x" * 65, "semi;colon", ""], ids=["space", "65", "semicolon", "empty"]
)
async def test_an_unusable_request_id_is_replaced(api: Harness, supplied: str) -> None:
    response = await api.client.get(
        API + "/canary", headers={"X-Request-Id": supplied, **api.auth("viewer")}
    )

    assert response.status_code == 200
    generated = response.headers["x-request-id"]
    assert generated != supplied
    assert re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", generated)
    [event] = await api.audit_events()
    assert event.request_id == generated


async def test_each_request_gets_its_own_request_id(api: Harness) -> None:
    first = await api.get("/canary")
    second = await api.get("/canary")
    assert first.headers["x-request-id"] != second.headers["x-request-id"]
    events = await api.audit_events()
    assert [e.request_id for e in events] == [
        first.headers["x-request-id"],
        second.headers["x-request-id"],
    ]


async def test_concurrent_retries_with_one_key_act_once(api: Harness) -> None:
    # when a client fires the same keyed request six times at once
    key = {"Idempotency-Key": "burst-1"}
    body = {"service": SERVICE, "version": "v2"}
    responses = await asyncio.gather(*[api.post("/canary/promote", body, **key) for _ in range(6)])

    # then one rollout starts, and every answer is the same bytes, five of them replays
    assert [r.status_code for r in responses] == [200] * 6
    assert len({r.content for r in responses}) == 1
    assert (
        sorted(r.headers.get("idempotent-replayed", "") for r in responses) == [""] + ["true"] * 5
    )
    assert len(await rollouts(api)) == 1


async def test_a_refused_request_is_audited_with_the_service_it_named(api: Harness) -> None:
    response = await api.post("/canary/promote", {"service": "checkout", "version": "v2"}, "viewer")

    assert response.status_code == 403
    assert "canary.promote requires the operator role" in response.json()["detail"]
    [event] = await api.audit_events(outcome="denied")
    assert event.service == "checkout"


async def test_a_nul_character_is_refused_and_changes_nothing(api: Harness) -> None:
    await api.post("/canary/promote", {"service": "checkout", "version": "v2"})

    response = await api.post("/canary/rollback", {"service": "checkout", "reason": "bad\u0000"})

    assert response.status_code == 422
    assert (await api.get("/canary/checkout")).json()["state"] == "progressing"
