"""A service's release policy: steps, gates, router, timers — validated at the API boundary."""

from __future__ import annotations

import itertools
import math
import re
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationInfo,
    field_validator,
    model_validator,
)

from opsapi.canary.machine import Step
from opsapi.durations import format_duration, parse_duration
from opsapi.gates.templates import check_template
from opsapi.notifications.rules import NotifyRule

SERVICE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
GATE_NAME = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
VERSION = r"^[A-Za-z0-9][A-Za-z0-9._+:@/-]{0,127}$"
ROUTER_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"
MIN_INTERVAL = timedelta(seconds=1)
# Validation context of a policy put through the API. The query and number checks run only under
# it, so that a stored policy or a rollout's snapshot written before they existed still loads.
_INPUT = "opsapi.policy_input"


def is_service_name(name: str) -> bool:
    """Whether `name` is a valid service name (it is interpolated into PromQL and configs)."""
    return bool(SERVICE_NAME.fullmatch(name))


def _to_duration(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        return value
    return parse_duration(value)


Duration = Annotated[
    timedelta,
    BeforeValidator(_to_duration),
    PlainSerializer(format_duration, return_type=str),
]


def _is_input(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get(_INPUT))


def _checked_template(query: str, info: ValidationInfo) -> str:
    if _is_input(info):
        check_template(query)
    return query


def _checked_number(value: float, info: ValidationInfo) -> float:
    if _is_input(info) and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


# A gate's PromQL template; put through the API it must use only the exact placeholders and parse.
QueryTemplate = Annotated[
    str, Field(min_length=1, max_length=4000), AfterValidator(_checked_template)
]
# JSON allows 1e999 (infinity) and Python's reader NaN; put through the API neither is a number.
FiniteNumber = Annotated[float, AfterValidator(_checked_number)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StepPolicy(_Strict):
    weight: int = Field(ge=1, le=100)
    wait: Duration


class GatePolicy(_Strict):
    name: str = Field(pattern=GATE_NAME)
    query: QueryTemplate
    op: Literal["<", "<=", ">", ">="]
    threshold: FiniteNumber
    for_: Duration = Field(default=timedelta(0), alias="for")
    on_no_data: Literal["hold", "fail", "pass"] = "hold"
    baseline_query: QueryTemplate | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class MinSample(_Strict):
    query: QueryTemplate
    min: FiniteNumber = Field(ge=0)


class RouterPolicy(BaseModel):
    """The router instance a service uses, plus that service's parameters for it."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(default="pull", pattern=ROUTER_NAME)

    def parameters(self) -> dict[str, Any]:
        """The service-specific parameters (everything but the instance name)."""
        return dict(self.model_extra or {})


class PagerDutyPolicy(_Strict):
    service_ids: list[str] = Field(default_factory=list, max_length=50)
    priorities: list[str] = Field(default_factory=lambda: ["P1"], max_length=10)
    urgencies: list[str] = Field(default_factory=lambda: ["high"], max_length=2)
    routing_key: str | None = Field(default=None, max_length=64)
    # Services held too while an incident is open on this one (they depend on it).
    dependants: list[Annotated[str, Field(pattern=SERVICE_NAME.pattern)]] = Field(
        default_factory=list, max_length=50
    )


DEFAULT_STEPS = (
    StepPolicy(weight=10, wait=timedelta(minutes=30)),
    StepPolicy(weight=25, wait=timedelta(minutes=15)),
    StepPolicy(weight=50, wait=timedelta(minutes=15)),
    StepPolicy(weight=75, wait=timedelta(minutes=10)),
    StepPolicy(weight=100, wait=timedelta(hours=2)),
)


class Policy(_Strict):
    """A service's release policy (the body of PUT /services/{name})."""

    steps: list[StepPolicy] = Field(
        default_factory=lambda: list(DEFAULT_STEPS), min_length=1, max_length=20
    )
    bake: Duration | None = None
    interval: Duration = timedelta(seconds=60)
    # How long an applied canary weight stays valid without the controller renewing it (routers
    # that can hold an expiry then send everything to the stable slot): default 3 x interval,
    # at least 30 s.
    lease: Duration | None = None
    auto_promote: bool = False
    gates: list[GatePolicy] = Field(default_factory=list, max_length=50)
    min_sample: MinSample | None = None
    router: RouterPolicy = Field(default_factory=RouterPolicy)
    pagerduty: PagerDutyPolicy | None = None
    notify: list[NotifyRule] = Field(default_factory=list, max_length=20)

    @model_validator(mode="before")
    @classmethod
    def _bake_alone_sets_the_last_wait(cls, data: Any) -> Any:
        if isinstance(data, dict) and "bake" in data and "steps" not in data:
            steps = [step.model_dump() for step in DEFAULT_STEPS]
            steps[-1] = {"weight": 100, "wait": data["bake"]}
            return {**data, "steps": steps}
        return data

    @field_validator("steps")
    @classmethod
    def _steps_ascend_to_100(cls, steps: list[StepPolicy]) -> list[StepPolicy]:
        weights = [step.weight for step in steps]
        if any(later <= earlier for earlier, later in itertools.pairwise(weights)):
            raise ValueError(f"step weights must be strictly ascending, got {weights}")
        if weights[-1] != 100:
            raise ValueError(f"the last step must be 100%, got {weights[-1]}%")
        return steps

    @field_validator("bake")
    @classmethod
    def _bake_agrees_with_last_step(
        cls, bake: timedelta | None, info: ValidationInfo
    ) -> timedelta | None:
        steps = info.data.get("steps")
        if bake is not None and steps and bake != steps[-1].wait:
            raise ValueError(
                f"bake {format_duration(bake)} disagrees with the 100% step's wait "
                f"{format_duration(steps[-1].wait)}"
            )
        return bake

    @field_validator("interval")
    @classmethod
    def _interval_at_least_1s(cls, interval: timedelta) -> timedelta:
        if interval < MIN_INTERVAL:
            raise ValueError("interval must be at least 1s")
        return interval

    @field_validator("gates")
    @classmethod
    def _gate_names_unique(cls, gates: list[GatePolicy]) -> list[GatePolicy]:
        names = [gate.name for gate in gates]
        if len(names) != len(set(names)):
            raise ValueError("gate names must be unique")
        return gates

    @field_validator("lease")
    @classmethod
    def _lease_at_least_1s(cls, lease: timedelta | None) -> timedelta | None:
        if lease is not None and lease < MIN_INTERVAL:
            raise ValueError("lease must be at least 1s")
        return lease

    def effective_lease(self) -> timedelta:
        """The lease a rollout under this policy starts with."""
        if self.lease is not None:
            return self.lease
        return max(3 * self.interval, timedelta(seconds=30))

    def machine_steps(self) -> tuple[Step, ...]:
        """The steps as the state machine sees them."""
        return tuple(Step(step.weight, step.wait) for step in self.steps)

    def document(self) -> dict[str, Any]:
        """The JSON document clients read back (durations as strings, `bake` always present)."""
        body = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        body["bake"] = format_duration(self.steps[-1].wait)
        return body


# The release checklist's rollback triggers as gates over the metric conventions in
# docs/metrics.md. Request-based gates hold on no data (a canary without traffic proves
# nothing); webhook and database gates pass on no data, since many services have neither.
_CANARY = 'service="{service}",version="{canary_version}"'


def _share(metric: str, part: str, window: str) -> str:
    """The canary's `part` of `metric` as a ratio of all of it, over `window`.

    A labelled series exists only once it has been incremented: a canary that never failed has
    no error series, one that always failed has no success series. `or vector(0)` reads the
    missing part as 0 while the denominator has traffic; without traffic the division stays
    empty (no data). Both sides carry no labels after `sum()`, so they match.
    """
    whole = f"sum(rate({metric}{{{_CANARY}}}[{window}]))"
    part_rate = f"sum(rate({metric}{{{_CANARY},{part}}}[{window}]))"
    return f"({part_rate} or vector(0)) / {whole}"


CHECKLIST_GATES = (
    GatePolicy.model_validate({
        "name": "p95-latency",
        "query": "histogram_quantile(0.95, sum by (le) (rate(http_request_duration_seconds_bucket"
                 f"{{{_CANARY}}}[5m])))",
        "op": "<", "threshold": 10, "for": "5m", "on_no_data": "hold",
    }),
    GatePolicy.model_validate({
        "name": "error-rate",
        "query": _share("http_requests_total", 'code=~"5.."', "5m"),
        "op": "<", "threshold": 0.01, "for": "5m", "on_no_data": "hold",
    }),
    GatePolicy.model_validate({
        # A canary serving only errors has no 2xx/3xx series: 0, which fails (not no data).
        "name": "success-rate",
        "query": _share("http_requests_total", 'code=~"[23].."', "5m"),
        "op": ">=", "threshold": 0.95, "for": "5m", "on_no_data": "hold",
    }),
    GatePolicy.model_validate({
        # Every verification failing leaves no "ok" series: 0, which fails (not a no-data pass).
        "name": "webhook-signature-verification",
        "query": _share("webhook_signature_verifications_total", 'result="ok"', "5m"),
        "op": ">=", "threshold": 0.999, "for": "5m", "on_no_data": "pass",
    }),
    GatePolicy.model_validate({
        "name": "db-connection-failures",
        "query": _share("db_connection_attempts_total", 'result="error"', "2m"),
        "op": "<", "threshold": 0.05, "for": "2m", "on_no_data": "pass",
    }),
)  # fmt: skip


def default_policy(*, with_gates: bool) -> Policy:
    """The policy of a service never configured: the checklist's steps, and its gates when
    a metrics backend is configured (without one, gates could only ever hold)."""
    return Policy(gates=list(CHECKLIST_GATES)) if with_gates else Policy()


def effective_policy(document: dict[str, Any], default: Policy) -> Policy:
    """The policy a PUT body means: each omitted field is `default`'s (`"gates": []` is none),
    `bake` alone replaces the last wait of `default`'s steps, and the input checks apply
    (placeholders, PromQL, finite numbers). Raises pydantic's ValidationError."""
    context = {_INPUT: True}
    if not isinstance(document, dict):
        return Policy.model_validate(document, context=context)  # refused: not an object
    base = default.model_dump(by_alias=True, exclude={"bake"})
    merged = {**base, **document}
    if "steps" not in document and document.get("bake") is not None:
        bake = _duration_or_none(document["bake"])
        if bake is not None:  # an invalid bake is reported on `bake`, not on the steps
            merged["steps"] = [*base["steps"][:-1], {**base["steps"][-1], "wait": bake}]
    return Policy.model_validate(merged, context=context)


def _duration_or_none(value: Any) -> timedelta | None:
    try:
        return _to_duration(value)
    except (TypeError, ValueError):
        return None
