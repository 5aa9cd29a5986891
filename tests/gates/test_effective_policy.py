"""`effective_policy`: what a PUT body means given the server's default policy; what it refuses."""

from __future__ import annotations

import json
import math
from datetime import timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from opsapi.canary.policy import (
    CHECKLIST_GATES,
    DEFAULT_STEPS,
    GatePolicy,
    Policy,
    default_policy,
    effective_policy,
)

WITH_GATES = default_policy(with_gates=True)
CHECKLIST = [gate.name for gate in CHECKLIST_GATES]
DEFAULT_WAITS = [step.wait for step in DEFAULT_STEPS]
SHORT_STEPS = [{"weight": 50, "wait": "5m"}, {"weight": 100, "wait": "1h"}]
GATE = {"name": "errors", "query": "sum(rate(x[5m]))", "op": "<", "threshold": 0.01}


def gate_names(policy: Policy) -> list[str]:
    return [gate.name for gate in policy.gates]


def waits(policy: Policy) -> list[timedelta]:
    return [step.wait for step in policy.steps]


# (body, what the effective policy must be): omitted fields come from the default.
KEPT = [
    pytest.param({}, lambda p: p == WITH_GATES, id="empty-body-is-the-default"),
    pytest.param(
        {"bake": "1h"},
        lambda p: (
            gate_names(p) == CHECKLIST and waits(p) == [*DEFAULT_WAITS[:-1], timedelta(hours=1)]
        ),
        id="bake-alone-keeps-gates-and-earlier-steps",
    ),
    pytest.param(
        {"auto_promote": True},
        lambda p: p.auto_promote and gate_names(p) == CHECKLIST and waits(p) == DEFAULT_WAITS,
        id="auto-promote-alone",
    ),
    pytest.param(
        {"interval": "10s"},
        lambda p: p.interval == timedelta(seconds=10) and gate_names(p) == CHECKLIST,
        id="interval-alone",
    ),
    pytest.param(
        {"steps": SHORT_STEPS},
        lambda p: (
            waits(p) == [timedelta(minutes=5), timedelta(hours=1)] and gate_names(p) == CHECKLIST
        ),
        id="steps-alone-keep-gates",
    ),
    pytest.param(
        {"gates": []},
        lambda p: p.gates == [] and waits(p) == DEFAULT_WAITS,
        id="explicit-empty-gates-means-none",
    ),
    pytest.param(
        {"gates": [GATE]},
        lambda p: gate_names(p) == ["errors"],
        id="own-gates-replace-the-defaults",
    ),
    pytest.param(
        {"steps": SHORT_STEPS, "bake": "1h"},
        lambda p: waits(p)[-1] == timedelta(hours=1) and p.bake == timedelta(hours=1),
        id="bake-agreeing-with-steps",
    ),
    pytest.param(
        {"bake": None},
        lambda p: waits(p) == DEFAULT_WAITS,
        id="null-bake-is-no-bake",
    ),
    pytest.param(
        {"router": {"name": "pull"}, "pagerduty": {"service_ids": ["PABC123"]}},
        lambda p: p.pagerduty is not None and gate_names(p) == CHECKLIST,
        id="other-fields-keep-gates",
    ),
    pytest.param(
        {"min_sample": {"query": 'sum(increase(x{service="{service}"}[5m]))', "min": 100}},
        lambda p: p.min_sample is not None and p.min_sample.min == 100,
        id="min-sample",
    ),
]


@pytest.mark.parametrize(("body", "expected"), KEPT)
def test_omitted_fields_come_from_the_default(body: dict[str, Any], expected: Any) -> None:
    policy = effective_policy(body, WITH_GATES)
    assert expected(policy), policy.document()
    # and the answer the handler sends is that policy, as JSON
    document = policy.document()
    assert json.loads(json.dumps(document)) == document
    assert Policy.model_validate(document).document() == document


def test_the_default_comes_from_the_server_not_from_constants() -> None:
    # given a server whose default has other steps and no gates
    server_default = Policy(steps=[{"weight": 20, "wait": "1m"}, {"weight": 100, "wait": "3m"}])

    # when a body gives only the bake
    policy = effective_policy({"bake": "9m"}, server_default)

    # then the bake replaces the server default's last wait, and there are no gates
    assert [(s.weight, s.wait) for s in policy.steps] == [
        (20, timedelta(minutes=1)),
        (100, timedelta(minutes=9)),
    ]
    assert policy.gates == []
    assert effective_policy({}, default_policy(with_gates=False)).gates == []


