"""Domain refusals as problem+json: the one place where the canary domain meets HTTP status."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from opsapi.canary.machine import RefusalCode
from opsapi.canary.service import Refused
from opsapi.durations import format_duration
from opsapi.errors import Conflict, NotFound, Problem, Unprocessable

_STATUS: dict[RefusalCode, type[Problem]] = {
    RefusalCode.NO_ROLLOUT: NotFound,
    RefusalCode.INVALID_TARGET: Unprocessable,
}


def refusal_problem(refused: Refused) -> Problem:
    """The client-facing error for a refused event (409 unless the request itself is wrong)."""
    refusal = refused.refusal
    extra: dict[str, Any] = {"reason_code": refusal.code.value}
    if refused.rollout_id is not None:
        extra["rollout_id"] = refused.rollout_id
        extra["state"] = refused.state
        extra["current_weight"] = refused.current_weight
    if refusal.time_left is not None:
        extra["time_left"] = format_duration(whole_seconds(refusal.time_left))
        extra["time_left_seconds"] = round(refusal.time_left.total_seconds(), 3)
    if refusal.failing_gates:
        extra["failing_gates"] = list(refusal.failing_gates)
    if refusal.holds:
        extra["holds"] = [
            {"kind": hold.kind.value, "detail": hold.detail,
             "until": hold.until.isoformat() if hold.until else None}
            for hold in refusal.holds
        ]  # fmt: skip
    return _STATUS.get(refusal.code, Conflict)(refusal.detail, **extra)


def whole_seconds(duration: timedelta) -> timedelta:
    """`duration` rounded up to whole seconds ("29m59s975ms" helps nobody)."""
    return timedelta(seconds=math.ceil(duration.total_seconds()))
