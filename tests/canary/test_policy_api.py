"""Service policies over HTTP: defaults, round trips, validation, audit, and when changes apply."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.app import API, Harness, running_app

SERVICE = "checkout"
PATH = f"/services/{SERVICE}"

DEFAULT_STEPS = [
    {"weight": 10, "wait": "30m"},
    {"weight": 25, "wait": "15m"},
    {"weight": 50, "wait": "15m"},
    {"weight": 75, "wait": "10m"},
    {"weight": 100, "wait": "2h"},
]

# A policy using every field, written the way the API writes it back.
FULL_POLICY: dict[str, Any] = {
    "steps": [
        {"weight": 5, "wait": "10m"},
        {"weight": 20, "wait": "1h30m"},
        {"weight": 100, "wait": "45m"},
    ],
    "bake": "45m",
    "interval": "30s",
    "auto_promote": True,
    "gates": [
        {
            "name": "error-rate",
            "query": 'sum(rate(http_errors_total{service="checkout"}[5m]))',
            "op": "<",
            "threshold": 0.01,
            "for": "2m",
            "on_no_data": "fail",
            "baseline_query": 'sum(rate(http_errors_total{service="checkout-stable"}[5m]))',
        },
        {
            "name": "p99.latency",
            "query": "histogram_quantile(0.99, x)",
            "op": "<=",
            "threshold": 0.5,
            "for": "0s",
            "on_no_data": "hold",
        },
    ],
    "min_sample": {"query": "sum(rate(http_requests_total[5m]))", "min": 10.0},
    "router": {"name": "pull"},
    "pagerduty": {
        "service_ids": ["PABC123"],
        "priorities": ["P1", "P2"],
        "urgencies": ["high"],
        "dependants": ["cart"],
    },
    "notify": [],
}

# A valid policy that differs from the default: the "previous policy" of the validation tests.
PREVIOUS = {"steps": [{"weight": 50, "wait": "5m"}, {"weight": 100, "wait": "1h"}]}


def policy_of(answer: httpx.Response) -> dict[str, Any]:
    """The policy document of a GET or PUT answer, without the read-only service `status`
    that answers may carry beside it (it is not part of the policy)."""
    return {key: value for key, value in answer.json().items() if key != "status"}


async def get_policy(api: Harness, service: str = SERVICE) -> dict[str, Any]:
    response = await api.get(f"/services/{service}")
    assert response.status_code == 200, response.text
    return policy_of(response)


async def put_raw(api: Harness, path: str, content: Any, **headers: str) -> httpx.Response:
    return await api.client.put(
        API + path,
        content=content,
        headers={"Content-Type": "application/json", **api.auth("admin"), **headers},
    )


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["status"] == status
    assert {"type", "title", "detail"} <= problem.keys()
    return problem  # type: ignore[no-any-return]


# --- defaults and round trips ------------------------------------------------------------------


async def test_unknown_service_has_the_default_policy(api: Harness) -> None:
    policy = await get_policy(api, "never-configured")

    assert policy["steps"] == DEFAULT_STEPS
    assert policy["bake"] == "2h"
    assert policy["interval"] in ("60s", "1m")
    assert policy["auto_promote"] is False
    assert policy["gates"] == []
    assert policy["router"] == {"name": "pull"}
    # reading a policy stores nothing: it is still "unknown", and so not audited as a change
    assert await api.audit_events(action="service.put") == []


async def test_put_then_get_round_trips(api_any_db: Harness) -> None:
    # when an admin replaces the policy with one that uses every field
    response = await api_any_db.put(PATH, FULL_POLICY)

    # then the answer and every later GET give back exactly what was put, durations as strings
    assert response.status_code == 200, response.text
    assert policy_of(response) == FULL_POLICY
    assert await get_policy(api_any_db) == FULL_POLICY
    # and other services keep the default
    assert (await get_policy(api_any_db, "other"))["steps"] == DEFAULT_STEPS


async def test_a_second_put_replaces_the_whole_policy(api_any_db: Harness) -> None:
    await api_any_db.put(PATH, FULL_POLICY)

    # when the next PUT gives only the steps
    response = await api_any_db.put(PATH, PREVIOUS)

    # then everything else is back to its default (PUT replaces, it does not merge)
    assert response.status_code == 200, response.text
    policy = await get_policy(api_any_db)
    assert policy["steps"] == PREVIOUS["steps"]
    assert policy["bake"] == "1h"
    assert policy["gates"] == []
    assert policy["auto_promote"] is False
    assert "pagerduty" not in policy
    assert "min_sample" not in policy


async def test_bake_alone_sets_the_last_steps_wait(api: Harness) -> None:
    response = await api.put(PATH, {"bake": "3h"})

    assert response.status_code == 200, response.text
    policy = await get_policy(api)
    assert policy["steps"] == [*DEFAULT_STEPS[:-1], {"weight": 100, "wait": "3h"}]
    assert policy["bake"] == "3h"


async def test_bake_agreeing_with_the_last_step_is_accepted(api: Harness) -> None:
    response = await api.put(PATH, {**PREVIOUS, "bake": "1h"})

    assert response.status_code == 200, response.text
    assert (await get_policy(api))["bake"] == "1h"


async def test_bake_disagreeing_with_the_last_step_is_422(api: Harness) -> None:
    await api.put(PATH, PREVIOUS)

    response = await api.put(PATH, {**FULL_POLICY, "bake": "2h"})

    problem = assert_problem(response, 422)
    assert "bake" in json.dumps(problem["errors"])
    assert (await get_policy(api))["steps"] == PREVIOUS["steps"]


# --- validation ------------------------------------------------------------------------------


def _steps_with_wait(wait: Any) -> dict[str, Any]:
    return {"steps": [{"weight": 50, "wait": wait}, {"weight": 100, "wait": "1h"}]}


def _gate(name: str) -> dict[str, Any]:
    return {"name": name, "query": "up", "op": ">", "threshold": 0}


# (path, body, the field the errors must name); each is refused with 422.
INVALID: list[Any] = [
    pytest.param(PATH, _steps_with_wait("10x"), "steps.0.wait", id="wait-bad-unit"),
    pytest.param(PATH, _steps_with_wait(""), "steps.0.wait", id="wait-empty"),
    pytest.param(PATH, _steps_with_wait(5), "steps.0.wait", id="wait-number"),
    pytest.param(PATH, _steps_with_wait("-1m"), "steps.0.wait", id="wait-negative"),
    pytest.param(PATH, {"interval": "10x"}, "interval", id="interval-bad"),
    pytest.param(PATH, {"bake": ""}, "bake", id="bake-empty"),
    pytest.param(PATH, {"gates": [{**_gate("g"), "for": "-1m"}]}, "gates.0.for", id="for-bad"),
    pytest.param(
        PATH,
        {"steps": [{"weight": 50, "wait": "1m"}, {"weight": 25, "wait": "1m"}, DEFAULT_STEPS[-1]]},
        "steps",
        id="steps-not-ascending",
    ),
    pytest.param(
        PATH,
        {"steps": [{"weight": 50, "wait": "1m"}, {"weight": 50, "wait": "1m"}, DEFAULT_STEPS[-1]]},
        "steps",
        id="steps-repeated-weight",
    ),
    pytest.param(PATH, {"steps": [{"weight": 50, "wait": "1m"}]}, "steps", id="last-step-not-100"),
    pytest.param(PATH, {**PREVIOUS, "bake": "2h"}, "bake", id="bake-disagrees"),
    pytest.param(PATH, {"steps": []}, "steps", id="no-steps"),
    pytest.param(
        PATH,
        {"steps": [{"weight": 0, "wait": "1m"}, DEFAULT_STEPS[-1]]},
        "steps.0.weight",
        id="weight-0",
    ),
    pytest.param(
        PATH,
        {"steps": [{"weight": 50, "wait": "1m"}, {"weight": 101, "wait": "1m"}]},
        "steps.1.weight",
        id="weight-101",
    ),
    pytest.param(PATH, {**PREVIOUS, "colour": "blue"}, "colour", id="unknown-field"),
    pytest.param(
        PATH,
        {"steps": [{"weight": 100, "wait": "1h", "jitter": "1m"}]},
        "steps.0.jitter",
        id="unknown-step-field",
    ),
    pytest.param("/services/Bad_Name", PREVIOUS, "service", id="name-uppercase-underscore"),
    pytest.param("/services/" + "a" * 64, PREVIOUS, "service", id="name-64-chars"),
    pytest.param("/services/a;b", PREVIOUS, "service", id="name-semicolon"),
    pytest.param("/services/-lead", PREVIOUS, "service", id="name-leading-dash"),
    pytest.param(PATH, {"router": {"name": "istio-prod"}}, "router.name", id="unknown-router"),
    pytest.param(
        PATH, {"router": {"name": "pull", "namespace": "x"}}, "router", id="pull-with-params"
    ),
    pytest.param(PATH, {"interval": "500ms"}, "interval", id="interval-below-1s"),
    pytest.param(PATH, {"interval": "0s"}, "interval", id="interval-zero"),
    pytest.param(PATH, {"gates": [_gate("g"), _gate("g")]}, "gates", id="duplicate-gate-names"),
    pytest.param(PATH, {"gates": [{**_gate("g"), "op": "=="}]}, "gates.0.op", id="gate-bad-op"),
]


@pytest.fixture
async def with_previous_policy(api: Harness) -> Harness:
    response = await api.put(PATH, PREVIOUS)
    assert response.status_code == 200, response.text
    return api


@pytest.mark.parametrize(("path", "body", "field"), INVALID)
async def test_invalid_policy_is_422_and_changes_nothing(
    with_previous_policy: Harness, path: str, body: Any, field: str
) -> None:
    api = with_previous_policy
    previous = await get_policy(api)
    events_before = len(await api.audit_events())

    # when an admin puts an invalid policy
    response = await api.put(path, body)

    # then 422 problem+json, audited as one error event
    assert_problem(response, 422)
    assert "Traceback" not in response.text
    [event] = (await api.audit_events())[events_before:]
    assert (event.action, event.outcome, event.details["status"]) == ("service.put", "error", 422)
    assert "after" not in event.details
    # and the previous policy still stands
    assert await get_policy(api) == previous
    assert previous["steps"] == PREVIOUS["steps"]


def _named_fields_cases() -> list[Any]:
    return [pytest.param(*case.values, id=case.id) for case in INVALID]


@pytest.mark.parametrize(("path", "body", "field"), _named_fields_cases())
async def test_invalid_policy_errors_name_the_field(
    api: Harness, path: str, body: Any, field: str
) -> None:
    response = await api.put(path, body)

    problem = assert_problem(response, 422)
    assert isinstance(problem.get("errors"), list), problem
    assert field in [error["field"] for error in problem["errors"]], problem["errors"]
    for error in problem["errors"]:
        assert isinstance(error["message"], str)
        assert error["message"]


@pytest.mark.parametrize(
    "name", ["Bad_Name", "a" * 64, "a;b", "-lead", "UPPER"], ids=lambda n: n[:10]
)
async def test_get_with_an_invalid_service_name_is_422(api: Harness, name: str) -> None:
    assert_problem(await api.get(f"/services/{name}"), 422)


async def test_longest_valid_service_name_is_accepted(api: Harness) -> None:
    name = "a" + "b-" * 31  # 63 characters
    response = await api.put(f"/services/{name}", PREVIOUS)
    assert response.status_code == 200, response.text
    assert (await get_policy(api, name))["steps"] == PREVIOUS["steps"]


async def test_non_json_body_is_400(with_previous_policy: Harness) -> None:
    api = with_previous_policy
    response = await put_raw(api, PATH, b"{steps: [")

    assert_problem(response, 400)
    assert (await get_policy(api))["steps"] == PREVIOUS["steps"]
    [event] = (await api.audit_events(action="service.put"))[-1:]
    assert (event.outcome, event.details["status"]) == ("error", 400)


LIMIT = 64 * 1024


def _padded(size: int) -> bytes:
    """A valid policy document padded with whitespace to exactly `size` bytes."""
    document = json.dumps(FULL_POLICY).encode()
    return document + b" " * (size - len(document))


async def test_body_at_the_size_limit_is_accepted(api: Harness) -> None:
    response = await put_raw(api, PATH, _padded(LIMIT))
    assert response.status_code == 200, response.text
    assert await get_policy(api) == FULL_POLICY


async def test_body_over_the_size_limit_is_413(with_previous_policy: Harness) -> None:
    api = with_previous_policy
    response = await put_raw(api, PATH, _padded(LIMIT + 1))

    assert_problem(response, 413)
    assert (await get_policy(api))["steps"] == PREVIOUS["steps"]


async def test_streamed_body_over_the_size_limit_is_413(with_previous_policy: Harness) -> None:
    # a chunked body declares no Content-Length: the limit must hold while reading
    api = with_previous_policy
    body = _padded(LIMIT + 1)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    response = await put_raw(api, PATH, chunks())

    assert "content-length" not in {k.lower() for k in response.request.headers}
    assert_problem(response, 413)
    assert (await get_policy(api))["steps"] == PREVIOUS["steps"]


async def test_size_limit_follows_the_setting(pg_url: str, key_file: Path) -> None:
    async with running_app(pg_url, key_file, max_body_bytes=256) as api:
        small = json.dumps(PREVIOUS).encode()
        assert len(small) <= 256
        assert (await put_raw(api, PATH, small)).status_code == 200
        assert_problem(await put_raw(api, PATH, _padded(1024)), 413)
        assert (await get_policy(api))["steps"] == PREVIOUS["steps"]


# --- audit -----------------------------------------------------------------------------------


async def test_each_put_is_audited_with_before_and_after(api: Harness) -> None:
    # when an admin puts two policies in turn
    first = await api.put(PATH, PREVIOUS)
    second = await api.put(PATH, FULL_POLICY)
    assert first.status_code == second.status_code == 200

    # then each PUT wrote one service.put event holding the policy before and after it
    events = await api.audit_events(action="service.put")
    assert len(events) == 2
    default = await get_policy(api, "never-configured")
    assert events[0].details["before"] == default
    assert events[0].details["after"] == policy_of(first)
    assert events[1].details["before"] == policy_of(first)
    assert events[1].details["after"] == FULL_POLICY
    for event in events:
        assert (event.outcome, event.actor, event.service) == ("success", "admin-user", SERVICE)


async def test_routing_key_is_redacted_in_the_audit_log(api: Harness) -> None:
    secret = "R0UT1NGKEY0123456789abcdefabcdef"
    body = {**PREVIOUS, "pagerduty": {"routing_key": secret}}

    response = await api.put(PATH, body)

    assert response.status_code == 200, response.text
    [event] = await api.audit_events(action="service.put")
    assert secret not in json.dumps(event.details)


async def test_a_refused_put_is_audited_as_denied_and_changes_nothing(
    with_previous_policy: Harness,
) -> None:
    api = with_previous_policy
    response = await api.put(PATH, FULL_POLICY, role="operator")

    assert_problem(response, 403)
    assert (await get_policy(api))["steps"] == PREVIOUS["steps"]
    [event] = (await api.audit_events(action="service.put"))[-1:]
    assert (event.outcome, event.actor) == ("denied", "operator-user")


# --- when a change applies -----------------------------------------------------------------------


async def test_a_policy_change_applies_to_the_next_rollout(api: Harness) -> None:
    # given a rollout started under the default policy
    started = await api.post("/canary/promote", {"service": SERVICE, "version": "v2"})
    assert started.status_code == 200, started.text
    assert started.json()["steps"] == DEFAULT_STEPS

    # when the policy changes to 50 % then 100 %
    assert (await api.put(PATH, PREVIOUS)).status_code == 200

    # then the open rollout keeps the steps it started with
    rollout = (await api.get(f"/canary/{SERVICE}")).json()
    assert rollout["steps"] == DEFAULT_STEPS
    # and advancing it goes to its own next step (25 %), not to the new policy's 50 %
    api.clock.advance(minutes=30)
    promoted = await api.post("/canary/promote", {"service": SERVICE})
    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["desired_weight"] == 25
    assert promoted.json()["steps"] == DEFAULT_STEPS

    # when that rollout is rolled back and a new one starts
    rolled_back = await api.post("/canary/rollback", {"service": SERVICE, "reason": "test"})
    assert rolled_back.status_code == 200, rolled_back.text
    restarted = await api.post("/canary/promote", {"service": SERVICE, "version": "v3"})

    # then the new rollout follows the new policy
    assert restarted.status_code == 200, restarted.text
    assert restarted.json()["steps"] == PREVIOUS["steps"]
    assert restarted.json()["desired_weight"] == 50


# --- concurrency -------------------------------------------------------------------------------


async def test_concurrent_first_puts_of_a_new_service_do_not_fail(api: Harness) -> None:
    for round_ in range(5):
        service = f"fresh-{round_}"
        # when several admins put a policy for a never-configured service at the same time
        bodies = [{"bake": f"{hours}h"} for hours in range(1, 9)]
        responses = await asyncio.gather(*[api.put(f"/services/{service}", b) for b in bodies])

        # then none of them fails with a server error (last writer wins, or a clean 409)
        statuses = [response.status_code for response in responses]
        assert all(status in (200, 409) for status in statuses), statuses
        assert (await get_policy(api, service))["bake"] in {b["bake"] for b in bodies}


# --- with a metrics backend: the default has the checklist's gates ------------------------------

CHECKLIST_GATE_NAMES = [
    "p95-latency",
    "error-rate",
    "success-rate",
    "webhook-signature-verification",
    "db-connection-failures",
]
# Never contacted: policies are validated and stored without measuring anything.
UNUSED_PROMETHEUS = "http://127.0.0.1:9"


@pytest.fixture
async def api_with_metrics(pg_url: str, key_file: Path) -> AsyncIterator[Harness]:
    """The app with OPSAPI_PROMETHEUS_URL set, so its default policy has the checklist's gates."""
    async with running_app(pg_url, key_file, prometheus_url=UNUSED_PROMETHEUS) as harness:
        yield harness


