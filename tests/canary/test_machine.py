"""Table-driven tests of the pure rollout state machine (`opsapi.canary.machine`).

Every (state, event) pair is one row of `CASES`: the scenario builds a rollout in that state by
driving `decide` from `Start` (so the rollouts are ones the machine really produces), the event is
applied at the scenario's clock, and the row says what must happen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest

from opsapi.canary.machine import (
    CONTROLLER,
    Actor,
    Audit,
    Decision,
    Effect,
    Event,
    GatePhase,
    GateResults,
    GateStatus,
    Notify,
    Page,
    Pause,
    PinWeight,
    Promote,
    Refusal,
    RefusalCode,
    Reject,
    Resume,
    Revert,
    Rollback,
    Rollout,
    ServiceState,
    SetWeight,
    Start,
    State,
    Step,
    SwapSlots,
    Tick,
    Transition,
    Trigger,
    decide,
    next_due,
    readiness,
    waited,
)

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)
HOUR = timedelta(hours=1)

# The release checklist's default steps: 10% 30m → 25% 15m → 50% 15m → 75% 10m → 100% bake 2h.
STEPS = (
    Step(10, timedelta(minutes=30)),
    Step(25, timedelta(minutes=15)),
    Step(50, timedelta(minutes=15)),
    Step(75, timedelta(minutes=10)),
    Step(100, timedelta(hours=2)),
)
STEP_WEIGHTS = tuple(step.weight for step in STEPS)

SERVICE = "checkout"
GATE = "error-rate"
USER = Actor(Trigger.USER, "alice")
ADMIN = Actor(Trigger.USER, "root-admin")
PAGERDUTY = Actor(Trigger.PAGERDUTY, "pagerduty")


def start_event(
    *, target: int | None = None, auto: bool = False, gates: tuple[str, ...] = (GATE,)
) -> Start:
    return Start(
        service=SERVICE,
        canary_version="v2",
        stable_version="v1",
        steps=STEPS,
        actor=USER,
        auto_promote=auto,
        gate_names=gates,
        target_percent=target,
        reason="ship v2",
    )


def gate(
    phase: GatePhase, value: float = 0.2, *, breached: bool = False, name: str = GATE
) -> GateStatus:
    failing = T0 if phase == GatePhase.FAIL else None
    return GateStatus(name, phase, value, 1.0, failing_since=failing, breached=breached)


PASS = GateResults((gate(GatePhase.PASS),))
FAIL = GateResults((gate(GatePhase.FAIL, 2.5),))
BREACH = GateResults((gate(GatePhase.FAIL, 3.5, breached=True),))


def run(rollout: Rollout | None, event: Event, now: datetime) -> Rollout:
    decision = decide(rollout, event, now)
    assert isinstance(decision, Transition), decision
    return decision.rollout


# Scenarios: (rollout, now) in each state -----------------------------------------------------


def _progressing_at(offset: timedelta, *, auto: bool = False) -> tuple[Rollout, datetime]:
    rollout = run(None, start_event(auto=auto), T0)
    rollout = run(rollout, PASS, T0 + MIN)
    assert rollout.state == State.PROGRESSING
    return rollout, T0 + offset


def _awaiting(*, auto: bool = False) -> tuple[Rollout, datetime]:
    rollout, _ = _progressing_at(timedelta(0))
    rollout = run(rollout, Tick(), T0 + 30 * MIN)
    assert rollout.state == State.AWAITING_PROMOTION
    # `auto_promote` may be switched on by a policy change while a person was expected.
    return replace(rollout, auto_promote=auto), T0 + 31 * MIN


def _awaiting_gate_failing() -> tuple[Rollout, datetime]:
    # A stored awaiting rollout whose gate stopped passing before the machine settled it.
    rollout, now = _awaiting()
    return replace(rollout, gates=(gate(GatePhase.FAIL, 2.5),)), now


def _paused() -> tuple[Rollout, datetime]:
    # Paused 10 minutes into the 30-minute wait; 35 more wall-clock minutes pass while paused.
    rollout, _ = _progressing_at(timedelta(0))
    rollout = run(rollout, Pause(USER), T0 + 10 * MIN)
    return rollout, T0 + 45 * MIN


def _paused_when_ready() -> tuple[Rollout, datetime]:
    rollout, _ = _awaiting()
    rollout = run(rollout, Pause(USER), T0 + 31 * MIN)
    return rollout, T0 + 50 * MIN


def _paused_baking() -> tuple[Rollout, datetime]:
    rollout, _ = _baking_at(timedelta(0))
    rollout = run(rollout, Pause(USER), T0 + HOUR)
    return rollout, T0 + 3 * HOUR


def _baking_at(
    offset: timedelta, *, gate_phase: GatePhase = GatePhase.PASS
) -> tuple[Rollout, datetime]:
    rollout = run(None, start_event(target=100), T0)
    rollout = run(rollout, GateResults((gate(gate_phase),)), T0 + MIN)
    assert rollout.state == State.BAKING
    return rollout, T0 + offset


def _succeeded() -> tuple[Rollout, datetime]:
    rollout, _ = _baking_at(timedelta(0))
    rollout = run(rollout, Tick(), T0 + 2 * HOUR)
    assert rollout.state == State.SUCCEEDED
    return rollout, T0 + 3 * HOUR


def _reverted() -> tuple[Rollout, datetime]:
    rollout, now = _succeeded()
    decision = decide(rollout, Revert("v2 leaks memory", USER), now, AFTER_SUCCESS)
    assert isinstance(decision, Transition), decision
    assert decision.rollout.state == State.REVERTED
    return decision.rollout, now + HOUR


def _rolled_back() -> tuple[Rollout, datetime]:
    rollout, _ = _progressing_at(timedelta(0))
    rollout = run(rollout, Rollback("bad canary", USER), T0 + 10 * MIN)
    assert rollout.state == State.ROLLED_BACK
    return rollout, T0 + 20 * MIN


SCENARIOS: dict[str, Callable[[], tuple[Rollout | None, datetime]]] = {
    "none": lambda: (None, T0),
    "progressing": lambda: _progressing_at(10 * MIN),  # 20m of its 30m wait left
    "progressing-wait-over": lambda: _progressing_at(30 * MIN),  # ready, not ticked yet
    "progressing-wait-over-auto": lambda: _progressing_at(30 * MIN, auto=True),
    "awaiting": _awaiting,
    "awaiting-auto": lambda: _awaiting(auto=True),
    "awaiting-gate-failing": _awaiting_gate_failing,
    "paused": _paused,
    "paused-when-ready": _paused_when_ready,
    "paused-baking": _paused_baking,
    "baking": lambda: _baking_at(HOUR),  # 1h of its 2h bake left
    "baking-over": lambda: _baking_at(2 * HOUR),
    "baking-over-gate-failing": lambda: _baking_at(2 * HOUR, gate_phase=GatePhase.FAIL),
    "succeeded": _succeeded,
    "reverted": _reverted,
    "rolled_back": _rolled_back,
}

# The service's lifecycle state in each scenario: v1 ran in blue before the first start (and a
# start clears `previous`); a success swaps the slots; a revert swaps them back.
BEFORE_START = ServiceState(SERVICE)
RUNNING = ServiceState(SERVICE, stable_version="v1", stable_slot="blue")
AFTER_SUCCESS = ServiceState(
    SERVICE, stable_version="v2", stable_slot="green", previous_version="v1", previous_slot="blue"
)
SERVICE_STATES: dict[str, ServiceState] = {
    "none": BEFORE_START,
    "succeeded": AFTER_SUCCESS,
    "reverted": RUNNING,
}

EVENTS: dict[str, Event] = {
    "start": start_event(),
    "start-target-50": start_event(target=50),
    "start-target-100": start_event(target=100),
    "start-target-30": start_event(target=30),
    "promote": Promote(USER),
    "promote-force": Promote(ADMIN, force=True),
    "promote-target-50": Promote(ADMIN, target_percent=50),
    "promote-target-100": Promote(ADMIN, target_percent=100),
    "promote-target-10": Promote(ADMIN, target_percent=10),
    "promote-target-30": Promote(ADMIN, target_percent=30),
    "promote-force-target-75": Promote(ADMIN, force=True, target_percent=75),
    "promote-from-10": Promote(USER, from_percent=10),
    "promote-stale": Promote(USER, from_percent=75),
    "rollback": Rollback("pagerduty incident P1", PAGERDUTY),
    "pause": Pause(USER, "investigating"),
    "resume": Resume(USER),
    "gates-pass": PASS,
    "gates-fail": FAIL,
    "gates-breach": BREACH,
    "tick": Tick(),
    "revert": Revert("v2 leaks memory", USER),
    "pin-40": PinWeight(40, "hold at 40% while we look", ADMIN),
}


# Expectations ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Moves:
    """A legal event that changes the rollout."""

    state: State
    weight: int
    trigger: Trigger
    effects: tuple[str, ...]


@dataclass(frozen=True)
class Stays:
    """A legal event that changes nothing the caller must act on (no effects)."""


@dataclass(frozen=True)
class Notifies:
    """A legal event whose only effects are notifications (nothing stored changes state)."""

    effects: tuple[str, ...]


@dataclass(frozen=True)
class Refused:
    code: RefusalCode
    fragments: tuple[str, ...]


def refused(code: RefusalCode, *fragments: str) -> Refused:
    return Refused(code, fragments)


def describe(effect: Effect) -> str:
    match effect:
        case SetWeight(weight=weight):
            return f"weight:{weight}"
        case Audit(action=action):
            return f"audit:{action}"
        case Notify(kind=kind):
            return f"notify:{kind}"
        case Page(kind=kind):
            return f"page:{kind.value}"
        case SwapSlots():
            return "swap"
        case Reject(version=version):
            return f"reject:{version}"
    raise AssertionError(effect)  # pragma: no cover


STARTED = ("audit:rollout.started", "notify:started")
PROMOTED = ("audit:rollout.promoted", "notify:promoted")
SUCCEEDED = ("swap", "audit:rollout.succeeded", "notify:succeeded", "page:resolve_earlier")
ROLLED_BACK = ("weight:0", "audit:rollout.rolled_back", "notify:rolled_back")
READY = ("audit:rollout.ready", "notify:awaiting_promotion")
PAUSED = ("audit:rollout.paused", "notify:paused")
RESUMED = ("audit:rollout.resumed", "notify:resumed")
GATE_FAILING = Notifies(("notify:gate_failing",))
REVERTED = ("weight:0", "swap", "audit:rollout.reverted", "notify:reverted")


def promoted_to(weight: int, trigger: Trigger = Trigger.USER) -> Moves:
    state = State.BAKING if weight == 100 else State.PROGRESSING
    return Moves(state, weight, trigger, (f"weight:{weight}", *PROMOTED))


# An incident's rollback and a breach's reject the version; a person's rollback does not.
USER_ROLLBACK = Moves(State.ROLLED_BACK, 0, Trigger.PAGERDUTY, (*ROLLED_BACK, "reject:v2"))
BREACH_ROLLBACK = Moves(
    State.ROLLED_BACK, 0, Trigger.CONTROLLER, (*ROLLED_BACK, "page:trigger", "reject:v2")
)
PIN = ("weight:40", "audit:rollout.weight_pinned")
PINNED = Moves(State.PAUSED, 40, Trigger.USER, (*PIN, "notify:paused"))
PINNED_WHILE_PAUSED = Moves(State.PAUSED, 40, Trigger.USER, PIN)
CANNOT_REVERT_OPEN = refused(RefusalCode.OPEN_ROLLOUT, "open rollout", "roll it back")
NOTHING_TO_REVERT = refused(RefusalCode.NOTHING_TO_REVERT, "no previous version")
OPEN = refused(RefusalCode.OPEN_ROLLOUT, SERVICE, "v2", "open rollout")
NOT_PAUSED = refused(RefusalCode.NOT_PAUSED, "not paused")
IS_PAUSED = refused(RefusalCode.PAUSED, "paused", "resume")
STALE_AT = {
    10: refused(RefusalCode.STALE, "at 10%", "not 75%"),
    100: refused(RefusalCode.STALE, "at 100%", "not 75%"),
}

Row = tuple[str, str, Moves | Stays | Notifies | Refused]


def _terminal_rows(terminal: str, verb: str) -> list[Row]:
    user_events = ["promote", "promote-force", "promote-target-50", "promote-stale"]
    user_events += ["rollback", "pause", "resume", "pin-40"]
    if terminal == "succeeded":
        # v2 is stable now: starting it again is refused; a revert goes back to v1.
        starts: list[Row] = [
            (terminal, name, refused(RefusalCode.ALREADY_STABLE, "v2", "already the stable"))
            for name in ("start", "start-target-100")
        ]
        revert: Row = (terminal, "revert", Moves(State.REVERTED, 0, Trigger.USER, REVERTED))
    else:
        starts = [
            (terminal, "start",
             Moves(State.PROGRESSING, 10, Trigger.USER, ("weight:10", *STARTED))),
            (terminal, "start-target-100",
             Moves(State.BAKING, 100, Trigger.USER, ("weight:100", *STARTED))),
        ]  # fmt: skip
        revert = (terminal, "revert", NOTHING_TO_REVERT)
    return [
        *starts,
        revert,
        *((terminal, name, refused(RefusalCode.TERMINAL, SERVICE, verb)) for name in user_events),
        *(
            (terminal, name, Stays())
            for name in ("gates-pass", "gates-fail", "gates-breach", "tick")
        ),
    ]


ROWS: list[Row] = [
    # No rollout yet: only Start applies.
    ("none", "start", Moves(State.PROGRESSING, 10, Trigger.USER, ("weight:10", *STARTED))),
    (
        "none",
        "start-target-50",
        Moves(State.PROGRESSING, 50, Trigger.USER, ("weight:50", *STARTED)),
    ),
    ("none", "start-target-100", Moves(State.BAKING, 100, Trigger.USER, ("weight:100", *STARTED))),
    ("none", "start-target-30", refused(RefusalCode.INVALID_TARGET, "30%", "10%, 25%, 50%")),
    *(
        ("none", name, refused(RefusalCode.NO_ROLLOUT, "no rollout"))
        for name in EVENTS
        if not name.startswith("start")
    ),
    # progressing, 20 minutes of the wait left, gate passing.
    ("progressing", "start", OPEN),
    ("progressing", "promote", refused(RefusalCode.NOT_READY, "20m left", "10%")),
    ("progressing", "promote-force", promoted_to(25)),
    ("progressing", "promote-target-50", refused(RefusalCode.NOT_READY, "20m left")),
    ("progressing", "promote-target-10", refused(RefusalCode.INVALID_TARGET, "10%", "later")),
    ("progressing", "promote-target-30", refused(RefusalCode.INVALID_TARGET, "30%", "later")),
    ("progressing", "promote-force-target-75", promoted_to(75)),
    ("progressing", "promote-from-10", refused(RefusalCode.NOT_READY, "20m left")),
    ("progressing", "promote-stale", STALE_AT[10]),
    ("progressing", "rollback", USER_ROLLBACK),
    ("progressing", "pause", Moves(State.PAUSED, 10, Trigger.USER, PAUSED)),
    ("progressing", "resume", NOT_PAUSED),
    ("progressing", "gates-pass", Stays()),
    ("progressing", "gates-fail", GATE_FAILING),
    ("progressing", "revert", CANNOT_REVERT_OPEN),
    ("progressing", "pin-40", PINNED),
    ("progressing", "gates-breach", BREACH_ROLLBACK),
    ("progressing", "tick", Stays()),
    # progressing, wait over and gate passing, not yet ticked: ready.
    ("progressing-wait-over", "start", OPEN),
    ("progressing-wait-over", "promote", promoted_to(25)),
    ("progressing-wait-over", "promote-force", promoted_to(25)),
    ("progressing-wait-over", "promote-target-50", promoted_to(50)),
    ("progressing-wait-over", "promote-target-100", promoted_to(100)),
    ("progressing-wait-over", "promote-from-10", promoted_to(25)),
    ("progressing-wait-over", "promote-stale", STALE_AT[10]),
    ("progressing-wait-over", "rollback", USER_ROLLBACK),
    (
        "progressing-wait-over",
        "gates-pass",
        Moves(State.AWAITING_PROMOTION, 10, Trigger.CONTROLLER, READY),
    ),
    ("progressing-wait-over", "gates-fail", GATE_FAILING),
    ("progressing-wait-over", "gates-breach", BREACH_ROLLBACK),
    (
        "progressing-wait-over",
        "tick",
        Moves(State.AWAITING_PROMOTION, 10, Trigger.CONTROLLER, READY),
    ),
    ("progressing-wait-over-auto", "tick", promoted_to(25, Trigger.CONTROLLER)),
    ("progressing-wait-over-auto", "gates-pass", promoted_to(25, Trigger.CONTROLLER)),
    ("progressing-wait-over-auto", "gates-fail", GATE_FAILING),
    # awaiting_promotion: ready, waiting for a person.
    ("awaiting", "start", OPEN),
    ("awaiting", "promote", promoted_to(25)),
    ("awaiting", "promote-force", promoted_to(25)),
    ("awaiting", "promote-target-50", promoted_to(50)),
    ("awaiting", "promote-target-100", promoted_to(100)),
    ("awaiting", "promote-target-10", refused(RefusalCode.INVALID_TARGET, "10%")),
    ("awaiting", "promote-from-10", promoted_to(25)),
    ("awaiting", "promote-stale", STALE_AT[10]),
    ("awaiting", "rollback", USER_ROLLBACK),
    ("awaiting", "pause", Moves(State.PAUSED, 10, Trigger.USER, PAUSED)),
    ("awaiting", "revert", CANNOT_REVERT_OPEN),
    ("awaiting", "pin-40", PINNED),
    ("awaiting", "resume", NOT_PAUSED),
    ("awaiting", "gates-pass", Stays()),
    (
        "awaiting",
        "gates-fail",
        Moves(
            State.PROGRESSING,
            10,
            Trigger.CONTROLLER,
            ("audit:rollout.not_ready", "notify:gate_failing"),
        ),
    ),
    ("awaiting", "gates-breach", BREACH_ROLLBACK),
    ("awaiting", "tick", Stays()),
    ("awaiting-auto", "tick", promoted_to(25, Trigger.CONTROLLER)),
    ("awaiting-gate-failing", "promote", refused(RefusalCode.NOT_READY, "gates not passing", GATE)),
    ("awaiting-gate-failing", "promote-force", promoted_to(25)),
    (
        "awaiting-gate-failing",
        "tick",
        Moves(State.PROGRESSING, 10, Trigger.CONTROLLER, ("audit:rollout.not_ready",)),
    ),
    # paused 10 minutes into the wait (wall-clock wait is over, paused-excluded wait is not).
    ("paused", "start", OPEN),
    ("paused", "promote", IS_PAUSED),
    ("paused", "promote-force", IS_PAUSED),
    ("paused", "promote-target-50", IS_PAUSED),
    ("paused", "promote-from-10", IS_PAUSED),
    ("paused", "promote-stale", STALE_AT[10]),
    ("paused", "rollback", USER_ROLLBACK),
    ("paused", "pause", refused(RefusalCode.PAUSED, "already paused")),
    ("paused", "resume", Moves(State.PROGRESSING, 10, Trigger.USER, RESUMED)),
    ("paused", "revert", CANNOT_REVERT_OPEN),
    ("paused", "pin-40", PINNED_WHILE_PAUSED),
    ("paused", "gates-pass", Stays()),
    ("paused", "gates-fail", GATE_FAILING),
    ("paused", "gates-breach", BREACH_ROLLBACK),
    ("paused", "tick", Stays()),
    # paused after the step became ready: resuming settles straight back to awaiting, and the
    # person who resumed is the trigger.
    (
        "paused-when-ready",
        "resume",
        Moves(State.AWAITING_PROMOTION, 10, Trigger.USER, (*RESUMED, *READY)),
    ),
    ("paused-when-ready", "promote", IS_PAUSED),
    ("paused-when-ready", "tick", Stays()),
    ("paused-when-ready", "gates-pass", Stays()),
    ("paused-when-ready", "gates-breach", BREACH_ROLLBACK),
    # paused during the bake, 1h in: the bake does not finish while paused.
    ("paused-baking", "resume", Moves(State.BAKING, 100, Trigger.USER, RESUMED)),
    ("paused-baking", "tick", Stays()),
    ("paused-baking", "gates-pass", Stays()),
    ("paused-baking", "promote", IS_PAUSED),
    ("paused-baking", "gates-breach", BREACH_ROLLBACK),
    # baking, 1 hour of the 2h bake left.
    ("baking", "start", OPEN),
    ("baking", "promote", refused(RefusalCode.NOT_READY, "1h left in its bake", "100%")),
    ("baking", "promote-force", Moves(State.SUCCEEDED, 100, Trigger.USER, SUCCEEDED)),
    ("baking", "promote-target-50", refused(RefusalCode.INVALID_TARGET, "50%", "later")),
    ("baking", "promote-target-100", refused(RefusalCode.INVALID_TARGET, "100%", "later")),
    ("baking", "promote-stale", STALE_AT[100]),
    ("baking", "rollback", USER_ROLLBACK),
    ("baking", "pause", Moves(State.PAUSED, 100, Trigger.USER, PAUSED)),
    ("baking", "revert", CANNOT_REVERT_OPEN),
    ("baking", "pin-40", PINNED),
    ("baking", "resume", NOT_PAUSED),
    ("baking", "gates-pass", Stays()),
    ("baking", "gates-fail", GATE_FAILING),
    ("baking", "gates-breach", BREACH_ROLLBACK),
    ("baking", "tick", Stays()),
    # baking, bake over.
    ("baking-over", "promote", Moves(State.SUCCEEDED, 100, Trigger.USER, SUCCEEDED)),
    ("baking-over", "tick", Moves(State.SUCCEEDED, 100, Trigger.CONTROLLER, SUCCEEDED)),
    ("baking-over", "gates-pass", Moves(State.SUCCEEDED, 100, Trigger.CONTROLLER, SUCCEEDED)),
    ("baking-over", "gates-fail", GATE_FAILING),
    ("baking-over", "gates-breach", BREACH_ROLLBACK),
    ("baking-over", "rollback", USER_ROLLBACK),
    ("baking-over-gate-failing", "tick", Stays()),
    ("baking-over-gate-failing", "promote", refused(RefusalCode.NOT_READY, "gates not passing")),
    (
        "baking-over-gate-failing",
        "gates-pass",
        Moves(State.SUCCEEDED, 100, Trigger.CONTROLLER, SUCCEEDED),
    ),
    # Terminal rollouts: Start opens a new one; user events are refused; controller events absorbed.
    *_terminal_rows("succeeded", "succeeded"),
    *_terminal_rows("reverted", "been reverted"),
    *_terminal_rows("rolled_back", "been rolled back"),
]

CASES = [
    pytest.param(scenario, event, expect, id=f"{scenario}:{event}")
    for scenario, event, expect in ROWS
]


def test_the_table_covers_every_state_and_event() -> None:
    covered = {(scenario, event) for scenario, event, _ in ROWS}
    assert len(covered) == len(ROWS), "duplicate rows"
    core = ["start", "promote", "promote-force", "promote-target-50", "promote-stale", "rollback"]
    core += ["pause", "resume", "gates-pass", "gates-fail", "gates-breach", "tick", "revert"]
    for scenario in (
        "none",
        "progressing",
        "awaiting",
        "paused",
        "baking",
        "succeeded",
        "reverted",
        "rolled_back",
    ):
        missing = [event for event in core if (scenario, event) not in covered]
        assert not missing, f"{scenario} lacks {missing}"
    rollouts = [SCENARIOS[scenario]()[0] for scenario in SCENARIOS]
    states_reached = {rollout.state for rollout in rollouts if rollout is not None}
    assert states_reached == set(State)
    # Ready and not-ready variants of the time-based events exist for each timed state.
    for scenario, event in [
        ("progressing", "tick"),
        ("progressing-wait-over", "tick"),
        ("baking", "tick"),
        ("baking-over", "tick"),
        ("progressing-wait-over", "promote"),
        ("baking-over", "promote"),
    ]:
        assert (scenario, event) in covered


@pytest.mark.parametrize(("scenario", "event_name", "expect"), CASES)
def test_decide(scenario: str, event_name: str, expect: Moves | Stays | Notifies | Refused) -> None:
    before, now = SCENARIOS[scenario]()
    event = EVENTS[event_name]
    decision = decide(before, event, now, SERVICE_STATES.get(scenario, RUNNING))

    if isinstance(expect, Refused):
        assert isinstance(decision, Refusal), decision
        assert decision.code == expect.code
        for fragment in expect.fragments:
            assert fragment in decision.detail, (fragment, decision.detail)
        assert len(decision.detail) > 10
        return

    assert isinstance(decision, Transition), decision
    after = decision.rollout
    if isinstance(expect, Notifies):
        assert tuple(describe(effect) for effect in decision.effects) == expect.effects
        assert before is not None
        assert replace(after, gates=before.gates) == before  # only the gates may be updated
        assert decision.service is None
        return
    if isinstance(expect, Stays):
        assert decision.effects == ()
        assert not decision.changed
        assert before is not None
        if not before.is_open:
            assert after == before  # a finished rollout absorbs the controller's events
        else:
            assert replace(after, gates=before.gates) == before  # only the gates may be updated
        return

    assert after.state == expect.state
    assert after.desired_weight == expect.weight
    assert after.triggered_by == expect.trigger
    assert tuple(describe(effect) for effect in decision.effects) == expect.effects
    assert decision.changed
    _check_consistent(before, event, now, decision)


def _check_consistent(
    before: Rollout | None, event: Event, now: datetime, decision: Transition
) -> None:
    """What holds for every transition that moves a rollout."""
    after = decision.rollout
    assert any(isinstance(effect, Audit) for effect in decision.effects)
    weights = [effect.weight for effect in decision.effects if isinstance(effect, SetWeight)]
    if before is None or not before.is_open or before.desired_weight != after.desired_weight:
        assert weights == [after.desired_weight]
    else:
        assert weights == []
    if after.state == State.ROLLED_BACK:
        assert after.desired_weight == 0
        assert after.finished_at == now
        assert after.paused_at is None
    elif after.state == State.REVERTED:
        assert after.desired_weight == 0
        assert after.stable_version == "v1"
        assert after.stable_slot == "blue"
    elif isinstance(event, PinWeight):
        assert after.desired_weight == event.weight
    else:
        assert after.desired_weight == after.step.weight
    if after.state == State.SUCCEEDED:
        assert after.stable_version == after.canary_version == "v2"
        assert after.finished_at == now
    if after.state == State.PAUSED:
        assert after.paused_at is not None
    else:
        assert after.paused_at is None
    if after.state == State.BAKING:
        assert after.step.weight == 100
    if after.state in (State.PROGRESSING, State.AWAITING_PROMOTION):
        assert after.step.weight < 100
    if isinstance(event, Start) or (before is not None and after.step_index != before.step_index):
        assert after.step_started_at == now
        assert after.paused_for == timedelta(0)
        assert all(status.phase == GatePhase.PENDING for status in after.gates)
    elif before is not None:
        assert after.step_started_at == before.step_started_at


# Focused tests --------------------------------------------------------------------------------


def _audit(decision: Decision) -> Audit:
    assert isinstance(decision, Transition), decision
    audits = [effect for effect in decision.effects if isinstance(effect, Audit)]
    assert audits
    return audits[0]


def test_not_ready_detail_names_the_time_left() -> None:
    rollout = run(None, start_event(gates=()), T0)
    refusal = decide(rollout, Promote(USER), T0 + MIN)
    assert isinstance(refusal, Refusal)
    assert refusal.code == RefusalCode.NOT_READY
    assert "29m left" in refusal.detail
    assert refusal.time_left == 29 * MIN
    assert refusal.failing_gates == ()
    assert "gates" not in refusal.detail


def test_not_ready_detail_names_time_left_and_the_gates_not_passing() -> None:
    rollout = run(None, start_event(gates=(GATE, "latency", "db")), T0)
    rollout = run(
        rollout,
        GateResults(
            (
                gate(GatePhase.PASS),
                gate(GatePhase.NO_DATA, name="latency"),
                gate(GatePhase.FAIL, name="db"),
            )
        ),
        T0 + MIN,
    )
    refusal = decide(rollout, Promote(USER), T0 + 15 * MIN + timedelta(seconds=30))
    assert isinstance(refusal, Refusal)
    assert refusal.code == RefusalCode.NOT_READY
    assert "14m30s left" in refusal.detail
    assert refusal.time_left == 14 * MIN + timedelta(seconds=30)
    assert "latency" in refusal.detail
    assert "db" in refusal.detail
    assert GATE not in refusal.detail
    assert refusal.failing_gates == ("latency", "db")


def test_not_ready_when_only_the_gates_block() -> None:
    rollout = run(None, start_event(), T0)  # the gate is still pending
    refusal = decide(rollout, Promote(USER), T0 + HOUR)
    assert isinstance(refusal, Refusal)
    assert refusal.code == RefusalCode.NOT_READY
    assert refusal.time_left == timedelta(0)
    assert "left" not in refusal.detail
    assert f"gates not passing: {GATE}" in refusal.detail
    assert refusal.failing_gates == (GATE,)


@pytest.mark.parametrize(
    "phase", [GatePhase.PENDING, GatePhase.FAIL, GatePhase.NO_DATA], ids=lambda phase: phase.value
)
def test_only_a_passing_gate_lets_a_step_be_ready(phase: GatePhase) -> None:
    rollout = run(None, start_event(), T0)
    rollout = run(rollout, GateResults((gate(phase),)), T0 + MIN)
    assert not readiness(rollout, T0 + HOUR).ready
    assert run(rollout, Tick(), T0 + HOUR).state == State.PROGRESSING
    # The latest result replaces the earlier one.
    rollout = run(rollout, PASS, T0 + 2 * MIN)
    assert readiness(rollout, T0 + HOUR).ready
    assert [status.phase for status in rollout.gates] == [GatePhase.PASS]


def test_no_gates_means_passing() -> None:
    rollout = run(None, start_event(gates=()), T0)
    assert not readiness(rollout, T0 + 29 * MIN).ready
    assert readiness(rollout, T0 + 30 * MIN).ready
    assert run(rollout, Tick(), T0 + 30 * MIN).state == State.AWAITING_PROMOTION


def test_gate_results_for_an_unknown_gate_are_kept_and_count() -> None:
    rollout = run(None, start_event(gates=()), T0)
    rollout = run(rollout, GateResults((gate(GatePhase.FAIL, name="surprise"),)), T0 + MIN)
    assert readiness(rollout, T0 + HOUR).blocking_gates == ("surprise",)


def test_a_partial_report_keeps_the_other_gates_latest_status() -> None:
    rollout = run(None, start_event(gates=(GATE, "latency")), T0)
    rollout = run(rollout, GateResults((gate(GatePhase.FAIL, name="latency"),)), T0 + MIN)
    rollout = run(rollout, GateResults((gate(GatePhase.PASS),)), T0 + 2 * MIN)
    assert [(status.name, status.phase) for status in rollout.gates] == [
        (GATE, GatePhase.PASS),
        ("latency", GatePhase.FAIL),
    ]
    assert readiness(rollout, T0 + HOUR).blocking_gates == ("latency",)
    assert run(rollout, Tick(), T0 + HOUR).state == State.PROGRESSING


def test_the_time_left_is_shown_in_whole_units() -> None:
    rollout = run(None, start_event(gates=()), T0)
    refusal = decide(rollout, Promote(USER), T0 + timedelta(seconds=0.25))
    assert isinstance(refusal, Refusal)
    assert "ms" not in refusal.detail
    assert "30m left" in refusal.detail
    assert refusal.time_left == 30 * MIN - timedelta(seconds=0.25)


def test_pause_freezes_the_wait_clock() -> None:
    rollout = run(None, start_event(gates=()), T0)
    rollout = run(rollout, Pause(USER), T0 + 10 * MIN)
    assert rollout.paused_at == T0 + 10 * MIN
    # While paused the clock stands still, however long the pause lasts.
    for later in (T0 + 10 * MIN, T0 + HOUR, T0 + 5 * HOUR):
        assert waited(rollout, later) == 10 * MIN
        assert readiness(rollout, later).time_left == 20 * MIN
        assert readiness(rollout, later).ready_at is None
    rollout = run(rollout, Resume(USER), T0 + 5 * HOUR)
    assert rollout.state == State.PROGRESSING
    assert rollout.paused_at is None
    assert rollout.paused_for == 4 * HOUR + 50 * MIN
    # The remaining wait is unchanged by the pause: 20 minutes from the resume.
    assert readiness(rollout, T0 + 5 * HOUR).time_left == 20 * MIN
    assert readiness(rollout, T0 + 5 * HOUR).ready_at == T0 + 5 * HOUR + 20 * MIN
    refusal = decide(rollout, Promote(USER), T0 + 5 * HOUR + 19 * MIN)
    assert isinstance(refusal, Refusal)
    assert "1m left" in refusal.detail
    assert run(rollout, Tick(), T0 + 5 * HOUR + 19 * MIN).state == State.PROGRESSING
    assert run(rollout, Tick(), T0 + 5 * HOUR + 20 * MIN).state == State.AWAITING_PROMOTION


def test_repeated_pauses_add_up() -> None:
    rollout = run(None, start_event(gates=()), T0)
    rollout = run(rollout, Pause(USER), T0 + 5 * MIN)
    rollout = run(rollout, Resume(USER), T0 + 15 * MIN)  # 10m paused
    rollout = run(rollout, Pause(USER), T0 + 20 * MIN)
    rollout = run(rollout, Resume(USER), T0 + 50 * MIN)  # 30m paused
    assert rollout.paused_for == 40 * MIN
    assert waited(rollout, T0 + 50 * MIN) == 10 * MIN
    assert readiness(rollout, T0 + 50 * MIN).time_left == 20 * MIN


def test_pausing_a_bake_delays_success() -> None:
    rollout = run(None, start_event(target=100, gates=()), T0)
    rollout = run(rollout, Pause(USER), T0 + HOUR)
    rollout = run(rollout, Resume(USER), T0 + 3 * HOUR)
    assert rollout.state == State.BAKING
    assert run(rollout, Tick(), T0 + 3 * HOUR + 59 * MIN).state == State.BAKING
    done = run(rollout, Tick(), T0 + 4 * HOUR)
    assert done.state == State.SUCCEEDED


def test_resume_after_the_bake_is_over_succeeds() -> None:
    rollout = run(None, start_event(target=100, gates=()), T0)
    rollout = run(rollout, Pause(USER), T0 + 2 * HOUR)
    decision = decide(rollout, Resume(USER), T0 + 3 * HOUR)
    assert isinstance(decision, Transition)
    assert decision.rollout.state == State.SUCCEEDED
    assert decision.rollout.stable_version == "v2"
    assert [describe(effect) for effect in decision.effects] == [*RESUMED, *SUCCEEDED]


def test_a_double_promote_with_the_same_from_percent_advances_once() -> None:
    rollout = run(None, start_event(gates=()), T0)
    now = T0 + 30 * MIN
    click = Promote(USER, from_percent=10)
    first = decide(rollout, click, now)
    assert isinstance(first, Transition)
    assert first.rollout.desired_weight == 25
    second = decide(first.rollout, click, now)
    assert isinstance(second, Refusal)
    assert second.code == RefusalCode.STALE
    assert "25%" in second.detail
    assert "10%" in second.detail


def test_force_is_audited_as_forced() -> None:
    rollout = run(None, start_event(), T0)
    decision = decide(rollout, Promote(ADMIN, force=True), T0 + MIN)
    audit = _audit(decision)
    assert audit.action == "rollout.promoted"
    assert audit.details["forced"] is True
    assert audit.details["from_weight"] == 10
    assert audit.details["to_weight"] == 25
    ready = run(rollout, PASS, T0 + MIN)
    normal = _audit(decide(ready, Promote(USER), T0 + 30 * MIN))
    assert normal.details["forced"] is False


def test_a_forced_bake_is_audited_as_forced() -> None:
    rollout = run(None, start_event(target=100), T0)
    decision = decide(rollout, Promote(ADMIN, force=True), T0 + MIN)
    audit = _audit(decision)
    assert audit.action == "rollout.succeeded"
    assert audit.details["forced"] is True


def test_a_target_jump_is_audited_as_a_jump() -> None:
    rollout = run(None, start_event(gates=()), T0)
    audit = _audit(decide(rollout, Promote(ADMIN, target_percent=75), T0 + 30 * MIN))
    assert audit.details["jumped"] is True
    assert audit.details["to_weight"] == 75
    plain = _audit(decide(rollout, Promote(USER), T0 + 30 * MIN))
    assert "jumped" not in plain.details


def test_start_at_a_target_is_audited() -> None:
    audit = _audit(decide(None, start_event(target=50), T0))
    assert audit.action == "rollout.started"
    assert audit.details["target_percent"] == 50
    assert audit.details["to_weight"] == 50


def test_start_opens_a_fresh_rollout() -> None:
    rollout = run(None, start_event(gates=(GATE, "latency"), auto=True), T0)
    assert rollout.service == SERVICE
    assert rollout.canary_version == "v2"
    assert rollout.stable_version == "v1"
    assert rollout.steps == STEPS
    assert rollout.step_index == 0
    assert rollout.step_started_at == T0
    assert rollout.paused_at is None
    assert rollout.paused_for == timedelta(0)
    assert rollout.auto_promote is True
    assert rollout.reason == "ship v2"
    assert rollout.finished_at is None
    assert [(status.name, status.phase) for status in rollout.gates] == [
        (GATE, GatePhase.PENDING),
        ("latency", GatePhase.PENDING),
    ]


@pytest.mark.parametrize("terminal", ["succeeded", "rolled_back"])
def test_start_after_a_finished_rollout_begins_again(terminal: str) -> None:
    finished, now = SCENARIOS[terminal]()
    event = replace(start_event(), canary_version="v3", stable_version="v2")
    rollout = run(finished, event, now)
    assert rollout.canary_version == "v3"
    assert rollout.state == State.PROGRESSING
    assert rollout.step_index == 0
    assert rollout.step_started_at == now
    assert rollout.reason == "ship v2"
    assert rollout.finished_at is None


def test_advancing_starts_a_fresh_step() -> None:
    rollout = run(None, start_event(), T0)
    rollout = run(rollout, PASS, T0 + MIN)
    rollout = run(rollout, Pause(USER), T0 + 2 * MIN)
    rollout = run(rollout, Resume(USER), T0 + 12 * MIN)
    assert rollout.paused_for == 10 * MIN
    promoted = run(rollout, Promote(USER), T0 + 40 * MIN)
    assert promoted.step_index == 1
    assert promoted.step_started_at == T0 + 40 * MIN
    assert promoted.paused_for == timedelta(0)
    # A new step needs fresh gate verdicts.
    assert [status.phase for status in promoted.gates] == [GatePhase.PENDING]
    assert readiness(promoted, T0 + 55 * MIN).blocking_gates == (GATE,)


def test_auto_promote_advances_one_step_per_tick() -> None:
    rollout = run(None, start_event(gates=(), auto=True), T0)
    weights = []
    now = T0 + 10 * HOUR  # every wait is long over
    for _ in range(5):
        decision = decide(rollout, Tick(), now)
        assert isinstance(decision, Transition)
        rollout = decision.rollout
        weights.append(rollout.desired_weight)
        now += 3 * HOUR
    assert weights == [25, 50, 75, 100, 100]
    assert rollout.state == State.SUCCEEDED
    assert rollout.triggered_by == Trigger.CONTROLLER


def test_auto_promote_waits_for_each_step() -> None:
    rollout = run(None, start_event(gates=(), auto=True), T0)
    assert run(rollout, Tick(), T0 + 29 * MIN) == rollout
    rollout = run(rollout, Tick(), T0 + 30 * MIN)
    assert rollout.desired_weight == 25
    assert run(rollout, Tick(), T0 + 44 * MIN).desired_weight == 25
    assert run(rollout, Tick(), T0 + 45 * MIN).desired_weight == 50


OPEN_SCENARIOS = [
    "progressing",
    "progressing-wait-over",
    "awaiting",
    "paused",
    "paused-when-ready",
    "paused-baking",
    "baking",
    "baking-over",
]


@pytest.mark.parametrize("scenario", OPEN_SCENARIOS)
@pytest.mark.parametrize("actor", [USER, PAGERDUTY, CONTROLLER], ids=lambda actor: actor.name)
def test_rollback_from_every_open_state(scenario: str, actor: Actor) -> None:
    before, now = SCENARIOS[scenario]()
    assert before is not None
    decision = decide(before, Rollback("p95 too high", actor), now)
    assert isinstance(decision, Transition)
    after = decision.rollout
    assert after.state == State.ROLLED_BACK
    assert after.desired_weight == 0
    assert after.reason == "p95 too high"
    assert after.triggered_by == actor.triggered_by
    assert after.stable_version == "v1"
    assert after.finished_at == now
    assert decision.effects[0] == SetWeight(0)
    audit = _audit(decision)
    assert audit.details["reason"] == "p95 too high"
    assert audit.details["from_state"] == before.state.value
    assert audit.details["from_weight"] == before.desired_weight
    # Rolling back again (PagerDuty re-sends) changes nothing.
    again = decide(after, Rollback("p95 too high", actor), now)
    assert isinstance(again, Refusal)
    assert again.code == RefusalCode.TERMINAL


@pytest.mark.parametrize("scenario", OPEN_SCENARIOS)
def test_a_breach_rolls_back_naming_the_gate_value_and_threshold(scenario: str) -> None:
    before, now = SCENARIOS[scenario]()
    breach = GateStatus(
        "latency-p95", GatePhase.FAIL, 12.5, 10.0, failing_since=now - 5 * MIN, breached=True
    )
    decision = decide(before, GateResults((gate(GatePhase.PASS), breach)), now)
    assert isinstance(decision, Transition)
    after = decision.rollout
    assert after.state == State.ROLLED_BACK
    assert after.desired_weight == 0
    assert after.triggered_by == Trigger.CONTROLLER
    assert after.reason is not None
    assert "latency-p95" in after.reason
    assert "12.5" in after.reason
    assert "10.0" in after.reason
    assert SetWeight(0) in decision.effects
    assert _audit(decision).details["reason"] == after.reason


def test_a_breach_is_not_hidden_by_a_later_result_for_the_same_gate() -> None:
    rollout, now = _progressing_at(10 * MIN)
    batch = GateResults((gate(GatePhase.FAIL, 3.5, breached=True), gate(GatePhase.PASS)))
    after = run(rollout, batch, now)
    assert after.state == State.ROLLED_BACK
    assert after.triggered_by == Trigger.CONTROLLER
    assert after.reason is not None
    assert GATE in after.reason


def test_a_failing_gate_without_a_breach_only_blocks() -> None:
    rollout, now = _progressing_at(HOUR)
    after = run(rollout, FAIL, now)
    assert after.state == State.PROGRESSING
    assert after.desired_weight == 10
    assert readiness(after, now).blocking_gates == (GATE,)


@pytest.mark.parametrize("terminal", ["succeeded", "rolled_back"])
@pytest.mark.parametrize("event_name", ["gates-pass", "gates-fail", "gates-breach", "tick"])
def test_a_finished_rollout_absorbs_controller_events(terminal: str, event_name: str) -> None:
    before, now = SCENARIOS[terminal]()
    decision = decide(before, EVENTS[event_name], now + 10 * HOUR)
    assert decision == Transition(before)  # type: ignore[arg-type]


def test_success_makes_the_canary_stable() -> None:
    rollout, now = _baking_at(2 * HOUR)
    done = run(rollout, Tick(), now)
    assert done.state == State.SUCCEEDED
    assert done.stable_version == "v2"
    assert done.desired_weight == 100
    assert done.finished_at == now
    assert not readiness(done, now).ready


# next_due ---------------------------------------------------------------------------------


def test_next_due_is_the_interval_while_the_wait_is_long() -> None:
    rollout = run(None, start_event(), T0)
    assert next_due(rollout, T0 + MIN, timedelta(seconds=60)) == T0 + 2 * MIN


def test_next_due_is_when_the_wait_ends_if_that_comes_first() -> None:
    rollout = run(None, start_event(), T0)
    now = T0 + 29 * MIN + timedelta(seconds=30)
    assert next_due(rollout, now, timedelta(seconds=60)) == T0 + 30 * MIN
    assert next_due(rollout, now, timedelta(seconds=10)) == now + timedelta(seconds=10)


def test_next_due_counts_paused_time() -> None:
    rollout = run(None, start_event(), T0)
    rollout = run(rollout, Pause(USER), T0 + 10 * MIN)
    rollout = run(rollout, Resume(USER), T0 + 30 * MIN)
    # Paused for 20 minutes: the wait ends at T0+50m, not at the wall-clock T0+30m.
    assert next_due(rollout, T0 + 49 * MIN + timedelta(seconds=50), MIN) == T0 + 50 * MIN


def test_next_due_while_paused_keeps_evaluating_the_gates() -> None:
    rollout, now = _paused()
    assert next_due(rollout, now, timedelta(seconds=5)) == now + timedelta(seconds=5)


def test_next_due_once_the_wait_is_over_is_the_interval() -> None:
    rollout, now = _awaiting()
    assert next_due(rollout, now, timedelta(seconds=60)) == now + timedelta(seconds=60)
    rollout, now = _baking_at(HOUR + 59 * MIN + timedelta(seconds=45))
    assert next_due(rollout, now, MIN) == T0 + 2 * HOUR


@pytest.mark.parametrize("terminal", ["succeeded", "rolled_back"])
def test_next_due_is_none_once_finished(terminal: str) -> None:
    rollout, now = SCENARIOS[terminal]()
    assert rollout is not None
    assert next_due(rollout, now, MIN) is None
