"""The pure gate judgement: value against threshold, `for`, on_no_data, baselines, min_sample."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from opsapi.canary.machine import GatePhase, GateStatus
from opsapi.canary.policy import GatePolicy
from opsapi.gates import judge
from opsapi.gates.provider import Measurement

T0 = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def gate(**overrides: Any) -> GatePolicy:
    fields = {"name": "error-rate", "query": "q", "op": "<", "threshold": 0.01, "for": "2m"}
    return GatePolicy.model_validate({**fields, **overrides})


@pytest.mark.parametrize(
    ("op", "threshold", "value", "phase"),
    [
        ("<", 0.01, 0.005, GatePhase.PASS),
        ("<", 0.01, 0.01, GatePhase.FAIL),
        ("<=", 0.01, 0.01, GatePhase.PASS),
        (">", 0.95, 0.95, GatePhase.FAIL),
        (">=", 0.95, 0.95, GatePhase.PASS),
        (">=", 0.95, 0.2, GatePhase.FAIL),
    ],
)
def test_value_against_threshold(op: str, threshold: float, value: float, phase: GatePhase) -> None:
    status = judge.judge(gate(op=op, threshold=threshold), Measurement(value), None, T0)
    assert status.phase == phase
    assert status.value == value
    assert status.threshold == threshold


def test_breach_only_after_failing_continuously_for_its_for() -> None:
    g = gate(**{"for": "2m"})
    first = judge.judge(g, Measurement(0.5), None, T0)
    later = judge.judge(g, Measurement(0.5), first, T0 + timedelta(seconds=119))
    breach = judge.judge(g, Measurement(0.5), later, T0 + timedelta(minutes=2))

    assert (first.phase, first.breached, first.failing_since) == (GatePhase.FAIL, False, T0)
    assert (later.breached, later.failing_since) == (False, T0)
    assert breach.breached is True
    assert "0.5 is not < 0.01" in (breach.detail or "")


def test_a_pass_resets_the_failure_clock() -> None:
    g = gate(**{"for": "2m"})
    failing = judge.judge(g, Measurement(0.5), None, T0)
    passing = judge.judge(g, Measurement(0.0), failing, T0 + timedelta(minutes=1))
    again = judge.judge(g, Measurement(0.5), passing, T0 + timedelta(minutes=2))

    assert passing.failing_since is None
    assert again.failing_since == T0 + timedelta(minutes=2)
    assert again.breached is False


def test_zero_for_breaches_on_the_first_failure() -> None:
    assert judge.judge(gate(**{"for": "0s"}), Measurement(1.0), None, T0).breached is True


@pytest.mark.parametrize(
    ("on_no_data", "phase", "breached"),
    [
        ("hold", GatePhase.NO_DATA, False),
        ("pass", GatePhase.PASS, False),
        ("fail", GatePhase.FAIL, True),
    ],
)
def test_no_data(on_no_data: str, phase: GatePhase, breached: bool) -> None:
    g = gate(on_no_data=on_no_data, **{"for": "0s"})
    status = judge.judge(g, Measurement(None, "prometheus unavailable"), None, T0)
    assert status.phase == phase
    assert status.breached is breached
    assert "prometheus unavailable" in (status.detail or "")


def test_no_data_on_hold_keeps_but_never_completes_a_pending_breach() -> None:
    g = gate(**{"for": "2m"})
    failing = judge.judge(g, Measurement(0.5), None, T0)
    blind = judge.judge(g, Measurement(None, "down"), failing, T0 + timedelta(minutes=5))
    back = judge.judge(g, Measurement(0.5), blind, T0 + timedelta(minutes=6))

    assert (blind.phase, blind.breached, blind.failing_since) == (GatePhase.NO_DATA, False, T0)
    assert back.breached is True


@pytest.mark.parametrize(
    ("canary", "stable", "expected"),
    [
        (Measurement(1.3), Measurement(1.0), 1.3),
        (Measurement(1.0), Measurement(0.0), None),
        (Measurement(1.0), Measurement(None, "no series"), None),
        (Measurement(None, "no series"), Measurement(1.0), None),
    ],
)
def test_baseline_ratio(canary: Measurement, stable: Measurement, expected: float | None) -> None:
    g = gate(baseline_query="stable q", op="<", threshold=1.2)
    value = judge.gate_value(g, canary, stable)
    if expected is None:
        assert value.value is None
        assert value.error
    else:
        assert value.value == pytest.approx(expected)


def test_baseline_gate_fails_above_the_ratio() -> None:
    g = gate(baseline_query="stable q", op="<", threshold=1.2, **{"for": "0s"})
    status = judge.judge(g, judge.gate_value(g, Measurement(3.0), Measurement(1.0)), None, T0)
    assert status.phase == GatePhase.FAIL
    assert status.breached


@pytest.mark.parametrize(
    ("count", "minimum", "short"),
    [
        (Measurement(99), 100, True),
        (Measurement(100), 100, False),
        (Measurement(None, "x"), 1, True),
    ],
)
def test_min_sample(count: Measurement, minimum: float, short: bool) -> None:
    reason = judge.below_min_sample(count, minimum)
    assert (reason is not None) is short


def test_insufficient_sample_is_no_data_and_never_breaches() -> None:
    previous = GateStatus("error-rate", GatePhase.FAIL, 0.5, 0.01, T0, False)
    status = judge.insufficient_sample(gate(on_no_data="fail"), "sample too small", previous)
    assert status.phase == GatePhase.NO_DATA
    assert status.breached is False
    assert status.failing_since == T0
