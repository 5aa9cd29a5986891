"""The rollout state machine: pure, no I/O.

`decide(rollout, event, now)` returns either a `Transition` (the new rollout and the effects the
caller must carry out) or a `Refusal` (why the event cannot apply; nothing changes). The caller
owns the clock, the database and the routers.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from opsapi.durations import format_duration


class State(enum.StrEnum):
    PROGRESSING = "progressing"
    PAUSED = "paused"
    AWAITING_PROMOTION = "awaiting_promotion"
    BAKING = "baking"
    SUCCEEDED = "succeeded"
    ROLLED_BACK = "rolled_back"
    # A succeeded rollout whose previous version was made stable again (POST /canary/revert).
    REVERTED = "reverted"


TERMINAL_STATES = frozenset({State.SUCCEEDED, State.ROLLED_BACK, State.REVERTED})
OPEN_STATES = frozenset(State) - TERMINAL_STATES


class Trigger(enum.StrEnum):
    USER = "user"
    CONTROLLER = "controller"
    PAGERDUTY = "pagerduty"
    SYSTEM = "system"


class GatePhase(enum.StrEnum):
    PENDING = "pending"  # configured, not measured yet in this step
    PASS = "pass"
    FAIL = "fail"
    NO_DATA = "no_data"


@dataclass(frozen=True)
class Step:
    weight: int
    wait: timedelta


@dataclass(frozen=True)
class GateStatus:
    """The latest judgement of one gate, as the gate evaluator reports it."""

    name: str
    phase: GatePhase = GatePhase.PENDING
    value: float | None = None
    threshold: float | None = None
    failing_since: datetime | None = None
    breached: bool = False
    detail: str | None = None


DEFAULT_SLOTS = ("blue", "green")


class HoldKind(enum.StrEnum):
    INCIDENT_OPEN = "incident_open"
    FROZEN = "frozen"


@dataclass(frozen=True)
class Hold:
    """Why changes to a service are held now: an open incident, a freeze window (DESIGN §12).

    A hold refuses starts and promotions and keeps auto-promotion waiting; it never blocks a
    rollback or a revert."""

    kind: HoldKind
    detail: str
    until: datetime | None = None


@dataclass(frozen=True)
class ServiceState:
    """What a service carries from one rollout to the next (DESIGN §9, §12)."""

    name: str
    slots: tuple[str, str] = DEFAULT_SLOTS
    stable_version: str | None = None
    # None until the service's first start: the first slot named then serves the stable version.
    stable_slot: str | None = None
    previous_version: str | None = None
    previous_slot: str | None = None
    # Versions rolled back by a breach or an incident: not started again without an override.
    rejected: frozenset[str] = frozenset()
    holds: tuple[Hold, ...] = ()

    def other_slot(self, slot: str) -> str:
        """The slot that is not `slot`."""
        return self.slots[1] if slot == self.slots[0] else self.slots[0]


@dataclass(frozen=True)
class Rollout:
    """A rollout's decision-relevant state (the storage layer maps it to a row)."""

    service: str
    canary_version: str
    stable_version: str | None
    steps: tuple[Step, ...]
    state: State
    step_index: int
    desired_weight: int
    step_started_at: datetime
    triggered_by: Trigger
    auto_promote: bool = False
    paused_at: datetime | None = None
    paused_for: timedelta = timedelta(0)
    reason: str | None = None
    gates: tuple[GateStatus, ...] = ()
    finished_at: datetime | None = None
    # The canary's slot gets `desired_weight`, the other slot the rest. After a success the
    # stable slot is the canary's (both name where the new stable version runs).
    stable_slot: str = DEFAULT_SLOTS[0]
    canary_slot: str = DEFAULT_SLOTS[1]
    # The fail-safe lease of the applied weight (DESIGN §12); None once a person pinned it.
    lease: timedelta | None = None

    @property
    def step(self) -> Step:
        return self.steps[self.step_index]

    @property
    def is_open(self) -> bool:
        return self.state in OPEN_STATES


# Events ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Actor:
    triggered_by: Trigger
    name: str


CONTROLLER = Actor(Trigger.CONTROLLER, "controller")


