"""Property tests of the rollout state machine over random event sequences and clock advances.

Each example draws a step policy and a sequence of (clock advance, event) pairs — Start with and
without auto_promote or a target, Promote with force / target_percent / from_percent, Rollback,
Pause, Resume, gate results with and without a breach, Tick — and feeds them to `decide`.
Alongside, a small `Model` tracks independently what the machine must agree with: the un-paused
time spent in the current step, and every gate's latest phase. After every event the invariants
of DESIGN.md §2 are checked.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
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
    Notify,
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
SECOND = timedelta(seconds=1)
MIN = timedelta(minutes=1)
INTERVAL = MIN

DEFAULT_STEPS = (
    Step(10, timedelta(minutes=30)),
    Step(25, timedelta(minutes=15)),
    Step(50, timedelta(minutes=15)),
    Step(75, timedelta(minutes=10)),
    Step(100, timedelta(hours=2)),
)
SHORT_STEPS = (Step(5, MIN), Step(20, 2 * MIN), Step(100, 5 * MIN))
INSTANT_STEPS = (Step(50, timedelta(0)), Step(100, 30 * SECOND))
ONLY_STEP = (Step(100, 10 * MIN),)

USER = Actor(Trigger.USER, "alice")
ADMIN = Actor(Trigger.USER, "root-admin")
PAGERDUTY = Actor(Trigger.PAGERDUTY, "pagerduty")
SYSTEM = Actor(Trigger.SYSTEM, "system")
GATE_NAMES = ("errors", "latency")

USER_EVENTS = (Start, Promote, Rollback, Pause, Resume)
CONTROLLER_EVENTS = (GateResults, Tick)

# Strategies -----------------------------------------------------------------------------------

advances = st.one_of(
    st.sampled_from([timedelta(0), SECOND, 30 * SECOND, MIN, 5 * MIN, 10 * MIN, 15 * MIN]),
    st.sampled_from([30 * MIN, 60 * MIN, 120 * MIN]),
    st.integers(0, 3 * 3600).map(lambda seconds: seconds * SECOND),
)


def sometimes(strategy: st.SearchStrategy[int]) -> st.SearchStrategy[int | None]:
    return st.one_of(st.none(), st.none(), strategy)


gate_statuses = st.builds(
    GateStatus,
    name=st.sampled_from([*GATE_NAMES, GATE_NAMES[0], "extra"]),
    phase=st.sampled_from(
        [GatePhase.PASS] * 4 + [GatePhase.FAIL, GatePhase.NO_DATA, GatePhase.PENDING]
    ),
    value=st.sampled_from([None, 0.0, 0.5, 2.5, 12.5]),
    threshold=st.just(1.0),
    breached=st.integers(0, 24).map(lambda n: n == 0),
)
ALL_PASS = GateResults(tuple(GateStatus(name, GatePhase.PASS, 0.1, 1.0) for name in GATE_NAMES))


@functools.cache
def starts(steps: tuple[Step, ...], *, valid: bool = False) -> st.SearchStrategy[Start]:
    """Start events; with `valid`, only targets that are steps of the policy."""
    weights = [step.weight for step in steps]
    targets = st.sampled_from(weights) if valid else percents(steps)
    return st.builds(
        Start,
        service=st.just("checkout"),
        canary_version=st.sampled_from(["v2", "v3"]),
        stable_version=st.just("v1"),
        steps=st.just(steps),
        actor=st.sampled_from([USER, ADMIN, SYSTEM]),
        auto_promote=st.booleans(),
        gate_names=st.sampled_from([(), ("errors",), GATE_NAMES]),
        target_percent=sometimes(targets),
    )


@functools.cache
def percents(steps: tuple[Step, ...]) -> st.SearchStrategy[int]:
    """Step weights mostly, sometimes a percentage that is not a step."""
    weights = [step.weight for step in steps]
    return st.one_of(st.sampled_from(weights), st.sampled_from([0, 30, 101]))


@functools.cache
def events(steps: tuple[Step, ...]) -> st.SearchStrategy[Event]:
    promotes = st.builds(
        Promote,
        actor=st.sampled_from([USER, ADMIN]),
        force=st.integers(0, 3).map(lambda n: n == 0),
        target_percent=sometimes(percents(steps)),
        from_percent=sometimes(percents(steps)),
    )
    rollbacks = st.builds(
        Rollback, st.just("random rollback"), st.sampled_from([USER, PAGERDUTY, CONTROLLER])
    )
    gate_results = st.lists(gate_statuses, max_size=3).map(
        lambda results: GateResults(tuple(results))
    )
    weighted: list[tuple[int, st.SearchStrategy[Event]]] = [
        (1, starts(steps)),
        (1, rollbacks),
        (1, st.just(Pause(USER))),
        (2, st.just(Resume(USER))),
        (4, promotes),
        (3, gate_results),
        (3, st.just(ALL_PASS)),
        (5, st.just(Tick())),
    ]
    # sampled_from a weighted list of strategies, then draw from the chosen one.
    choices = [strategy for weight, strategy in weighted for _ in range(weight)]
    return st.sampled_from(choices).flatmap(lambda strategy: strategy)


@dataclass(frozen=True)
class Scenario:
    steps: tuple[Step, ...]
    moves: tuple[tuple[timedelta, Event], ...]


@st.composite
def scenarios(draw: st.DrawFn, *, min_size: int = 15, max_size: int = 50) -> Scenario:
    steps = draw(st.sampled_from([DEFAULT_STEPS, SHORT_STEPS, INSTANT_STEPS, ONLY_STEP]))
    first = draw(starts(steps, valid=True))
    moves = draw(st.lists(st.tuples(advances, events(steps)), min_size=min_size, max_size=max_size))
    return Scenario(steps, ((timedelta(0), first), *moves))


# The independent model --------------------------------------------------------------------


def _as_resumed(rollout: Rollout, event: object) -> Rollout:
    # A resume judges readiness on the rollout it unpauses.
    return replace(rollout, paused_at=None) if isinstance(event, Resume) else rollout


@dataclass
class Model:
    """Un-paused time in the current step and each gate's latest phase, tracked from the events."""

    waited: timedelta = timedelta(0)
    gates: dict[str, GatePhase] = field(default_factory=dict)

    def ready(self, rollout: Rollout) -> bool:
        # A paused rollout is never ready: promotion waits for the resume.
        wait_over = self.waited >= rollout.step.wait
        passing = all(phase == GatePhase.PASS for phase in self.gates.values())
        return wait_over and passing and rollout.paused_at is None

    def time_left(self, rollout: Rollout) -> timedelta:
        return max(timedelta(0), rollout.step.wait - self.waited)

    def new_step(self) -> None:
        self.waited = timedelta(0)
        self.gates = dict.fromkeys(self.gates, GatePhase.PENDING)

    def agrees_with(self, rollout: Rollout, now: datetime) -> None:
        # Time spent paused is never counted as waiting.
        assert waited(rollout, now) == self.waited
        state = readiness(rollout, now)
        assert state.time_left == self.time_left(rollout)
        assert {gate.name: gate.phase for gate in rollout.gates} == self.gates
        assert state.ready == self.ready(rollout)
        assert set(state.blocking_gates) == {
            name for name, phase in self.gates.items() if phase != GatePhase.PASS
        }