def gate_names(policy: dict[str, Any]) -> list[str]:
    return [gate["name"] for gate in policy["gates"]]


async def test_default_policy_with_a_metrics_backend_has_the_checklist_gates(
    api_with_metrics: Harness,
) -> None:
    assert gate_names(await get_policy(api_with_metrics, "never-configured")) == (
        CHECKLIST_GATE_NAMES
    )


ONE_GATE = {"name": "errors", "query": "sum(rate(x[5m]))", "op": "<", "threshold": 0.01}

# (partial body, what the stored policy must then hold besides the body's own fields)
PARTIAL: list[Any] = [
    pytest.param(
        {"bake": "1h"},
        {
            "gates": CHECKLIST_GATE_NAMES,
            "steps": [*DEFAULT_STEPS[:-1], {"weight": 100, "wait": "1h"}],
            "bake": "1h",
        },
        id="bake-alone",
    ),
    pytest.param(
        {"auto_promote": True},
        {"gates": CHECKLIST_GATE_NAMES, "steps": DEFAULT_STEPS, "auto_promote": True},
        id="auto-promote-alone",
    ),
    pytest.param(
        PREVIOUS,
        {"gates": CHECKLIST_GATE_NAMES, "steps": PREVIOUS["steps"], "bake": "1h"},
        id="steps-alone",
    ),
    pytest.param(
        {"interval": "30s", "router": {"name": "pull"}},
        {"gates": CHECKLIST_GATE_NAMES, "interval": "30s"},
        id="interval-and-router",
    ),
    pytest.param({"gates": []}, {"gates": [], "steps": DEFAULT_STEPS}, id="explicit-no-gates"),
    pytest.param({"gates": [ONE_GATE]}, {"gates": ["errors"]}, id="own-gates"),
]