@dataclass(frozen=True)
class Start:
    service: str
    canary_version: str
    # The version running before this rollout, when declared by the caller (first rollout);
    # otherwise the service's stable version.
    stable_version: str | None
    steps: tuple[Step, ...]
    actor: Actor
    auto_promote: bool = False
    gate_names: tuple[str, ...] = ()
    target_percent: int | None = None
    reason: str | None = None
    lease: timedelta | None = None
    # An admin's break-glass past holds (incident, freeze) and a rejected version, with why.
    override: Override | None = None


@dataclass(frozen=True)
class Override:
    """An admin's audited decision to act despite what would refuse it."""

    reason: str
    holds: bool = False
    rejection: bool = False


@dataclass(frozen=True)
class Promote:
    actor: Actor
    force: bool = False
    target_percent: int | None = None
    from_percent: int | None = None
    reason: str | None = None
    override: Override | None = None


@dataclass(frozen=True)
class Rollback:
    reason: str
    actor: Actor


@dataclass(frozen=True)
class Revert:
    """Make the previous version stable again after a success (DESIGN §9)."""

    reason: str
    actor: Actor


@dataclass(frozen=True)
class PinWeight:
    """An operator's emergency weight outside the step ladder: the rollout pauses there."""

    weight: int
    reason: str
    actor: Actor


@dataclass(frozen=True)
class Pause:
    actor: Actor
    reason: str | None = None


@dataclass(frozen=True)
class Resume:
    actor: Actor
    reason: str | None = None


@dataclass(frozen=True)
class GateResults:
    results: tuple[GateStatus, ...]


@dataclass(frozen=True)
class Tick:
    pass


Event = Start | Promote | Rollback | Revert | PinWeight | Pause | Resume | GateResults | Tick


# Outcomes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetWeight:
    weight: int


@dataclass(frozen=True)
class Notify:
    kind: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Audit:
    action: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SwapSlots:
    """The stable slot changed (a success or a revert): routers must learn the new roles even
    when no percentage moves (a webhook receiver routes by version)."""


class PageKind(enum.StrEnum):
    TRIGGER = "trigger"  # an automatic rollback: page the service's on-call
    RESOLVE_EARLIER = "resolve_earlier"  # a success: resolve the service's earlier pages


@dataclass(frozen=True)
class Page:
    kind: PageKind
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reject:
    """A version rolled back by a breach or an incident is not to be started again."""

    version: str
    reason: str


Effect = SetWeight | SwapSlots | Notify | Audit | Page | Reject


@dataclass(frozen=True)
class Transition:
    rollout: Rollout
    effects: tuple[Effect, ...] = ()
    # The service's new lifecycle state when this transition changes it (start, success,
    # revert); None when it stays as it was.
    service: ServiceState | None = None

    @property
    def changed(self) -> bool:
        return bool(self.effects)


class RefusalCode(enum.StrEnum):
    NO_ROLLOUT = "no_rollout"
    OPEN_ROLLOUT = "open_rollout"
    TERMINAL = "terminal"
    NOT_READY = "not_ready"
    STALE = "stale"
    PAUSED = "paused"
    NOT_PAUSED = "not_paused"
    INVALID_TARGET = "invalid_target"
    ALREADY_STABLE = "already_stable"
    STABLE_MISMATCH = "stable_mismatch"
    UNKNOWN_SLOT = "unknown_slot"
    NOTHING_TO_REVERT = "nothing_to_revert"
    INCIDENT_OPEN = "incident_open"
    FROZEN = "frozen"
    VERSION_REJECTED = "version_rejected"


@dataclass(frozen=True)
class Refusal:
    code: RefusalCode
    detail: str
    time_left: timedelta | None = None
    failing_gates: tuple[str, ...] = ()
    holds: tuple[Hold, ...] = ()


Decision = Transition | Refusal


# Readiness ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Readiness:
    ready: bool
    waited: timedelta
    time_left: timedelta
    ready_at: datetime | None
    blocking_gates: tuple[str, ...]


