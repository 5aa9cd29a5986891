"""Property tests of the rollout state machine over random event sequences and clock advances.

Each example draws a step policy and a sequence of (clock advance, event) pairs and feeds them to
`decide`, keeping an independent model of the time spent waiting (un-paused) in the current step.
After every event the invariants of DESIGN.md §2 are checked.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opsapi.canary.machine import (
    CONTROLLER,
    Actor,
    Audit,
    Event,
    GatePhase,
    GateResults,
    GateStatus,
    Pause,
    Promote,
    Refusal,
    RefusalCode,
    Resume,
    Rollback,
    Rollout,
    SetWeight,
    Start,
    State,
    Step,
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

DEFAULT_STEPS = (
    Step(10, timedelta(minutes=30)),
    Step(25, timedelta(minutes=15)),
    Step(50, timedelta(minutes=15)),
    Step(75, timedelta(minutes=10)),
    Step(100, timedelta(hours=2)),
)
SHORT_STEPS = (Step(5, MIN), Step(20, 2 * MIN), Step(100, 5 * MIN))
INSTANT_STEPS = (Step(50, timedelta(0)), Step(100, timedelta(seconds=30)))
ONLY_STEP = (Step(100, 10 * MIN),)

USER = Actor(Trigger.USER, "alice")
ADMIN = Actor(Trigger.USER, "root-admin")
PAGERDUTY = Actor(Trigger.PAGERDUTY, "pagerduty")
SYSTEM = Actor(Trigger.SYSTEM, "system")
GATE_NAMES = ("errors", "latency")

USER_EVENTS = (Start, Promote, Rollback, Pause, Resume)
CONTROLLER_EVENTS = (GateResults, Tick)

advances = st.one_of(
    st.sampled_from([timedelta(0), timedelta(seconds=1), 30 * timedelta(seconds=1), MIN]),
    st.sampled_from([5 * MIN, 10 * MIN, 15 * MIN, 30 * MIN, 60 * MIN, 120 * MIN]),
    st.integers(0, 3 * 3600).map(lambda seconds: timedelta(seconds=seconds)),
)


def percents(steps: tuple[Step, ...]) -> st.SearchStrategy[int | None]:
    weights = [step.weight for step in steps]
    return st.one_of(st.none(), st.sampled_from(weights), st.sampled_from([0, 30, 101]))


gate_statuses = st.builds(
    GateStatus,
    name=st.sampled_from([*GATE_NAMES, "extra"]),
    phase=st.sampled_from(GatePhase),
    value=st.one_of(st.none(), st.floats(0, 100, allow_nan=False)),
    threshold=st.just(1.0),
    breached=st.integers(0, 7).map(lambda n: n == 0),
)


@st.composite
def starts(draw: st.DrawFn, steps: tuple[Step, ...], *, valid: bool = False) -> Start:
    targets = st.sampled_from([step.weight for step in steps]) if valid else percents(steps)
    return Start(
        service="checkout",
        canary_version=draw(st.sampled_from(["v2", "v3"])),
        stable_version="v1",
        steps=steps,
        actor=draw(st.sampled_from([USER, ADMIN, SYSTEM])),
        auto_promote=draw(st.booleans()),
        gate_names=draw(st.sampled_from([(), ("errors",), GATE_NAMES])),
        target_percent=draw(st.one_of(st.none(), st.none(), targets)),
    )


@st.composite
def events(draw: st.DrawFn, steps: tuple[Step, ...]) -> Event:
    kind = draw(
        st.sampled_from(
            ["start", "promote", "promote", "promote", "rollback", "pause", "resume"]
            + ["gates", "gates", "gates", "tick", "tick", "tick"]
        )
    )
    if kind == "start":
        return draw(starts(steps))
    if kind == "promote":
        return Promote(
            actor=draw(st.sampled_from([USER, ADMIN])),
            force=draw(st.booleans()),
            target_percent=draw(st.one_of(st.none(), st.none(), percents(steps))),
            from_percent=draw(st.one_of(st.none(), percents(steps))),
        )
    if kind == "rollback":
        return Rollback("random rollback", draw(st.sampled_from([USER, PAGERDUTY, CONTROLLER])))
    if kind == "pause":
        return Pause(USER)
    if kind == "resume":
        return Resume(USER)
    if kind == "gates":
        return GateResults(tuple(draw(st.lists(gate_statuses, max_size=3))))
    return Tick()


@dataclass(frozen=True)
class Scenario:
    steps: tuple[Step, ...]
    moves: tuple[tuple[timedelta, Event], ...]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    steps = draw(st.sampled_from([DEFAULT_STEPS, SHORT_STEPS, INSTANT_STEPS, ONLY_STEP]))
    first = draw(starts(steps, valid=True))
    moves = draw(st.lists(st.tuples(advances, events(steps)), max_size=40))
    return Scenario(steps, ((timedelta(0), first), *moves))


def _audits(decision: Transition) -> list[str]:
    return [effect.action for effect in decision.effects if isinstance(effect, Audit)]


def _ignoring_gates(rollout: Rollout) -> Rollout:
    return replace(rollout, gates=())


def check_refusal(before: Rollout | None, event: Event, refusal: Refusal) -> None:
    assert refusal.detail
    if isinstance(event, Start):
        assert refusal.code in (RefusalCode.OPEN_ROLLOUT, RefusalCode.INVALID_TARGET)
        if refusal.code == RefusalCode.OPEN_ROLLOUT:
            assert before is not None
            assert before.is_open
    elif before is None:
        assert refusal.code == RefusalCode.NO_ROLLOUT
    elif not before.is_open:
        assert refusal.code == RefusalCode.TERMINAL
        assert isinstance(event, USER_EVENTS)
    else:
        # The controller's events never bounce off an open rollout.
        assert isinstance(event, USER_EVENTS)
    if refusal.code == RefusalCode.NOT_READY:
        assert refusal.time_left is not None
        assert refusal.time_left > timedelta(0) or refusal.failing_gates
        assert isinstance(event, Promote)
        assert not event.force


def check_transition(
    before: Rollout | None, event: Event, now: datetime, decision: Transition
) -> None:
    after = decision.rollout
    weights = {step.weight for step in after.steps}
    effects = decision.effects

    # Weight is always 0 or a step weight; 0 exactly when rolled back.
    assert after.desired_weight in weights | {0}
    assert (after.desired_weight == 0) == (after.state == State.ROLLED_BACK)
    if after.state != State.ROLLED_BACK:
        assert after.desired_weight == after.step.weight

    # Shape of each state.
    assert (after.paused_at is not None) == (after.state == State.PAUSED)
    if after.state == State.BAKING:
        assert after.step.weight == 100
    if after.state in (State.PROGRESSING, State.AWAITING_PROMOTION):
        assert after.step.weight < 100
    if after.state == State.SUCCEEDED:
        assert after.stable_version == after.canary_version
    if after.is_open:
        assert after.finished_at is None
        assert after.step_started_at <= now
    if after.auto_promote:
        assert after.state != State.AWAITING_PROMOTION

    if isinstance(event, Start):
        # Start only opens a rollout when none is open.
        assert before is None or not before.is_open
        assert after.step_started_at == now
        assert after.triggered_by == event.actor.triggered_by
        assert effects[0] == SetWeight(after.desired_weight)
        assert "rollout.started" in _audits(decision)
        return

    assert before is not None
    if not before.is_open:
        # A finished rollout absorbs every (non-Start) event.
        assert after == before
        assert effects == ()
        return

    # Within one rollout the step clock never moves backwards.
    assert after.step_started_at >= before.step_started_at
    assert after.step_index >= before.step_index

    promoted = after.step_index != before.step_index
    if promoted:
        # Weight (and step) rises only by a promotion: a person's Promote or the controller's
        # auto-promotion, into a new step.
        assert after.desired_weight > before.desired_weight
        assert after.step_started_at == now
        assert after.paused_for == timedelta(0)
        assert "rollout.promoted" in _audits(decision)
        if isinstance(event, Promote):
            assert after.triggered_by == event.actor.triggered_by
            if event.target_percent is not None:
                assert after.desired_weight == event.target_percent
            else:
                assert after.step_index == before.step_index + 1
            if not event.force:
                assert readiness(before, now).ready
        else:
            assert isinstance(event, Tick | GateResults | Resume)
            assert before.auto_promote
            assert after.triggered_by == Trigger.CONTROLLER
            assert after.step_index == before.step_index + 1
    elif after.state != State.ROLLED_BACK:
        assert after.desired_weight == before.desired_weight
        assert after.step_started_at == before.step_started_at

    # SetWeight is emitted exactly when the weight changes, with the new weight.
    set_weights = [effect.weight for effect in effects if isinstance(effect, SetWeight)]
    if after.desired_weight != before.desired_weight:
        assert set_weights == [after.desired_weight]
    else:
        assert set_weights == []

    # Every change (beyond the gates' latest results) is audited and says who caused it.
    if _ignoring_gates(after) != _ignoring_gates(before):
        assert _audits(decision)
        if isinstance(event, CONTROLLER_EVENTS):
            assert after.triggered_by == Trigger.CONTROLLER
        elif isinstance(event, Rollback | Pause | Promote):
            assert after.triggered_by == event.actor.triggered_by
        else:
            assert isinstance(event, Resume)
            assert after.triggered_by in (event.actor.triggered_by, Trigger.CONTROLLER)
    else:
        assert effects == ()

    # Safety never pauses: a breach rolls back from every open state.
    if isinstance(event, GateResults) and any(result.breached for result in event.results):
        assert after.state == State.ROLLED_BACK
        assert after.triggered_by == Trigger.CONTROLLER
    if after.state == State.ROLLED_BACK:
        assert effects[0] == SetWeight(0)
        assert after.reason
    if after.state == State.SUCCEEDED:
        assert before.state in (State.BAKING, State.PAUSED)

    # The controller's events leave an open rollout settled (unless they just advanced it).
    if isinstance(event, CONTROLLER_EVENTS) and not promoted and after.is_open:
        ready = readiness(after, now).ready
        if after.state in (State.PROGRESSING, State.BAKING):
            assert not ready
        if after.state == State.AWAITING_PROMOTION:
            assert ready


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(scenarios())
def test_random_event_sequences_keep_the_invariants(scenario: Scenario) -> None:
    rollout: Rollout | None = None
    now = T0
    model_waited = timedelta(0)  # independently tracked un-paused time in the current step
    opened = 0

    for advance, event in scenario.moves:
        if rollout is not None and rollout.is_open:
            if rollout.state != State.PAUSED:
                model_waited += advance
            later = now + advance
            # Time spent paused is never counted as waiting.
            assert waited(rollout, later) == model_waited
            time_left = max(timedelta(0), rollout.step.wait - model_waited)
            assert readiness(rollout, later).time_left == time_left
            due = next_due(rollout, later, MIN)
            assert due is not None
            assert later < due <= later + MIN
        now += advance

        decision = decide(rollout, event, now)
        if isinstance(decision, Refusal):
            check_refusal(rollout, event, decision)
            continue
        check_transition(rollout, event, now, decision)
        after = decision.rollout
        if isinstance(event, Start):
            opened += 1
            model_waited = timedelta(0)
        elif rollout is not None and after.step_index != rollout.step_index:
            model_waited = timedelta(0)
        rollout = after
        if rollout.is_open:
            assert waited(rollout, now) == model_waited
        else:
            assert next_due(rollout, now, MIN) is None

    assert opened >= 1


@settings(max_examples=300, deadline=None)
@given(scenarios(), st.integers(0, 40))
def test_at_most_one_start_opens_a_rollout_while_it_is_open(scenario: Scenario, cut: int) -> None:
    rollout: Rollout | None = None
    now = T0
    for advance, event in scenario.moves[: cut + 1]:
        now += advance
        decision = decide(rollout, event, now)
        if isinstance(decision, Transition):
            rollout = decision.rollout
    assert rollout is not None
    start = Start("checkout", "v9", "v1", scenario.steps, USER)
    decision = decide(rollout, start, now)
    if rollout.is_open:
        assert isinstance(decision, Refusal)
        assert decision.code == RefusalCode.OPEN_ROLLOUT
    else:
        assert isinstance(decision, Transition)
        assert decision.rollout.canary_version == "v9"
        assert decision.rollout.is_open
        again = decide(decision.rollout, start, now)
        assert isinstance(again, Refusal)
        assert again.code == RefusalCode.OPEN_ROLLOUT
