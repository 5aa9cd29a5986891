"""A service's release policy: steps, gates, router, timers — validated at the API boundary."""

from __future__ import annotations

import itertools
import re
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import (
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

SERVICE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
GATE_NAME = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
VERSION = r"^[A-Za-z0-9][A-Za-z0-9._+:@/-]{0,127}$"
ROUTER_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"
MIN_INTERVAL = timedelta(seconds=1)


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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StepPolicy(_Strict):
    weight: int = Field(ge=1, le=100)
    wait: Duration


class GatePolicy(_Strict):
    name: str = Field(pattern=GATE_NAME)
    query: str = Field(min_length=1, max_length=4000)
    op: Literal["<", "<=", ">", ">="]
    threshold: float
    for_: Duration = Field(default=timedelta(0), alias="for")
    on_no_data: Literal["hold", "fail", "pass"] = "hold"
    baseline_query: str | None = Field(default=None, min_length=1, max_length=4000)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class MinSample(_Strict):
    query: str = Field(min_length=1, max_length=4000)
    min: float = Field(ge=0)


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
    auto_promote: bool = False
    gates: list[GatePolicy] = Field(default_factory=list, max_length=50)
    min_sample: MinSample | None = None
    router: RouterPolicy = Field(default_factory=RouterPolicy)
    pagerduty: PagerDutyPolicy | None = None

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
_REQUESTS = 'http_requests_total{{service="{{service}}",version="{{canary_version}}"{extra}}}'
_RATE = "sum(rate(" + _REQUESTS + "[5m]))"
CHECKLIST_GATES = (
    GatePolicy.model_validate({
        "name": "p95-latency",
        "query": 'histogram_quantile(0.95, sum by (le) (rate(http_request_duration_seconds_bucket'
                 '{service="{service}",version="{canary_version}"}[5m])))',
        "op": "<", "threshold": 10, "for": "5m", "on_no_data": "hold",
    }),
    GatePolicy.model_validate({
        "name": "error-rate",
        "query": _RATE.format(extra=',code=~"5.."') + " / " + _RATE.format(extra=""),
        "op": "<", "threshold": 0.01, "for": "5m", "on_no_data": "hold",
    }),
    GatePolicy.model_validate({
        "name": "success-rate",
        "query": _RATE.format(extra=',code=~"[23].."') + " / " + _RATE.format(extra=""),
        "op": ">=", "threshold": 0.95, "for": "5m", "on_no_data": "hold",
    }),
    GatePolicy.model_validate({
        "name": "webhook-signature-verification",
        "query": 'sum(rate(webhook_signature_verifications_total{service="{service}",'
                 'version="{canary_version}",result="ok"}[5m])) / sum(rate('
                 'webhook_signature_verifications_total{service="{service}",'
                 'version="{canary_version}"}[5m]))',
        "op": ">=", "threshold": 0.999, "for": "5m", "on_no_data": "pass",
    }),
    GatePolicy.model_validate({
        "name": "db-connection-failures",
        "query": 'sum(rate(db_connection_attempts_total{service="{service}",'
                 'version="{canary_version}",result="error"}[2m])) / sum(rate('
                 'db_connection_attempts_total{service="{service}",version="{canary_version}"}'
                 "[2m]))",
        "op": "<", "threshold": 0.05, "for": "2m", "on_no_data": "pass",
    }),
)  # fmt: skip


def default_policy(*, with_gates: bool) -> Policy:
    """The policy of a service never configured: the checklist's steps, and its gates when
    a metrics backend is configured (without one, gates could only ever hold)."""
    return Policy(gates=list(CHECKLIST_GATES)) if with_gates else Policy()