def waited(rollout: Rollout, now: datetime) -> timedelta:
    """Time spent waiting in the current step, paused time excluded."""
    paused = rollout.paused_for
    if rollout.paused_at is not None:
        paused += now - rollout.paused_at
    return max(timedelta(0), now - rollout.step_started_at - paused)


def readiness(rollout: Rollout, now: datetime) -> Readiness:
    """Whether the current step is ready: its wait is over and every gate's latest phase is pass."""
    spent = waited(rollout, now)
    left = max(timedelta(0), rollout.step.wait - spent)
    blocking = tuple(gate.name for gate in rollout.gates if gate.phase != GatePhase.PASS)
    ready_at = None if rollout.paused_at is not None else now + left
    ready = rollout.is_open and rollout.paused_at is None and left == timedelta(0) and not blocking
    return Readiness(ready, spent, left, ready_at, blocking)


def next_due(rollout: Rollout, now: datetime, interval: timedelta) -> datetime | None:
    """When the controller should look at this rollout again (None once it is finished)."""
    if not rollout.is_open:
        return None
    due = now + interval
    state = readiness(rollout, now)
    if state.ready_at is not None and state.time_left > timedelta(0):
        due = min(due, state.ready_at)
    return due


# The machine ----------------------------------------------------------------------------------


def decide(
    rollout: Rollout | None, event: Event, now: datetime, service: ServiceState | None = None
) -> Decision:
    """Apply `event` to `rollout` (the service's latest) at `now`, given the service's state."""
    if isinstance(event, Start):
        if rollout is not None and rollout.is_open:
            return Refusal(
                RefusalCode.OPEN_ROLLOUT,
                f"{rollout.service} already has an open rollout of {rollout.canary_version}",
            )
        return _start(event, now, service or ServiceState(event.service))
    if rollout is None:
        return Refusal(RefusalCode.NO_ROLLOUT, "there is no rollout")
    if isinstance(event, Revert):
        return _revert(rollout, event, now, service)
    if not rollout.is_open:
        if isinstance(event, GateResults | Tick):
            return Transition(rollout)  # a finished rollout absorbs the controller's events
        return Refusal(
            RefusalCode.TERMINAL,
            f"the latest rollout of {rollout.service} has already {_finished_verb(rollout.state)}",
        )
    match event:
        case Promote():
            return _promote(rollout, event, now, service)
        case Rollback():
            return _rollback(rollout, event.reason, event.actor, now)
        case PinWeight():
            return _pin(rollout, event, now)
        case Pause():
            return _pause(rollout, event, now)
        case Resume():
            return _resume(rollout, event, now, service)
        case GateResults():
            return _gate_results(rollout, event, now, service)
        case Tick():
            return _settle(rollout, now, service)


def _finished_verb(state: State) -> str:
    return {
        State.SUCCEEDED: "succeeded",
        State.ROLLED_BACK: "been rolled back",
        State.REVERTED: "been reverted",
    }.get(state, state.value)


def _step_index_for(steps: Sequence[Step], weight: int) -> int | None:
    for index, step in enumerate(steps):
        if step.weight == weight:
            return index
    return None