@pytest.mark.parametrize(("body", "expected"), PARTIAL)
async def test_a_partial_put_keeps_the_defaults_it_does_not_name(
    api_with_metrics: Harness, body: dict[str, Any], expected: dict[str, Any]
) -> None:
    api = api_with_metrics
    # when an admin puts a body naming only some fields
    response = await api.put(PATH, body)

    # then the answer and every later GET hold the server's defaults for the others
    assert response.status_code == 200, response.text
    for policy in (policy_of(response), await get_policy(api)):
        for field, value in expected.items():
            actual = gate_names(policy) if field == "gates" else policy[field]
            assert actual == value, (field, policy)


def _bad_gate(**changes: Any) -> dict[str, Any]:
    return {"gates": [ONE_GATE, {**ONE_GATE, "name": "second", **changes}]}


# (raw body, the field the errors must name, what the message must say)
REFUSED_GATES: list[Any] = [
    pytest.param(
        json.dumps(_bad_gate(query="sum(rate(x[5m])")),
        "gates.1.query",
        "PromQL",
        id="bad-promql",
    ),
    pytest.param(
        json.dumps(_bad_gate(query="rate(x)")), "gates.1.query", "PromQL", id="rate-of-a-vector"
    ),
    pytest.param(
        json.dumps(_bad_gate(query='sum(rate(x{service="{service}",version="{canary}"}[5m]))')),
        "gates.1.query",
        "{canary}",
        id="unknown-placeholder",
    ),
    pytest.param(
        json.dumps(_bad_gate(baseline_query='x{version="{version}"}')),
        "gates.1.baseline_query",
        "{version}",
        id="unknown-placeholder-in-baseline",
    ),
    pytest.param(
        json.dumps({"min_sample": {"query": 'sum(x{service="{svc}"})', "min": 1}}),
        "min_sample.query",
        "{svc}",
        id="unknown-placeholder-in-min-sample",
    ),
    pytest.param(
        json.dumps(_bad_gate(threshold=0.5)).replace("0.5", "1e999"),
        "gates.1.threshold",
        "finite",
        id="threshold-1e999",
    ),
    pytest.param(
        json.dumps(_bad_gate(threshold=0.5)).replace("0.5", "-1e999"),
        "gates.1.threshold",
        "finite",
        id="threshold-minus-1e999",
    ),
    pytest.param(
        json.dumps(_bad_gate(threshold=0.5)).replace("0.5", "NaN"),
        "gates.1.threshold",
        "finite",
        id="threshold-nan",
    ),
    pytest.param(
        json.dumps({"min_sample": {"query": "sum(x)", "min": 0.5}}).replace("0.5", "1e999"),
        "min_sample.min",
        "finite",
        id="min-sample-1e999",
    ),
]