def _gate(**changes: Any) -> dict[str, Any]:
    return {"gates": [GATE, {**GATE, "name": "second", **changes}]}


# (body, the field the error names, a fragment of its message)
REFUSED = [
    pytest.param(
        {"steps": SHORT_STEPS, "bake": "2h"}, "bake", "disagrees", id="bake-disagrees-with-steps"
    ),
    pytest.param({"bake": "soon"}, "bake", "duration", id="bake-not-a-duration"),
    pytest.param(_gate(threshold=math.inf), "gates.1.threshold", "finite", id="threshold-inf"),
    pytest.param(_gate(threshold=-math.inf), "gates.1.threshold", "finite", id="threshold-minf"),
    pytest.param(_gate(threshold=math.nan), "gates.1.threshold", "finite", id="threshold-nan"),
    pytest.param(
        _gate(threshold=json.loads("1e999")), "gates.1.threshold", "finite", id="threshold-1e999"
    ),
    pytest.param(
        {"min_sample": {"query": "sum(x)", "min": math.inf}},
        "min_sample.min",
        "finite",
        id="min-sample-inf",
    ),
    pytest.param(
        {"min_sample": {"query": "sum(x)", "min": math.nan}},
        "min_sample.min",
        "",
        id="min-sample-nan",
    ),
    pytest.param(
        _gate(query='x{version="{canary}"}'),
        "gates.1.query",
        "unknown placeholder {canary}",
        id="unknown-placeholder",
    ),
    pytest.param(
        _gate(baseline_query='x{version="{version}"}'),
        "gates.1.baseline_query",
        "unknown placeholder {version}",
        id="unknown-placeholder-in-baseline",
    ),
    pytest.param(
        {"min_sample": {"query": 'sum(x{service="{svc}"})', "min": 1}},
        "min_sample.query",
        "unknown placeholder {svc}",
        id="unknown-placeholder-in-min-sample",
    ),
    pytest.param(
        _gate(query="sum(rate(x[5m])"), "gates.1.query", "not valid PromQL", id="bad-promql"
    ),
    pytest.param(
        _gate(baseline_query="rate(x)"),
        "gates.1.baseline_query",
        "not valid PromQL",
        id="bad-baseline-promql",
    ),
    pytest.param(_gate(query="x[5m]"), "gates.1.query", "range vector", id="range-vector"),
    pytest.param({"colour": "blue"}, "colour", "", id="unknown-field"),
]


@pytest.mark.parametrize(("body", "field", "says"), REFUSED)
def test_bad_input_is_refused_naming_the_field(body: dict[str, Any], field: str, says: str) -> None:
    with pytest.raises(ValidationError) as refused:
        effective_policy(body, WITH_GATES)
    errors = {
        ".".join(str(part) for part in error["loc"]): error["msg"]
        for error in refused.value.errors(include_url=False, include_input=False)
    }
    assert field in errors, errors
    assert says in errors[field]


def test_a_body_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(ValidationError):
        effective_policy([1, 2], WITH_GATES)  # type: ignore[arg-type]


def test_the_checklist_gates_pass_the_input_checks() -> None:
    # The defaults go through the same checks as a body's gates: they must pass them.
    policy = effective_policy({"gates": [g.model_dump(by_alias=True) for g in CHECKLIST_GATES]},
                              WITH_GATES)  # fmt: skip
    assert tuple(policy.gates) == CHECKLIST_GATES


def test_stored_documents_written_before_the_checks_still_load() -> None:
    # A stored policy (or a rollout's snapshot) is read with model_validate: not re-judged.
    stored = {
        "steps": SHORT_STEPS,
        "gates": [{**GATE, "query": 'x{version="{canary}"}'}, {**GATE, "name": "b", "query": "x["}],
        "min_sample": {"query": "x[5m]", "min": 1},
    }
    policy = Policy.model_validate(stored)
    assert [gate.query for gate in policy.gates] == ['x{version="{canary}"}', "x["]
    assert GatePolicy.model_validate({**GATE, "threshold": math.inf}).threshold == math.inf
