"""The rollout as every route answers it (DESIGN §4 and §9): one model, the OpenAPI schema,
and `rollout_document`, its fields as plain JSON values, from which answers are written."""

from __future__ import annotations

import functools
import math
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from opsapi.canary import machine, service
from opsapi.canary.machine import State
from opsapi.canary.models import RolloutRecord, ServiceRecord
from opsapi.durations import format_duration
from opsapi.http.params import iso
from opsapi.http.problems import whole_seconds
from opsapi.routers.base import slot_names
from opsapi.storage import rows


class _Answer(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True, serialize_by_alias=True)


class StepView(_Answer):
    weight: int
    wait: str


class GateView(_Answer):
    name: str
    phase: Literal["pending", "pass", "fail", "no_data"]
    value: float | None
    threshold: float | None
    failing_since: str | None
    breached: bool
    detail: str | None
    # The rule the gate was started with (absent for a gate no longer in the rollout's policy).
    op: str | None = None
    for_: str | None = Field(default=None, alias="for")
    on_no_data: str | None = None


class VersionInSlot(_Answer):
    version: str
    slot: str


class RolloutView(_Answer):
    """A rollout: its versions and slots, ladder, weights, timers and gates."""

    id: int
    service: str
    state: State
    canary_version: str
    stable_version: str | None
    stable_slot: str
    canary_slot: str
    # The two slots' targets (addresses, servers) as the router policy names them; null values
    # for routers without places of their own (webhook, pull).
    targets: dict[str, str | None]
    # The canary's desired share per slot.
    weights: dict[str, int]
    # What a revert goes back to (the service's previous version and slot), while possible.
    previous: VersionInSlot | None
    step_index: int
    steps: list[StepView]
    desired_weight: int
    applied_weight: int | None
    # What the router owes (bumped by every new weight or slot swap) and what it made live.
    generation: int
    applied_generation: int | None
    traffic_at_zero: bool
    step_started_at: str | None
    ready: bool
    blocked_by: list[str]
    ready_at: str | None
    time_left: str | None
    waited: str | None
    paused_at: str | None
    paused_for: str
    auto_promote: bool
    # How often the rollout's gates are evaluated (the policy it started with).
    interval: str
    triggered_by: str
    gates: list[GateView]
    reason: str | None
    router: dict[str, Any]
    router_error: str | None
    router_attempts: int
    router_retry_at: str | None
    created_by: str
    created_at: str | None
    updated_at: str | None
    finished_at: str | None
    next_evaluation_at: str | None
    # The fail-safe lease: how long an applied canary weight holds without the controller's
    # renewals (null once pinned), and when the one applied last runs out (null: none applied).
    lease_seconds: float | None
    lease_until: str | None
    # A rollback's instants: cause seen, decision, router applied, traffic confirmed at 0.
    time_to_safe: dict[str, Any] | None
    # What holds starts and promotions of the service now (open incidents, freeze windows).
    holds: list[dict[str, Any]]
    # PagerDuty events about this rollout, and its notifications, with their delivery state.
    alerts: list[dict[str, Any]]
    notifications: list[dict[str, Any]]


def targets_of(router: dict[str, Any]) -> dict[str, str | None]:
    """Each slot's target as the router policy names it (None when it names none)."""
    slots = router.get("slots")
    names = slot_names(router)
    if not isinstance(slots, dict):
        return dict.fromkeys(names)
    return {name: (str(slots[name]) if name in slots else None) for name in names}


def slot_split(record: RolloutRecord) -> dict[str, int]:
    """The desired percentage per slot: the canary's slot gets the desired weight."""
    first, second = slot_names(record.router)
    other = second if record.canary_slot == first else first
    return {record.canary_slot: record.desired_weight, other: 100 - record.desired_weight}


def previous_of(record: RolloutRecord, row: ServiceRecord | None) -> dict[str, str] | None:
    """What a revert of `record` would go back to (`VersionInSlot`'s fields), when it is the
    service's revertible one."""
    if (
        row is None
        or record.state != State.SUCCEEDED
        or row.previous_version is None
        or row.previous_slot is None
        or row.stable_version != record.canary_version
    ):
        return None
    return {"version": row.previous_version, "slot": row.previous_slot}


