"""Hostile input gets a clear 4xx problem, audited, never a 500 (issue "Hardening" 5, 7, 10).

Real app on real PostgreSQL. Bodies: one strict JSON reader (depth, NaN/Infinity, lone
surrogates, NUL). Query and path parameters: one typed parser (ASCII digits, bounded length,
the column's range, text without control characters). X-Forwarded-For from a trusted proxy:
only an address is believed.
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.pagerduty import SECRET, deliver
from tests.support.app import API, Harness, running_app

# Every route that reads a JSON body, with a body it would accept.
BODY_ROUTES = [
    ("POST", "/canary/promote"),
    ("POST", "/canary/rollback"),
    ("POST", "/canary/revert"),
    ("POST", "/canary/pause"),
    ("POST", "/canary/resume"),
    ("POST", "/execute"),
    ("PUT", "/services/checkout"),
]
DEEP = 1000


def nested(depth: int, leaf: str = "1") -> bytes:
    """`depth` nested arrays around `leaf` (the top-level array counts as level 1)."""
    return ("[" * depth + leaf + "]" * depth).encode()


def problem_of(response: Any) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/problem+json"), response.text
    body = response.json()
    assert {"type", "title", "status", "detail"} <= body.keys()
    assert body["status"] == response.status_code
    assert "Traceback" not in response.text
    return dict(body)


async def send(
    api: Harness, method: str, path: str, body: bytes, role: str | None = "admin"
) -> Any:
    headers = {"Content-Type": "application/json"}
    if role is not None:
        headers.update(api.auth(role))
    return await api.client.request(method, API + path, content=body, headers=headers)


async def last_event(api: Harness) -> Any:
    events = await api.audit_events()
    assert events, "the refusal was not audited"
    return events[-1]


# --- item 5: bodies ------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
async def test_deeply_nested_body_is_400_audited_with_or_without_a_token(
    api: Harness, method: str, path: str
) -> None:
    body = nested(DEEP)  # ~2 KB
    # when an anonymous caller sends 1,000 nested arrays: 401 (authentication comes first)
    anonymous = await send(api, method, path, body, role=None)
    assert anonymous.status_code == 401, anonymous.text
    problem_of(anonymous)
    assert (await last_event(api)).details["status"] == 401
    # when an admin does: 400 problem, audited
    response = await send(api, method, path, body)
    assert response.status_code == 400, response.text
    assert "nested" in problem_of(response)["detail"]
    event = await last_event(api)
    assert (event.outcome, event.details["status"], event.actor) == ("error", 400, "admin-user")


async def test_nesting_is_bounded_at_32_levels(api: Harness) -> None:
    # given a promote body whose `reason` is nested arrays: 32 levels in all is still JSON
    # we read (the model refuses it: 422); one more is refused by the reader (400)
    def body(depth: int) -> bytes:
        return b'{"service": "checkout", "reason": ' + nested(depth - 1) + b"}"

    within = await send(api, "POST", "/canary/promote", body(32))
    beyond = await send(api, "POST", "/canary/promote", body(33))
    assert (within.status_code, beyond.status_code) == (422, 400)
    assert "32" in problem_of(beyond)["detail"]


# (body, status): JSON that Python would read but we do not accept.
ODD_BODIES = [
    # (refused with the field named, like any other value out of range)
    pytest.param(b'{"service": "checkout", "reason": NaN}', 422, id="NaN"),
    pytest.param(b'{"service": "checkout", "reason": Infinity}', 422, id="Infinity"),
    pytest.param(b'{"service": "checkout", "reason": -Infinity}', 422, id="-Infinity"),
    pytest.param(b'{"service": "checkout", "reason": "a\\ud800b"}', 422, id="lone-high-surrogate"),
    pytest.param(b'{"service": "checkout", "reason": "\\udc00"}', 422, id="lone-low-surrogate"),
    pytest.param(b'{"service": "checkout", "\\ud800": 1}', 422, id="surrogate-in-a-key"),
    pytest.param(b'{"service": "checkout", "reason": "a\\u0000b"}', 422, id="NUL"),
    pytest.param(b'{"service": "checkout", "reason": "\xff"}', 400, id="not-UTF-8"),
]


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
@pytest.mark.parametrize(("body", "status"), ODD_BODIES)
async def test_odd_json_is_refused_at_parse_and_audited(
    api: Harness, method: str, path: str, body: bytes, status: int
) -> None:
    response = await send(api, method, path, body)
    assert response.status_code == status, response.text
    problem_of(response)
    event = await last_event(api)
    assert (event.outcome, event.details["status"]) == ("error", status)
    assert await api.rollouts("checkout") == []


async def test_an_escaped_backslash_before_u_is_ordinary_text(api: Harness) -> None:
    # "\\ud800" and "\\u0000" are a backslash and letters, not a surrogate or NUL
    body = b'{"service": "checkout", "version": "v2", "reason": "\\\\ud800 \\\\u0000"}'
    response = await send(api, "POST", "/canary/promote", body)
    assert response.status_code == 200, response.text
    assert response.json()["reason"] == "\\ud800 \\u0000"


async def test_a_deeply_nested_webhook_is_400_audited(pg_url: str, key_file: Path) -> None:
    async with running_app(
        pg_url, key_file, pagerduty_webhook_secrets=SECRET, pagerduty_worker_enabled=False
    ) as api:
        response = await deliver(api, nested(DEEP))  # validly signed
        assert response.status_code == 400, response.text
        problem_of(response)
        event = await last_event(api)
        assert (event.actor, event.outcome, event.details["status"]) == ("pagerduty", "error", 400)


# --- item 7: query and path parameters -----------------------------------------------------------

DIGITS_4300 = "9" * 4300
BEYOND_INT = str(2**31)  # rollout ids: PostgreSQL integer
BEYOND_BIGINT = str(2**63)  # evaluation and audit ids: bigint

# (path, role, the parameter the problem must name)
BAD_PARAMETERS = [
    ("/canary/checkout/history?limit=%C2%B2", "viewer", "limit"),
    ("/canary/checkout/history?limit=" + DIGITS_4300, "viewer", "limit"),
    ("/canary/checkout/history?limit=0", "viewer", "limit"),
    ("/canary/checkout/history?limit=-1", "viewer", "limit"),
    ("/canary/checkout/history?limit=%201", "viewer", "limit"),
    ("/canary/checkout/history?cursor=%C2%B2", "viewer", "cursor"),
    ("/canary/checkout/history?cursor=" + DIGITS_4300, "viewer", "cursor"),
    ("/canary/checkout/history?cursor=" + BEYOND_INT, "viewer", "cursor"),
    ("/rollouts/%C2%B2/evaluations", "viewer", "rollout_id"),
    ("/rollouts/" + BEYOND_INT + "/evaluations", "viewer", "rollout_id"),
    ("/rollouts/" + DIGITS_4300 + "/evaluations", "viewer", "rollout_id"),
    ("/rollouts/0/evaluations", "viewer", "rollout_id"),
    ("/rollouts/1/evaluations?limit=%C2%B2", "viewer", "limit"),
    ("/rollouts/1/evaluations?limit=" + DIGITS_4300, "viewer", "limit"),
    ("/rollouts/1/evaluations?cursor=%C2%B2", "viewer", "cursor"),
    ("/rollouts/1/evaluations?cursor=" + BEYOND_BIGINT, "viewer", "cursor"),
    ("/rollouts/1/evaluations?gate=a%00b", "viewer", "gate"),
    ("/rollouts/1/evaluations?gate=a%0Ab", "viewer", "gate"),
    ("/rollouts/1/evaluations?gate=" + "g" * 64, "viewer", "gate"),
    ("/audit?limit=%C2%B2", "auditor", "limit"),
    ("/audit?limit=" + DIGITS_4300, "auditor", "limit"),
    ("/audit?limit=1001", "auditor", "limit"),
    ("/audit?rollout_id=" + BEYOND_INT, "auditor", "rollout_id"),
    ("/audit?rollout_id=%C2%B2", "auditor", "rollout_id"),
    ("/audit?actor=a%00b", "auditor", "actor"),
    ("/audit?actor=a%0Ab", "auditor", "actor"),
    ("/audit?service=%C3%97%C2%9B", "auditor", "service"),  # a C1 control character
    ("/audit/export?format=csv&action=" + "a" * 65, "auditor", "action"),
    ("/audit/export?format=csv&rollout_id=" + DIGITS_4300, "auditor", "rollout_id"),
    ("/audit/export?format=ndjson&service=a%00b", "auditor", "service"),
    ("/audit/verify?since_id=%C2%B2", "auditor", "since_id"),
    ("/audit/verify?since_id=" + BEYOND_BIGINT, "auditor", "since_id"),
    ("/audit/verify?since_id=" + DIGITS_4300, "auditor", "since_id"),
]


@pytest.fixture
async def with_rollout(api: Harness) -> Harness:
    """The app with rollout 1 open on checkout."""
    started = await api.post("/canary/promote", {"service": "checkout", "version": "v2"})
    assert (started.status_code, started.json()["id"]) == (200, 1), started.text
    return api


@pytest.mark.parametrize(("path", "role", "name"), BAD_PARAMETERS)
async def test_bad_parameters_are_422_naming_the_parameter_and_audited(
    with_rollout: Harness, path: str, role: str, name: str
) -> None:
    api = with_rollout
    response = await api.client.get(API + path, headers=api.auth(role))
    assert response.status_code == 422, response.text[:500]
    assert name in problem_of(response)["detail"]
    assert len(response.content) < 1000  # the bad value is not echoed back
    event = await last_event(api)
    assert (event.outcome, event.details["status"]) == ("error", 422)


# (path, role): the well-formed edges of every range are accepted.
GOOD_PARAMETERS = [
    "/canary/checkout/history?limit=1&cursor=" + str(2**31 - 1),
    "/canary/checkout/history?limit=100",
    "/rollouts/1/evaluations?limit=1000&cursor=" + str(2**63 - 1) + "&gate=error-rate",
    "/rollouts/1/evaluations?gate=" + "g" * 63,
]


@pytest.mark.parametrize("path", GOOD_PARAMETERS)
async def test_parameters_at_the_edges_of_their_ranges_are_accepted(
    with_rollout: Harness, path: str
) -> None:
    response = await with_rollout.get(path)
    assert response.status_code == 200, response.text


async def test_an_unknown_rollout_within_range_is_404(api: Harness) -> None:
    response = await api.get(f"/rollouts/{2**31 - 1}/evaluations")
    assert response.status_code == 404, response.text


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/audit?limit=1000&rollout_id=" + str(2**31 - 1), 200),
        # read as an id; there is no such event (since_id must name one)
        ("/audit/verify?since_id=" + str(2**63 - 1), 422),
    ],
)
async def test_audit_parameters_at_the_edges_are_read(api: Harness, path: str, status: int) -> None:
    response = await api.get(path, role="auditor")
    assert response.status_code == status, response.text
    if status == 422:
        assert "no audit event" in response.json()["detail"]


# --- item 10: X-Forwarded-For ----------------------------------------------------------------

PEER = "198.51.100.7"  # the test client's address, configured as a trusted proxy below
FORWARDED = [
    ("203.0.113.5", "203.0.113.5"),
    ("203.0.113.5:4711", "203.0.113.5"),
    ("2001:db8::7", "2001:db8::7"),
    ("[2001:db8::7]", "2001:db8::7"),
    ("[2001:db8::7]:443", "2001:db8::7"),
    ("2001:DB8:0:0:0:0:0:7", "2001:db8::7"),
    ("6.6.6.6, 203.0.113.5", "203.0.113.5"),
    ("203.0.113.5, 198.51.100.9", "203.0.113.5"),  # through a second trusted proxy
    ("garbage", PEER),
    ("<script>alert(1)</script>", PEER),
    ('=HYPERLINK("http://evil")', PEER),
    ("x" * 100, PEER),
    ("203.0.113.5, garbage", PEER),  # what a trusted proxy appended is not an address
    ("fe80::1%eth0", PEER),
    ("fe80::1%" + "z" * 80, PEER),
    ("203.0.113.5:99999", PEER),
    ("203.0.113.5:", PEER),
    ("[203.0.113.5]", PEER),
    ("unknown", PEER),
    ("", PEER),
]


@pytest.fixture
async def behind_proxy(pg_url: str, key_file: Path) -> AsyncIterator[Harness]:
    """The app with the test client's address (198.51.100.7) as a trusted proxy."""
    async with running_app(pg_url, key_file, trusted_proxies="198.51.100.0/24") as api:
        yield api