# Invariants -------------------------------------------------------------------------------


def _audits(decision: Transition) -> list[Audit]:
    return [effect for effect in decision.effects if isinstance(effect, Audit)]


def _ignoring_gates(rollout: Rollout) -> Rollout:
    return replace(rollout, gates=())


def _is_later_step(rollout: Rollout, percent: int) -> bool:
    weights = [step.weight for step in rollout.steps]
    return percent in weights and weights.index(percent) > rollout.step_index


def check_refusal(
    before: Rollout | None, event: Event, model: Model, now: datetime, refusal: Refusal
) -> None:
    assert refusal.detail
    if isinstance(event, Start):
        if before is not None and before.is_open:
            assert refusal.code == RefusalCode.OPEN_ROLLOUT
        else:
            assert refusal.code == RefusalCode.INVALID_TARGET
            assert event.target_percent not in {step.weight for step in event.steps}
        return
    if before is None:
        assert refusal.code == RefusalCode.NO_ROLLOUT
        return
    if not before.is_open:
        assert refusal.code == RefusalCode.TERMINAL
        assert isinstance(event, USER_EVENTS)
        return
    # The controller's events and rollbacks never bounce off an open rollout.
    assert isinstance(event, Promote | Pause | Resume)
    if isinstance(event, Pause):
        assert refusal.code == RefusalCode.PAUSED
        assert before.state == State.PAUSED
    elif isinstance(event, Resume):
        assert refusal.code == RefusalCode.NOT_PAUSED
        assert before.state != State.PAUSED
    else:
        stale = event.from_percent is not None and event.from_percent != before.desired_weight
        assert (refusal.code == RefusalCode.STALE) == stale
        if stale:
            assert f"{before.desired_weight}%" in refusal.detail
        elif before.state == State.PAUSED:
            assert refusal.code == RefusalCode.PAUSED
        elif event.target_percent is not None and not _is_later_step(before, event.target_percent):
            assert refusal.code == RefusalCode.INVALID_TARGET
            assert f"{event.target_percent}%" in refusal.detail
        else:
            assert refusal.code == RefusalCode.NOT_READY
            assert not event.force
            assert not model.ready(before)
            assert refusal.time_left == model.time_left(before)
            assert ("left" in refusal.detail) == (refusal.time_left > timedelta(0))
            for name in refusal.failing_gates:
                assert name in refusal.detail
            assert set(refusal.failing_gates) == {
                name for name, phase in model.gates.items() if phase != GatePhase.PASS
            }


