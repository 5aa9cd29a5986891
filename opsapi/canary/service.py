"""Canary operations on the database: load, decide with the machine, store. Never commits."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from opsapi.canary import machine
from opsapi.canary.machine import (
    Actor,
    Audit,
    Decision,
    Event,
    GatePhase,
    GateStatus,
    Refusal,
    RefusalCode,
    SetWeight,
    State,
    Step,
    Transition,
)
from opsapi.canary.models import RolloutRecord, ServiceRecord
from opsapi.canary.policy import Policy
from opsapi.durations import format_duration
from opsapi.errors import Conflict, NotFound, Problem, Unprocessable
from opsapi.http.params import iso
from opsapi.pagerduty import outbox as pagerduty_outbox

OPEN_STATE_VALUES = [state.value for state in machine.OPEN_STATES]


# Policies -------------------------------------------------------------------------------------


async def load_policy(service: str, *, default: Policy, session: AsyncSession) -> Policy:
    """The service's stored policy, or `default` for a service never configured."""
    record = await session.get(ServiceRecord, service)
    return _policy_of(record, default)


def _policy_of(record: ServiceRecord | None, default: Policy) -> Policy:
    # A row created only to hold a stable version stores {}: it has no policy of its own.
    if record is None or not record.policy:
        return default
    return Policy.model_validate(record.policy)


