"""The gate judgement: pure functions from measurements and the previous status to a status.

A gate *fails* when its value does not satisfy `value op threshold`; it *breaches* when it has
failed continuously for its `for` (like a Prometheus alert's `for`). No data never breaches
unless the gate says `on_no_data: fail`; with `hold` it blocks readiness and keeps the failure
clock where it was (a Prometheus blip neither resets nor advances a pending breach).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from datetime import datetime

from opsapi.canary.machine import GatePhase, GateStatus
from opsapi.canary.policy import GatePolicy
from opsapi.gates.provider import Measurement

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def gate_value(gate: GatePolicy, canary: Measurement, baseline: Measurement | None) -> Measurement:
    """The value compared with the threshold: the measurement, or canary/stable for baselines."""
    if gate.baseline_query is None:
        return canary
    if not canary.has_data:
        return canary
    if baseline is None or baseline.value is None:
        return Measurement(None, f"baseline: {baseline.error if baseline else 'not measured'}")
    if baseline.value == 0:
        return Measurement(None, "baseline is 0; the ratio is undefined")
    assert canary.value is not None
    return Measurement(canary.value / baseline.value)


def judge(
    gate: GatePolicy,
    measurement: Measurement,
    previous: GateStatus | None,
    now: datetime,
) -> GateStatus:
    """The gate's status after `measurement` at `now`, given its previous status."""
    failing_since = previous.failing_since if previous else None
    if measurement.value is None:
        if gate.on_no_data == "pass":
            return GateStatus(gate.name, GatePhase.PASS, None, gate.threshold, None, False,
                              f"no data ({measurement.error}); on_no_data=pass")  # fmt: skip
        if gate.on_no_data == "hold":
            return GateStatus(gate.name, GatePhase.NO_DATA, None, gate.threshold, failing_since,
                              False, f"no data: {measurement.error}")  # fmt: skip
        detail = f"no data ({measurement.error}); on_no_data=fail"
        return _failing(gate, None, failing_since or now, now, detail)
    if OPERATORS[gate.op](measurement.value, gate.threshold):
        return GateStatus(gate.name, GatePhase.PASS, measurement.value, gate.threshold)
    detail = f"{measurement.value:g} is not {gate.op} {gate.threshold:g}"
    return _failing(gate, measurement.value, failing_since or now, now, detail)


def _failing(
    gate: GatePolicy, value: float | None, since: datetime, now: datetime, detail: str
) -> GateStatus:
    breached = now - since >= gate.for_
    return GateStatus(gate.name, GatePhase.FAIL, value, gate.threshold, since, breached, detail)


def below_min_sample(count: Measurement, minimum: float) -> str | None:
    """Why the minimum-traffic guard is not met, or None when it is."""
    if count.value is None:
        return f"sample size unknown: {count.error}"
    if count.value < minimum:
        return f"sample too small: {count.value:g} < {minimum:g}"
    return None


def insufficient_sample(gate: GatePolicy, reason: str, previous: GateStatus | None) -> GateStatus:
    """A quiet canary proves nothing: every gate is no data (never a breach, never a pass)."""
    failing_since = previous.failing_since if previous else None
    return GateStatus(gate.name, GatePhase.NO_DATA, None, gate.threshold, failing_since, False,
                      reason)  # fmt: skip