def _start(event: Start, now: datetime, service: ServiceState) -> Decision:
    stable_version = service.stable_version
    if stable_version is not None and stable_version == event.canary_version:
        return Refusal(
            RefusalCode.ALREADY_STABLE,
            f"{event.canary_version} is already the stable version of {event.service}",
        )
    if event.stable_version is not None and stable_version is None:
        stable_version = event.stable_version  # declared: what ran before opsapi knew it
    elif event.stable_version is not None and event.stable_version != stable_version:
        return Refusal(
            RefusalCode.STABLE_MISMATCH,
            f"the stable version of {event.service} is {stable_version}, "
            f"not {event.stable_version}",
        )
    if stable_version == event.canary_version:
        return Refusal(
            RefusalCode.ALREADY_STABLE,
            f"{event.canary_version} is already the stable version of {event.service}",
        )
    override = event.override
    if event.canary_version in service.rejected and not (override and override.rejection):
        return Refusal(
            RefusalCode.VERSION_REJECTED,
            f"{event.canary_version} of {event.service} was rolled back by a breach or an "
            "incident; an admin may start it again with an override and a reason",
        )
    held = _held(service, override)
    if held is not None:
        return held
    stable_slot = service.stable_slot or service.slots[0]
    if stable_slot not in service.slots:
        return Refusal(
            RefusalCode.UNKNOWN_SLOT,
            f"the stable version of {event.service} runs in slot {stable_slot}, which the "
            f"policy's router no longer names ({', '.join(service.slots)})",
        )
    canary_slot = service.other_slot(stable_slot)
    index = 0
    if event.target_percent is not None:
        found = _step_index_for(event.steps, event.target_percent)
        if found is None:
            return Refusal(
                RefusalCode.INVALID_TARGET,
                f"{event.target_percent}% is not a step of this policy ({_weights(event.steps)})",
            )
        index = found
    step = event.steps[index]
    rollout = Rollout(
        service=event.service,
        canary_version=event.canary_version,
        stable_version=stable_version,
        steps=event.steps,
        state=State.BAKING if step.weight == 100 else State.PROGRESSING,
        step_index=index,
        desired_weight=step.weight,
        step_started_at=now,
        triggered_by=event.actor.triggered_by,
        auto_promote=event.auto_promote,
        reason=event.reason,
        gates=tuple(GateStatus(name) for name in event.gate_names),
        stable_slot=stable_slot,
        canary_slot=canary_slot,
        lease=event.lease,
    )
    # The canary takes the other slot: what ran there before can no longer be reverted to.
    after = replace(
        service,
        stable_version=stable_version,
        stable_slot=stable_slot,
        previous_version=None,
        previous_slot=None,
    )
    details: dict[str, Any] = {
        "to_state": rollout.state.value,
        "to_weight": step.weight,
        "stable_version": stable_version,
        "stable_slot": stable_slot,
        "canary_slot": canary_slot,
    }
    if event.target_percent is not None:
        details["target_percent"] = event.target_percent
    if override is not None:
        details["override"] = _override_details(override, service, event.canary_version)
    return Transition(
        rollout,
        (SetWeight(step.weight), Audit("rollout.started", details), Notify("started")),
        service=after,
    )


def _held(service: ServiceState, override: Override | None) -> Refusal | None:
    """The refusal of a start or promotion while the service is held (unless overridden)."""
    if not service.holds or (override is not None and override.holds):
        return None
    hold = service.holds[0]
    code = RefusalCode(hold.kind.value)
    return Refusal(
        code,
        f"changes to {service.name} are held: {hold.detail}; rollback and revert stay "
        "available, and an admin may override with a reason",
        holds=service.holds,
    )


def _override_details(
    override: Override, service: ServiceState, version: str | None
) -> dict[str, Any]:
    details: dict[str, Any] = {"reason": override.reason}
    if override.holds and service.holds:
        details["holds"] = [{"kind": h.kind.value, "detail": h.detail} for h in service.holds]
    if override.rejection and version in service.rejected:
        details["rejected_version"] = version
    return details


def _weights(steps: Sequence[Step]) -> str:
    return ", ".join(f"{step.weight}%" for step in steps)


def _promote(
    rollout: Rollout, event: Promote, now: datetime, service: ServiceState | None
) -> Decision:
    if event.from_percent is not None and event.from_percent != rollout.desired_weight:
        return Refusal(
            RefusalCode.STALE,
            f"the rollout is at {rollout.desired_weight}%, not {event.from_percent}%",
        )
    if rollout.state == State.PAUSED:
        return Refusal(RefusalCode.PAUSED, "the rollout is paused; resume it first")
    if service is not None:
        held = _held(service, event.override)
        if held is not None:
            return held
    target = rollout.step_index + 1
    if event.target_percent is not None:
        found = _step_index_for(rollout.steps, event.target_percent)
        if found is None or found <= rollout.step_index:
            return Refusal(
                RefusalCode.INVALID_TARGET,
                f"target {event.target_percent}% is not a later step than "
                f"{rollout.desired_weight}% ({_weights(rollout.steps)})",
            )
        target = found
    state = readiness(rollout, now)
    if not state.ready and not event.force:
        return _not_ready(rollout, state)
    if rollout.state == State.BAKING:
        decision = _succeed(
            rollout, event.actor, now, service, forced=event.force and not state.ready
        )
    else:
        decision = _advance(
            rollout, target, event.actor, now, forced=event.force and not state.ready
        )
    if event.override is not None and service is not None and service.holds:
        return _with_override(decision, _override_details(event.override, service, None))
    return decision


