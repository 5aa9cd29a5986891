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


DEFAULT_POLICY = Policy()