def check_transition(
    before: Rollout | None, event: Event, now: datetime, model: Model, decision: Transition
) -> None:
    """`model` describes `before` at `now` (gate results of this event already merged)."""
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
        # Start only opens a rollout when none is open, at the first step or at its target.
        assert before is None or not before.is_open
        assert after.is_open
        assert after.desired_weight == (event.target_percent or event.steps[0].weight)
        assert after.step_started_at == now
        assert after.triggered_by == event.actor.triggered_by
        assert effects[0] == SetWeight(after.desired_weight)
        assert [audit.action for audit in _audits(decision)] == ["rollout.started"]
        return

    assert before is not None
    if not before.is_open:
        # A finished rollout absorbs every (non-Start) event.
        assert after == before
        assert effects == ()
        return

    # Within one rollout the step clock never moves backwards, nor does the step.
    assert after.step_started_at >= before.step_started_at
    assert after.step_index >= before.step_index
    assert after.service == before.service
    assert after.canary_version == before.canary_version

    promoted = after.step_index != before.step_index
    actions = [audit.action for audit in _audits(decision)]
    if promoted:
        # Weight (and step) rises only by a promotion into a new step: a person's Promote or
        # the controller's auto-promotion.
        assert after.desired_weight > before.desired_weight
        assert after.step_started_at == now
        assert after.paused_for == timedelta(0)
        assert all(gate.phase == GatePhase.PENDING for gate in after.gates)
        assert "rollout.promoted" in actions
        audit = next(audit for audit in _audits(decision) if audit.action == "rollout.promoted")
        assert audit.details["from_weight"] == before.desired_weight
        assert audit.details["to_weight"] == after.desired_weight
        if isinstance(event, Promote):
            assert after.triggered_by == event.actor.triggered_by
            if event.target_percent is not None:
                assert after.desired_weight == event.target_percent
            else:
                assert after.step_index == before.step_index + 1
            assert audit.details.get("jumped", False) == (after.step_index != before.step_index + 1)
            assert event.force or model.ready(before)
            assert audit.details["forced"] == (event.force and not model.ready(before))
        else:
            assert isinstance(event, Tick | GateResults | Resume)
            assert before.auto_promote
            assert model.ready(_as_resumed(before, event))
            assert after.triggered_by == Trigger.CONTROLLER
            assert after.step_index == before.step_index + 1
            assert audit.details["forced"] is False
    elif after.state != State.ROLLED_BACK:
        assert after.desired_weight == before.desired_weight
        assert after.step_started_at == before.step_started_at

    # A Promote that is not refused always moves the rollout forward.
    if isinstance(event, Promote):
        assert promoted or after.state == State.SUCCEEDED
        assert event.from_percent in (None, before.desired_weight)

    # SetWeight is emitted exactly when the weight changes, with the new weight.
    set_weights = [effect.weight for effect in effects if isinstance(effect, SetWeight)]
    if after.desired_weight != before.desired_weight:
        assert set_weights == [after.desired_weight]
    else:
        assert set_weights == []

    # Every change (beyond the gates' latest results) is audited and says who caused it.
    if _ignoring_gates(after) != _ignoring_gates(before):
        assert actions
        if isinstance(event, CONTROLLER_EVENTS):
            assert after.triggered_by == Trigger.CONTROLLER
        elif isinstance(event, Rollback | Pause | Promote):
            assert after.triggered_by == event.actor.triggered_by
        else:
            assert isinstance(event, Resume)
            assert actions[0] == "rollout.resumed"
            assert after.triggered_by in (event.actor.triggered_by, Trigger.CONTROLLER)
    else:
        # Nothing else changed: at most a notification that a gate started failing.
        assert all(isinstance(effect, Notify) and effect.kind == "gate_failing"
                   for effect in effects)  # fmt: skip
        failing_now = {gate.name for gate in after.gates if gate.phase == GatePhase.FAIL}
        failing_before = {gate.name for gate in before.gates if gate.phase == GatePhase.FAIL}
        notified = {effect.details["gate"] for effect in effects if isinstance(effect, Notify)}
        assert notified == failing_now - failing_before

    # Safety never pauses: a breach rolls back from every open state.
    breach = isinstance(event, GateResults) and any(result.breached for result in event.results)
    if breach:
        assert after.state == State.ROLLED_BACK
        assert after.triggered_by == Trigger.CONTROLLER
    if after.state == State.ROLLED_BACK:
        assert isinstance(event, Rollback) or breach
        assert effects[0] == SetWeight(0)
        assert after.reason
        assert after.finished_at == now
    if after.state == State.SUCCEEDED:
        assert before.state in (State.BAKING, State.PAUSED)
        assert (isinstance(event, Promote) and event.force) or model.ready(
            _as_resumed(before, event)
        )
        assert after.finished_at == now
    if after.state == State.AWAITING_PROMOTION and before.state != State.AWAITING_PROMOTION:
        assert model.ready(_as_resumed(before, event))

    # The controller's events (and a resume) leave an open rollout settled, unless they just
    # advanced it (the new step may itself be ready at once).
    if isinstance(event, Tick | GateResults | Resume) and not promoted and after.is_open:
        ready = model.ready(_as_resumed(before, event))
        if after.state in (State.PROGRESSING, State.BAKING):
            assert not ready
        if after.state == State.AWAITING_PROMOTION:
            assert ready