def rollout_document(
    record: RolloutRecord,
    row: ServiceRecord | None,
    now: datetime,
    alerts: list[dict[str, Any]] | None = None,
    notifications: list[dict[str, Any]] | None = None,
    holds: tuple[machine.Hold, ...] = (),
    rollout: machine.Rollout | None = None,
) -> dict[str, Any]:
    """The rollout as the API shows it: `RolloutView`'s fields, in its order, as the JSON
    values its serialisation writes (answers are written from this without building the
    model); `rollout`: the machine's view of `record` when the caller has it (a
    transition's result, which `service.store` wrote into `record`)."""
    values = rows.loaded(record)  # read without a descriptor call per column
    if rollout is None:
        rollout = service.to_machine(record)
    ready = machine.readiness(rollout, now) if rollout.is_open else None
    assert values["id"] is not None
    return {
        "id": values["id"],
        "service": values["service"],
        "state": rollout.state.value,
        "canary_version": values["canary_version"],
        "stable_version": values["stable_version"],
        "stable_slot": values["stable_slot"],
        "canary_slot": values["canary_slot"],
        "targets": targets_of(values["router"]),
        "weights": slot_split(record),
        "previous": previous_of(record, row),
        "step_index": values["step_index"],
        "steps": _step_documents(rollout.steps),
        "desired_weight": values["desired_weight"],
        "applied_weight": values["applied_weight"],
        "generation": values["generation"],
        "applied_generation": values["applied_generation"],
        # Whether no request can reach the canary any more (what a rollback waits for).
        "traffic_at_zero": values["applied_weight"] == 0,
        "step_started_at": iso(values["step_started_at"]),
        "ready": bool(ready and ready.ready),
        "blocked_by": list(ready.blocking_gates) if ready else [],
        "ready_at": iso(ready.ready_at) if ready and ready.ready_at else None,
        "time_left": format_duration(whole_seconds(ready.time_left)) if ready else None,
        "waited": format_duration(ready.waited) if ready else None,
        "paused_at": iso(values["paused_at"]),
        "paused_for": format_duration(rollout.paused_for),
        "auto_promote": values["auto_promote"],
        "interval": format_duration(timedelta(seconds=values["interval_seconds"])),
        "triggered_by": values["triggered_by"],
        "gates": [
            {
                "name": gate.name,
                "phase": gate.phase.value,
                "value": _number(gate.value),
                "threshold": _number(gate.threshold),
                "failing_since": iso(gate.failing_since),
                "breached": gate.breached,
                "detail": gate.detail,
                **_gate_rule(record, gate.name),
            }
            for gate in rollout.gates
        ],
        "reason": values["reason"],
        "router": values["router"],
        "router_error": values["router_error"],
        "router_attempts": values["router_attempts"],
        "router_retry_at": iso(values["router_retry_at"]),
        "created_by": values["created_by"],
        "created_at": iso(values["created_at"]),
        "updated_at": iso(values["updated_at"]),
        "finished_at": iso(values["finished_at"]),
        "next_evaluation_at": iso(values["next_evaluation_at"]),
        "lease_seconds": _number(values["lease_seconds"]),
        "lease_until": iso(values["lease_until"]),
        "time_to_safe": values["time_to_safe"],
        "holds": [
            {"kind": hold.kind.value, "detail": hold.detail, "until": iso(hold.until)}
            for hold in holds
        ],
        "alerts": alerts or [],
        "notifications": notifications or [],
    }  # fmt: skip


def _number(value: float | None) -> float | None:
    # What a `float | None` field writes: an integer as a float (1.0, not 1), and null for
    # NaN and the infinities (a Prometheus ratio over no requests is NaN).
    return None if value is None or not math.isfinite(value) else float(value)


@functools.lru_cache(maxsize=1024)
def _step_documents(steps: tuple[machine.Step, ...]) -> tuple[dict[str, Any], ...]:
    # Ladders repeat (one per policy): the same steps are shown in every answer. Documents are
    # only written out, never changed, so one copy serves them all.
    return tuple({"weight": step.weight, "wait": format_duration(step.wait)} for step in steps)


def _gate_rule(record: RolloutRecord, name: str) -> dict[str, Any]:
    # The comparison the gate was started with, so that a value and threshold read on their own
    # (none for a gate no longer in the rollout's policy).
    for gate in (record.gate_policy or {}).get("gates", []):
        if gate.get("name") == name:
            return {"op": gate.get("op"), "for": gate.get("for"),
                    "on_no_data": gate.get("on_no_data", "hold")}  # fmt: skip
    return _NO_RULE


_NO_RULE: dict[str, Any] = {"op": None, "for": None, "on_no_data": None}