@pytest.mark.parametrize(("forwarded", "expected"), FORWARDED)
async def test_only_an_address_forwarded_by_a_trusted_proxy_is_believed(
    behind_proxy: Harness, forwarded: str, expected: str
) -> None:
    api = behind_proxy
    headers = {**api.auth("viewer"), "X-Forwarded-For": forwarded}
    response = await api.client.get(API + "/canary", headers=headers)
    assert response.status_code == 200, response.text
    [event] = await api.audit_events()
    assert event.client_address == expected
    # and the export hands the reviewer exactly that address
    export = await api.client.get(API + "/audit/export?format=csv", headers=api.auth("auditor"))
    assert export.status_code == 200, export.text
    rows = list(csv.DictReader(io.StringIO(export.text)))
    assert rows[0]["client_address"] == expected


async def test_a_long_forwarded_address_does_not_fail_requests_audited_with_it(
    behind_proxy: Harness,
) -> None:
    # when requests with and without a long X-Forwarded-For share the audit writer's batch
    api = behind_proxy

    async def read(forwarded: str | None) -> int:
        headers = api.auth("viewer")
        if forwarded is not None:
            headers["X-Forwarded-For"] = forwarded
        return (await api.client.get(API + "/canary", headers=headers)).status_code

    statuses = await asyncio.gather(*(read("y" * 200 if i % 2 else None) for i in range(20)))
    # then every one is answered 200 and audited with the proxy's address
    assert statuses == [200] * 20
    events = await api.audit_events()
    assert len(events) == 20
    assert {event.client_address for event in events} == {PEER}


async def test_an_allowlist_is_not_passed_by_a_forwarded_non_address(
    pg_url: str, key_file: Path
) -> None:
    # given an allowlist of 10.0.0.0/8 behind a trusted proxy outside it
    async with running_app(
        pg_url, key_file, allowed_cidrs="10.0.0.0/8", trusted_proxies="198.51.100.0/24"
    ) as api:
        for forwarded, status in [("10.1.2.3", 200), ("10.1.2.3:5555", 200),
                                  ("10.1.2.3garbage", 403), ("10.0.0.0/8", 403)]:  # fmt: skip
            headers = {**api.auth("viewer"), "X-Forwarded-For": forwarded}
            response = await api.client.get(API + "/canary", headers=headers)
            assert response.status_code == status, (forwarded, response.text)