def _with_override(decision: Decision, override: dict[str, Any]) -> Decision:
    if isinstance(decision, Refusal):
        return decision
    effects = tuple(
        replace(e, details={**e.details, "override": override}) if isinstance(e, Audit) else e
        for e in decision.effects
    )
    return replace(decision, effects=effects)


def _not_ready(rollout: Rollout, state: Readiness) -> Refusal:
    reasons = []
    if state.time_left > timedelta(0):
        what = "bake" if rollout.step.weight == 100 else "wait"
        left = timedelta(seconds=math.ceil(state.time_left.total_seconds()))
        reasons.append(f"{format_duration(left)} left in its {what}")
    if state.blocking_gates:
        reasons.append("gates not passing: " + ", ".join(state.blocking_gates))
    return Refusal(
        RefusalCode.NOT_READY,
        f"step {rollout.desired_weight}% is not ready: " + "; ".join(reasons),
        time_left=state.time_left,
        failing_gates=state.blocking_gates,
    )


def _advance(
    rollout: Rollout, target: int, actor: Actor, now: datetime, *, forced: bool
) -> Decision:
    step = rollout.steps[target]
    advanced = replace(
        rollout,
        state=State.BAKING if step.weight == 100 else State.PROGRESSING,
        step_index=target,
        desired_weight=step.weight,
        step_started_at=now,
        paused_at=None,
        paused_for=timedelta(0),
        triggered_by=actor.triggered_by,
        gates=tuple(GateStatus(gate.name) for gate in rollout.gates),
    )
    details: dict[str, Any] = {
        "from_weight": rollout.desired_weight,
        "to_weight": step.weight,
        "from_state": rollout.state.value,
        "to_state": advanced.state.value,
        "forced": forced,
    }
    if target != rollout.step_index + 1:
        details["jumped"] = True
        details["target_percent"] = step.weight
    return Transition(
        advanced, (SetWeight(step.weight), Audit("rollout.promoted", details), Notify("promoted"))
    )


def _succeed(
    rollout: Rollout, actor: Actor, now: datetime, service: ServiceState | None, *, forced: bool
) -> Decision:
    done = replace(
        rollout,
        state=State.SUCCEEDED,
        stable_version=rollout.canary_version,
        stable_slot=rollout.canary_slot,
        triggered_by=actor.triggered_by,
        paused_at=None,
        finished_at=now,
    )
    # The swap: the canary's slot now serves the stable version; the old stable version and
    # its slot are what a revert goes back to.
    before = service or ServiceState(rollout.service)
    after = replace(
        before,
        stable_version=rollout.canary_version,
        stable_slot=rollout.canary_slot,
        previous_version=rollout.stable_version,
        previous_slot=rollout.stable_slot,
    )
    details = {
        "from_state": rollout.state.value,
        "to_state": done.state.value,
        "forced": forced,
        "stable_version": rollout.canary_version,
        "stable_slot": rollout.canary_slot,
        "previous_version": rollout.stable_version,
        "previous_slot": rollout.stable_slot,
    }
    return Transition(
        done,
        (
            SwapSlots(),
            Audit("rollout.succeeded", details),
            Notify("succeeded"),
            Page(PageKind.RESOLVE_EARLIER),
        ),
        service=after,
    )


