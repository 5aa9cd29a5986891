"""The rollout answer is written from a plain document (orjson) instead of the model: for every
kind of rollout, what is written is what `RolloutView` itself would write, value for value and
type for type, and the document holds every field of the model (the OpenAPI schema)."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from opsapi.canary.document import RolloutView, rollout_document
from opsapi.canary.machine import Hold, HoldKind, State
from opsapi.canary.models import RolloutRecord, ServiceRecord
from opsapi.http.endpoint import document_response

NOW = datetime(2026, 12, 1, 21, 30, tzinfo=UTC)
STEPS = [
    {"weight": 10, "wait": 1800.0},
    {"weight": 25, "wait": 900.0},
    {"weight": 100, "wait": 7200.0},
]
GATE_POLICY = {
    "gates": [
        {"name": "errors", "op": "<", "for": "5m", "on_no_data": "hold"},
        {"name": "latency", "op": "<", "for": "5m"},
    ]
}


def _record(**changes: Any) -> RolloutRecord:
    values: dict[str, Any] = {
        "id": 7, "service": "checkout", "state": State.PROGRESSING, "canary_version": "v2",
        "stable_version": "v1", "stable_slot": "blue", "canary_slot": "green", "steps": STEPS,
        "step_index": 0, "desired_weight": 10, "applied_weight": None,
        "step_started_at": NOW - timedelta(minutes=5), "router": {"name": "pull"},
        "gates": [], "gate_policy": GATE_POLICY, "triggered_by": "user", "reason": "release",
        "created_by": "alice", "created_at": NOW - timedelta(minutes=5),
        "updated_at": NOW - timedelta(minutes=5), "generation": 1,
    }  # fmt: skip
    values.update(changes)
    return RolloutRecord(**values)


def _gate(name: str, phase: str, value: float | None, **more: Any) -> dict[str, Any]:
    return {"name": name, "phase": phase, "value": value, "threshold": 0.01, **more}


SERVICE = ServiceRecord(
    name="checkout", policy={}, stable_version="v2", stable_slot="green",
    previous_version="v1", previous_slot="blue", updated_at=NOW, updated_by="alice",
)  # fmt: skip

CASES: dict[str, tuple[RolloutRecord, dict[str, Any]]] = {
    "just started, nothing measured": (_record(), {}),
    "gates measured: an integer value, NaN, an infinity, no data, a gate left the policy": (
        _record(
            gates=[
                _gate("errors", "pass", 0),
                _gate("latency", "no_data", None),
                _gate("saturation", "fail", math.nan, failing_since=NOW.isoformat()),
                _gate("queue", "fail", math.inf, breached=True, detail="queue > 0.01"),
            ]
        ),
        {},
    ),
    "paused, applied, a lease": (
        _record(
            state=State.PAUSED,
            paused_at=NOW - timedelta(minutes=1),
            paused_seconds=12.5,
            applied_weight=10,
            applied_generation=1,
            lease_seconds=30,
            lease_until=NOW + timedelta(seconds=30),
        ),
        {},
    ),
    "through nginx slots, router failing": (
        _record(
            router={
                "name": "edge",
                "upstream": "shop",
                "slots": {"blue": "10.0.0.1:80", "green": "10.0.0.2:80"},
            },
            router_error="nginx -t failed",
            router_attempts=3,
            router_retry_at=NOW + timedelta(seconds=4),
        ),
        {
            "holds": (
                Hold(HoldKind.INCIDENT_OPEN, "PD-1 open"),
                Hold(HoldKind.FROZEN, "release freeze", NOW + timedelta(hours=2)),
            )
        },
    ),
    "rolled back, with time to safe, alerts and notifications": (
        _record(
            state=State.ROLLED_BACK,
            desired_weight=0,
            applied_weight=0,
            finished_at=NOW,
            triggered_by="controller",
            reason="errors breached: 0.2 ≥ 0.01",
            time_to_safe={
                "cause_at": NOW.isoformat(),
                "decided_at": NOW.isoformat(),
                "applied_at": None,
                "confirmed_at": None,
            },
        ),
        {
            "alerts": [
                {
                    "kind": "pagerduty_trigger",
                    "state": "pending",
                    "attempts": 0,
                    "last_error": None,
                    "dedup_key": "opsapi-7",
                    "delivered_at": None,
                }
            ],
            "notifications": [
                {
                    "channel": "ops",
                    "event": "rolled_back",
                    "state": "delivered",
                    "attempts": 1,
                    "last_error": None,
                    "created_at": NOW.isoformat(),
                    "delivered_at": NOW.isoformat(),
                }
            ],
        },
    ),
    "succeeded, revertible": (
        _record(
            state=State.SUCCEEDED,
            step_index=2,
            desired_weight=100,
            applied_weight=100,
            finished_at=NOW,
            reason="baked",
        ),
        {"row": SERVICE},
    ),
    "text beyond ASCII": (_record(reason="déploiement 🚀 — ok", created_by="zoë"), {}),
}


def _same(left: Any, right: Any) -> bool:
    """Equal JSON values of the same JSON types (1 and 1.0 differ, as True and 1 do)."""
    if type(left) is not type(right):
        return False
    if isinstance(left, dict):
        return left.keys() == right.keys() and all(_same(left[k], right[k]) for k in left)
    if isinstance(left, list):
        return len(left) == len(right) and all(map(_same, left, right))
    return bool(left == right)


@pytest.mark.parametrize("case", list(CASES))
def test_the_answer_is_what_the_model_would_write(case: str) -> None:
    record, more = CASES[case]
    more = dict(more)
    document = rollout_document(record, more.pop("row", None), NOW, **more)

    written = json.loads(document_response(document, RolloutView).body)

    model = RolloutView.model_validate(document)
    assert list(document) == list(RolloutView.model_json_schema(by_alias=True)["properties"])
    assert _same(written, json.loads(model.model_dump_json())), case
    assert written["id"] == 7
    assert written["state"] == record.state.value


def test_a_document_orjson_refuses_is_written_by_the_model() -> None:
    # given a router policy holding an integer past 64 bits (valid JSON, which orjson refuses)
    record = _record(router={"name": "pull", "note": 2**70})
    document = rollout_document(record, None, NOW)

    written = json.loads(document_response(document, RolloutView).body)

    assert written["router"]["note"] == 2**70
    assert _same(written, json.loads(RolloutView.model_validate(document).model_dump_json()))


def test_gate_values_are_numbers_or_null() -> None:
    record = next(record for case, (record, _) in CASES.items() if case.startswith("gates"))
    written = json.loads(document_response(rollout_document(record, None, NOW), RolloutView).body)
    assert [(g["name"], g["value"], g["op"]) for g in written["gates"]] == [
        ("errors", 0.0, "<"), ("latency", None, "<"), ("saturation", None, None),
        ("queue", None, None),
    ]  # fmt: skip
    assert isinstance(written["gates"][0]["value"], float)