async def save_policy(
    service: str,
    policy: Policy,
    *,
    default: Policy,
    actor: str,
    now: datetime,
    session: AsyncSession,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Store `policy` for `service`; return the policy documents before and after."""
    await _ensure_service_row(service, now=now, session=session)
    record = await session.get(ServiceRecord, service, with_for_update=True)
    assert record is not None
    before = _policy_of(record, default).document()
    record.policy = policy.model_dump(mode="json", by_alias=True, exclude_none=True)
    record.updated_at = now
    record.updated_by = actor
    session.add(record)
    await session.flush()
    return before, policy.document()


# Rollouts: loading and mapping ------------------------------------------------------------------


async def open_rollout(
    service: str, *, session: AsyncSession, lock: bool = False
) -> RolloutRecord | None:
    """The service's open rollout, locked for update when `lock` is set."""
    query = select(RolloutRecord).where(
        RolloutRecord.service == service, col(RolloutRecord.state).in_(OPEN_STATE_VALUES)
    )
    if lock:
        query = query.with_for_update()
    return (await session.exec(query)).first()


async def latest_rollout(service: str, *, session: AsyncSession) -> RolloutRecord | None:
    """The service's most recent rollout, open or finished."""
    query = (
        select(RolloutRecord)
        .where(RolloutRecord.service == service)
        .order_by(col(RolloutRecord.id).desc())
        .limit(1)
    )
    return (await session.exec(query)).first()


async def list_open(*, session: AsyncSession) -> Sequence[RolloutRecord]:
    """Every open rollout, by service name."""
    query = (
        select(RolloutRecord)
        .where(col(RolloutRecord.state).in_(OPEN_STATE_VALUES))
        .order_by(col(RolloutRecord.service))
    )
    return (await session.exec(query)).all()


async def history(
    service: str, *, limit: int, before_id: int | None, session: AsyncSession
) -> Sequence[RolloutRecord]:
    """The service's rollouts, newest first, keyset-paginated by id."""
    query = select(RolloutRecord).where(RolloutRecord.service == service)
    if before_id is not None:
        query = query.where(col(RolloutRecord.id) < before_id)
    query = query.order_by(col(RolloutRecord.id).desc()).limit(limit)
    return (await session.exec(query)).all()


def to_machine(record: RolloutRecord) -> machine.Rollout:
    """The state machine's view of a stored rollout."""
    return machine.Rollout(
        service=record.service,
        canary_version=record.canary_version,
        stable_version=record.stable_version,
        steps=tuple(Step(step["weight"], timedelta(seconds=step["wait"])) for step in record.steps),
        state=State(record.state),
        step_index=record.step_index,
        desired_weight=record.desired_weight,
        step_started_at=record.step_started_at,
        triggered_by=machine.Trigger(record.triggered_by),
        auto_promote=record.auto_promote,
        paused_at=record.paused_at,
        paused_for=timedelta(seconds=record.paused_seconds),
        reason=record.reason,
        gates=tuple(_gate_from_json(gate) for gate in record.gates),
        finished_at=record.finished_at,
    )


def _gate_from_json(gate: dict[str, Any]) -> GateStatus:
    failing_since = gate.get("failing_since")
    return GateStatus(
        name=gate["name"],
        phase=GatePhase(gate.get("phase", GatePhase.PENDING)),
        value=gate.get("value"),
        threshold=gate.get("threshold"),
        failing_since=datetime.fromisoformat(failing_since) if failing_since else None,
        breached=gate.get("breached", False),
        detail=gate.get("detail"),
    )


def _gate_to_json(gate: GateStatus) -> dict[str, Any]:
    return {
        "name": gate.name,
        "phase": gate.phase.value,
        "value": gate.value,
        "threshold": gate.threshold,
        "failing_since": gate.failing_since.isoformat() if gate.failing_since else None,
        "breached": gate.breached,
        "detail": gate.detail,
    }


def _store(record: RolloutRecord, rollout: machine.Rollout, now: datetime) -> None:
    record.state = rollout.state.value
    record.stable_version = rollout.stable_version
    record.step_index = rollout.step_index
    record.desired_weight = rollout.desired_weight
    record.step_started_at = rollout.step_started_at
    record.paused_at = rollout.paused_at
    record.paused_seconds = rollout.paused_for.total_seconds()
    record.triggered_by = rollout.triggered_by.value
    record.reason = rollout.reason
    record.gates = [_gate_to_json(gate) for gate in rollout.gates]
    record.finished_at = rollout.finished_at
    record.updated_at = now
    due = machine.next_due(rollout, now, timedelta(seconds=record.interval_seconds))
    record.next_evaluation_at = due


# Rollouts: applying events ----------------------------------------------------------------------


@dataclass(frozen=True)
class Applied:
    """What an event did: the stored rollout afterwards and the audit-worthy transition."""

    record: RolloutRecord
    transition: Transition

    @property
    def audit_details(self) -> dict[str, Any]:
        details: dict[str, Any] = {}
        for effect in self.transition.effects:
            if isinstance(effect, Audit):
                details.update(effect.details, transition=effect.action)
        return details


def refusal_problem(refusal: Refusal, record: RolloutRecord | None) -> Problem:
    """The client-facing error for a refused event."""
    extra: dict[str, Any] = {"reason_code": refusal.code.value}
    if record is not None:
        extra["rollout_id"] = record.id
        extra["state"] = record.state
        extra["current_weight"] = record.desired_weight
    if refusal.time_left is not None:
        extra["time_left"] = format_duration(_whole_seconds(refusal.time_left))
        extra["time_left_seconds"] = round(refusal.time_left.total_seconds(), 3)
    if refusal.failing_gates:
        extra["failing_gates"] = list(refusal.failing_gates)
    if refusal.code == RefusalCode.NO_ROLLOUT:
        return NotFound(refusal.detail, **extra)
    if refusal.code == RefusalCode.INVALID_TARGET:
        return Unprocessable(refusal.detail, **extra)
    return Conflict(refusal.detail, **extra)


async def apply_event(
    record: RolloutRecord, event: Event, *, now: datetime, session: AsyncSession
) -> Applied:
    """Apply `event` to a stored open rollout (locked by the caller); raise a Problem if refused."""
    decision = machine.decide(to_machine(record), event, now)
    return await _commit_decision(record, decision, now=now, session=session)


async def _commit_decision(
    record: RolloutRecord, decision: Decision, *, now: datetime, session: AsyncSession
) -> Applied:
    if isinstance(decision, Refusal):
        raise refusal_problem(decision, record)
    _store(record, decision.rollout, now)
    for effect in decision.effects:
        if isinstance(effect, SetWeight):
            _set_desired_weight(record, effect.weight)
    if decision.rollout.state == State.SUCCEEDED and decision.changed:
        await _record_new_stable(record, now=now, session=session)
    session.add(record)
    await session.flush()
    return Applied(record, decision)


def _set_desired_weight(record: RolloutRecord, weight: int) -> None:
    record.desired_weight = weight
    if record.router.get("name", "pull") == "pull":
        # The pull router's clients read the committed weight: committing it is applying it.
        record.applied_weight = weight
        record.router_error = None


async def _ensure_service_row(service: str, *, now: datetime, session: AsyncSession) -> None:
    # Concurrent first writers must not collide on the insert: create the row (with the default
    # policy, stored as {}) if missing, then everyone locks the same row.
    dialect = session.bind.dialect.name if session.bind else "postgresql"
    insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    await session.exec(
        insert(ServiceRecord)
        .values(name=service, policy={}, updated_at=now, updated_by="system")
        .on_conflict_do_nothing(index_elements=["name"])
    )


async def _record_new_stable(
    record: RolloutRecord, *, now: datetime, session: AsyncSession
) -> None:
    await _ensure_service_row(record.service, now=now, session=session)
    service = await session.get(ServiceRecord, record.service, with_for_update=True)
    assert service is not None
    service.stable_version = record.canary_version
    session.add(service)
    # The service is healthy again: resolve its earlier rollouts' PagerDuty alerts.
    await pagerduty_outbox.resolve_earlier(session, record, now=now)


async def start_rollout(
    service: str,
    version: str,
    *,
    actor: Actor,
    now: datetime,
    default: Policy,
    session: AsyncSession,
    target_percent: int | None = None,
    reason: str | None = None,
) -> Applied:
    """Open a rollout of `version` at the policy's first step (or `target_percent`)."""
    policy = await load_policy(service, default=default, session=session)
    service_record = await session.get(ServiceRecord, service)
    stable = service_record.stable_version if service_record else None
    if stable == version:
        raise Conflict(f"{version} is already the stable version of {service}")
    event = machine.Start(
        service=service,
        canary_version=version,
        stable_version=stable,
        steps=policy.machine_steps(),
        actor=actor,
        auto_promote=policy.auto_promote,
        gate_names=tuple(gate.name for gate in policy.gates),
        target_percent=target_percent,
        reason=reason,
    )
    decision = machine.decide(None, event, now)
    if isinstance(decision, Refusal):
        raise refusal_problem(decision, None)
    record = RolloutRecord(
        service=service,
        state=decision.rollout.state.value,
        canary_version=version,
        stable_version=stable,
        steps=[{"weight": s.weight, "wait": s.wait.total_seconds()} for s in event.steps],
        step_index=decision.rollout.step_index,
        desired_weight=0,
        step_started_at=now,
        auto_promote=policy.auto_promote,
        interval_seconds=policy.interval.total_seconds(),
        router=policy.router.model_dump(mode="json"),
        gate_policy=policy.model_dump(
            mode="json", by_alias=True, include={"gates", "min_sample"}, exclude_none=True
        ),
        triggered_by=actor.triggered_by.value,
        created_by=actor.name,
        created_at=now,
        updated_at=now,
    )
    session.add(record)
    try:
        return await _commit_decision(record, decision, now=now, session=session)
    except IntegrityError:
        # Another request opened a rollout for this service first (unique partial index).
        raise Conflict(
            f"{service} already has an open rollout", reason_code="open_rollout"
        ) from None


async def lock_open_rollout(service: str, *, session: AsyncSession) -> RolloutRecord:
    """The open rollout of `service`, locked; NotFound/Conflict when there is none."""
    record = await open_rollout(service, session=session, lock=True)
    if record is not None:
        return record
    latest = await latest_rollout(service, session=session)
    if latest is None:
        raise NotFound(f"{service} has no rollout", reason_code="no_rollout")
    verb = "succeeded" if latest.state == State.SUCCEEDED else "been rolled back"
    raise Conflict(
        f"the latest rollout of {service} ({latest.canary_version}) has already {verb}",
        reason_code="terminal",
        rollout_id=latest.id,
        state=latest.state,
    )


async def claim_due(*, now: datetime, limit: int, session: AsyncSession) -> Sequence[RolloutRecord]:
    """Open rollouts whose next evaluation is due, locked so no other replica takes them."""
    query = (
        select(RolloutRecord)
        .where(
            col(RolloutRecord.state).in_(OPEN_STATE_VALUES),
            col(RolloutRecord.next_evaluation_at) <= now,
        )
        .order_by(col(RolloutRecord.next_evaluation_at))
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return (await session.exec(query)).all()


# The rollout document -------------------------------------------------------------------------


def rollout_view(record: RolloutRecord, now: datetime) -> dict[str, Any]:
    """The rollout as the API shows it (DESIGN §4 shape, plus timers)."""
    rollout = to_machine(record)
    ready = machine.readiness(rollout, now) if rollout.is_open else None
    return {
        "id": record.id,
        "service": record.service,
        "state": record.state,
        "canary_version": record.canary_version,
        "stable_version": record.stable_version,
        "step_index": record.step_index,
        "steps": [
            {"weight": step.weight, "wait": format_duration(step.wait)} for step in rollout.steps
        ],
        "desired_weight": record.desired_weight,
        "applied_weight": record.applied_weight,
        "step_started_at": iso(record.step_started_at),
        "ready": bool(ready and ready.ready),
        "blocked_by": list(ready.blocking_gates) if ready else [],
        "ready_at": iso(ready.ready_at) if ready and ready.ready_at else None,
        "time_left": format_duration(_whole_seconds(ready.time_left)) if ready else None,
        "waited": format_duration(ready.waited) if ready else None,
        "paused_at": iso(record.paused_at),
        "paused_for": format_duration(rollout.paused_for),
        "auto_promote": record.auto_promote,
        "triggered_by": record.triggered_by,
        "gates": [
            {
                "name": gate.name,
                "phase": gate.phase.value,
                "value": gate.value,
                "threshold": gate.threshold,
                "failing_since": iso(gate.failing_since),
                "breached": gate.breached,
                "detail": gate.detail,
                **_gate_rule(record, gate.name),
            }
            for gate in rollout.gates
        ],
        "reason": record.reason,
        "router": record.router,
        "router_error": record.router_error,
        "router_attempts": record.router_attempts,
        "router_retry_at": iso(record.router_retry_at),
        "created_by": record.created_by,
        "created_at": iso(record.created_at),
        "updated_at": iso(record.updated_at),
        "finished_at": iso(record.finished_at),
        "next_evaluation_at": iso(record.next_evaluation_at),
    }


def _gate_rule(record: RolloutRecord, name: str) -> dict[str, Any]:
    # The comparison the gate was started with, so that a value and threshold read on their own.
    for gate in (record.gate_policy or {}).get("gates", []):
        if gate.get("name") == name:
            return {"op": gate.get("op"), "for": gate.get("for"),
                    "on_no_data": gate.get("on_no_data", "hold")}  # fmt: skip
    return {}


def _whole_seconds(duration: timedelta) -> timedelta:
    # "29m59s975ms" helps nobody: round what is left up to whole seconds.
    return timedelta(seconds=math.ceil(duration.total_seconds()))