def _revert(
    rollout: Rollout, event: Revert, now: datetime, service: ServiceState | None
) -> Decision:
    if rollout.is_open:
        return Refusal(
            RefusalCode.OPEN_ROLLOUT,
            f"{rollout.service} has an open rollout of {rollout.canary_version} in slot "
            f"{rollout.canary_slot}; roll it back instead",
        )
    current = service or ServiceState(rollout.service)
    revertible = (
        rollout.state == State.SUCCEEDED
        and current.previous_version is not None
        and current.previous_slot is not None
        and current.stable_version == rollout.canary_version
        and current.stable_slot == rollout.canary_slot
    )
    if not revertible or current.previous_version is None or current.previous_slot is None:
        return Refusal(
            RefusalCode.NOTHING_TO_REVERT,
            f"{rollout.service} has no previous version to revert to: a revert follows a "
            "success, until a new rollout takes the previous version's slot",
        )
    reverted = replace(
        rollout,
        state=State.REVERTED,
        desired_weight=0,
        stable_version=current.previous_version,
        stable_slot=current.previous_slot,
        triggered_by=event.actor.triggered_by,
        reason=event.reason,
    )
    after = replace(
        current,
        stable_version=current.previous_version,
        stable_slot=current.previous_slot,
        previous_version=None,
        previous_slot=None,
    )
    details: dict[str, Any] = {
        "from_state": rollout.state.value,
        "to_state": reverted.state.value,
        "from_weight": rollout.desired_weight,
        "to_weight": 0,
        "reason": event.reason,
        "reverted_version": rollout.canary_version,
        "stable_version": current.previous_version,
        "stable_slot": current.previous_slot,
    }
    return Transition(
        reverted,
        (
            SetWeight(0),
            SwapSlots(),
            Audit("rollout.reverted", details),
            Notify("reverted", details),
        ),
        service=after,
    )


def _pin(rollout: Rollout, event: PinWeight, now: datetime) -> Decision:
    if not 0 <= event.weight <= 100:
        return Refusal(RefusalCode.INVALID_TARGET, f"{event.weight}% is not a percentage")
    # Paused so that nothing promotes past the person's weight; gates keep running and a
    # breach still rolls back.
    pinned = replace(
        rollout,
        state=State.PAUSED,
        desired_weight=event.weight,
        paused_at=rollout.paused_at or now,
        triggered_by=event.actor.triggered_by,
        # A person's pinned weight holds without the controller's renewals.
        lease=None,
    )
    details: dict[str, Any] = {
        "from_state": rollout.state.value,
        "to_state": pinned.state.value,
        "from_weight": rollout.desired_weight,
        "to_weight": event.weight,
        "reason": event.reason,
    }
    effects: list[Effect] = [SetWeight(event.weight), Audit("rollout.weight_pinned", details)]
    if rollout.state != State.PAUSED:
        effects.append(Notify("paused", details))
    return Transition(pinned, tuple(effects))


def _rollback(
    rollout: Rollout,
    reason: str,
    actor: Actor,
    now: datetime,
    breach: GateStatus | None = None,
) -> Decision:
    paused_for = rollout.paused_for
    if rollout.paused_at is not None:
        paused_for += now - rollout.paused_at
    rolled_back = replace(
        rollout,
        state=State.ROLLED_BACK,
        desired_weight=0,
        paused_at=None,
        paused_for=paused_for,
        triggered_by=actor.triggered_by,
        reason=reason,
        finished_at=now,
    )
    details: dict[str, Any] = {
        "from_state": rollout.state.value,
        "from_weight": rollout.desired_weight,
        "to_weight": 0,
        "reason": reason,
    }
    if breach is not None:
        details["breach"] = {
            "gate": breach.name,
            "value": breach.value,
            "threshold": breach.threshold,
            "failing_since": breach.failing_since.isoformat() if breach.failing_since else None,
        }
    effects: tuple[Effect, ...] = (
        SetWeight(0),
        Audit("rollout.rolled_back", details),
        Notify("rolled_back", details),
    )
    if breach is not None:
        effects += (Page(PageKind.TRIGGER, details),)
    if breach is not None or actor.triggered_by == Trigger.PAGERDUTY:
        # The evidence says this version is bad: starting it again takes an admin's override.
        effects += (Reject(rollout.canary_version, reason),)
    return Transition(rolled_back, effects)


def _pause(rollout: Rollout, event: Pause, now: datetime) -> Decision:
    if rollout.state == State.PAUSED:
        return Refusal(RefusalCode.PAUSED, "the rollout is already paused")
    paused = replace(
        rollout, state=State.PAUSED, paused_at=now, triggered_by=event.actor.triggered_by
    )
    details = {"from_state": rollout.state.value, "to_state": paused.state.value}
    return Transition(paused, (Audit("rollout.paused", details), Notify("paused")))