@pytest.mark.parametrize(("raw", "field", "says"), REFUSED_GATES)
async def test_bad_gate_queries_and_numbers_are_422_naming_the_field(
    api_with_metrics: Harness, raw: str, field: str, says: str
) -> None:
    api = api_with_metrics
    assert (await api.put(PATH, PREVIOUS)).status_code == 200
    before = await get_policy(api)

    # when an admin puts a policy with a query or number that could never work
    response = await put_raw(api, PATH, raw.encode())

    # then 422 naming the field, the message short and not repeating the query
    problem = assert_problem(response, 422)
    messages = {error["field"]: error["message"] for error in problem["errors"]}
    assert field in messages, messages
    assert says in messages[field]
    assert len(messages[field]) <= 200
    assert "sum(rate(" not in response.text
    # and nothing changed
    assert await get_policy(api) == before


async def test_each_rollout_shows_the_ladder_it_started_with(api: Harness) -> None:
    # given two services with different ladders, and a third on the default one
    short = [{"weight": 50, "wait": "1m30s"}, {"weight": 100, "wait": "1h30m"}]
    assert (await api.put("/services/short", {"steps": short})).status_code == 200
    assert (await api.put("/services/long", {"steps": DEFAULT_STEPS})).status_code == 200

    # when each starts a rollout
    shown = {}
    for service in ("short", "long", "plain"):
        answer = await api.post("/canary/promote", {"service": service, "version": "v2"})
        assert answer.status_code == 200, answer.text
        shown[service] = answer.json()["steps"]

    # then each answer shows its own ladder
    assert shown == {"short": short, "long": DEFAULT_STEPS, "plain": DEFAULT_STEPS}

    # and when the short ladder changes while its rollout is open, that rollout keeps its own
    # ladder; the next rollout shows the new one
    changed = [{"weight": 20, "wait": "1m30s"}, {"weight": 100, "wait": "1h30m"}]
    assert (await api.put("/services/short", {"steps": changed})).status_code == 200
    assert (await api.get("/canary/short")).json()["steps"] == short
    await api.post("/canary/rollback", {"service": "short", "reason": "test"})
    answer = await api.post("/canary/promote", {"service": "short", "version": "v3"})
    assert answer.json()["steps"] == changed