def check_next_due(rollout: Rollout, model: Model, now: datetime) -> None:
    due = next_due(rollout, now, INTERVAL)
    if not rollout.is_open:
        assert due is None
        return
    assert due is not None
    left = model.time_left(rollout)
    if rollout.state != State.PAUSED and left > timedelta(0):
        assert due == now + min(INTERVAL, left)
    else:
        assert due == now + INTERVAL


# Properties -------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_random_event_sequences_keep_the_invariants(scenario: Scenario) -> None:
    rollout: Rollout | None = None
    now = T0
    model = Model()

    for advance, event in scenario.moves:
        if rollout is not None and rollout.is_open and rollout.state != State.PAUSED:
            model.waited += advance
        now += advance
        if rollout is not None:
            if rollout.is_open:
                model.agrees_with(rollout, now)
            check_next_due(rollout, model, now)

        if (
            isinstance(event, GateResults)
            and rollout is not None
            and rollout.is_open
            and not any(result.breached for result in event.results)
        ):
            # The machine judges readiness on the merged latest results.
            for result in event.results:
                model.gates[result.name] = result.phase

        decision = decide(rollout, event, now)
        if isinstance(decision, Refusal):
            check_refusal(rollout, event, model, now, decision)
            continue
        check_transition(rollout, event, now, model, decision)
        after = decision.rollout
        if isinstance(event, Start):
            model = Model(gates=dict.fromkeys(event.gate_names, GatePhase.PENDING))
        elif rollout is not None and after.step_index != rollout.step_index:
            model.new_step()
        rollout = after
        if rollout.is_open:
            model.agrees_with(rollout, now)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(min_size=0, max_size=25), st.integers(0, 25))
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
        assert rollout.canary_version in decision.detail
    else:
        assert isinstance(decision, Transition)
        assert decision.rollout.canary_version == "v9"
        assert decision.rollout.is_open
        again = decide(decision.rollout, start, now)
        assert isinstance(again, Refusal)
        assert again.code == RefusalCode.OPEN_ROLLOUT