def _resume(
    rollout: Rollout, event: Resume, now: datetime, service: ServiceState | None
) -> Decision:
    if rollout.state != State.PAUSED or rollout.paused_at is None:
        return Refusal(RefusalCode.NOT_PAUSED, "the rollout is not paused")
    resumed = replace(
        rollout,
        state=State.BAKING if rollout.step.weight == 100 else State.PROGRESSING,
        paused_for=rollout.paused_for + (now - rollout.paused_at),
        paused_at=None,
        triggered_by=event.actor.triggered_by,
    )
    details = {"from_state": rollout.state.value, "to_state": resumed.state.value}
    settled = _settle(resumed, now, service)
    assert isinstance(settled, Transition)
    after = settled.rollout
    if after.state == State.AWAITING_PROMOTION:
        # The person's resume made the ready step visible; nothing else acted.
        after = replace(after, triggered_by=event.actor.triggered_by)
    return Transition(
        after,
        (Audit("rollout.resumed", details), Notify("resumed"), *settled.effects),
        service=settled.service,
    )


def _gate_results(
    rollout: Rollout, event: GateResults, now: datetime, service: ServiceState | None
) -> Decision:
    latest = {result.name: result for result in event.results}
    gates = tuple(latest.pop(gate.name, gate) for gate in rollout.gates) + tuple(latest.values())
    measured = replace(rollout, gates=gates)
    # Look at every result, not only the merged latest ones: a batch that reports the same gate
    # twice must not hide a breach behind a later, non-breached result.
    breach = next((gate for gate in (*event.results, *gates) if gate.breached), None)
    if breach is not None:
        # Safety never pauses: a breach rolls back from every open state, paused included.
        return _rollback(measured, _breach_reason(breach), CONTROLLER, now, breach)
    settled = _settle(measured, now, service)
    assert isinstance(settled, Transition)
    before = {gate.name: gate.phase for gate in rollout.gates}
    failing = tuple(
        Notify("gate_failing", {"gate": gate.name, "value": gate.value,
                                "threshold": gate.threshold, "detail": gate.detail})
        for gate in gates
        if gate.phase == GatePhase.FAIL and before.get(gate.name) != GatePhase.FAIL
    )  # fmt: skip
    if not failing:
        return settled
    return replace(settled, effects=settled.effects + failing)


def _breach_reason(gate: GateStatus) -> str:
    reason = f"gate {gate.name} breached: value {gate.value} against threshold {gate.threshold}"
    return f"{reason} ({gate.detail})" if gate.detail else reason


def _settle(rollout: Rollout, now: datetime, service: ServiceState | None = None) -> Decision:
    """The time-based transitions: wait over, bake over, readiness lost."""
    state = readiness(rollout, now)
    if rollout.state == State.BAKING and state.ready:
        return _succeed(rollout, CONTROLLER, now, service, forced=False)
    if rollout.state in (State.PROGRESSING, State.AWAITING_PROMOTION) and state.ready:
        if rollout.auto_promote and not (service is not None and service.holds):
            return _advance(rollout, rollout.step_index + 1, CONTROLLER, now, forced=False)
        if rollout.state == State.PROGRESSING:
            awaiting = replace(
                rollout, state=State.AWAITING_PROMOTION, triggered_by=Trigger.CONTROLLER
            )
            details: dict[str, Any] = {
                "from_state": rollout.state.value,
                "to_state": awaiting.state.value,
            }
            return Transition(
                awaiting, (Audit("rollout.ready", details), Notify("awaiting_promotion"))
            )
    if rollout.state == State.AWAITING_PROMOTION and not state.ready:
        back = replace(rollout, state=State.PROGRESSING, triggered_by=Trigger.CONTROLLER)
        details = {
            "from_state": rollout.state.value,
            "to_state": back.state.value,
            "blocking_gates": list(state.blocking_gates),
        }
        return Transition(back, (Audit("rollout.not_ready", details),))
    return Transition(rollout)
