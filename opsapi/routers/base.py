"""The router protocol: split a service's traffic between two named slots, read back the split.

A router that sends traffic to fixed places (nginx addresses, HAProxy servers) names two *slots*
in the service's policy (`"slots": {"blue": …, "green": …}`, any two names). A rollout runs its
canary in one slot (`canary_slot`, which gets the percentage) and leaves the other slot of the two
the rest; the next rollout runs its canary in the other slot. Routers without slots (webhook,
pull) use `DEFAULT_SLOTS` for the same lifecycle in their payloads.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

SLOT_NAME = r"^[a-z0-9][a-z0-9_-]{0,31}$"
DEFAULT_SLOTS = ("blue", "green")
_SLOT_NAME = re.compile(SLOT_NAME)
# A parameter name is echoed in a field error only when it looks like one (never a pasted value).
_PARAMETER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class RouterError(Exception):
    """Applying or reading a weight failed. The message is safe to show and to audit."""


@dataclass(frozen=True)
class RouteTarget:
    """What a router acts on: one service, its policy parameters, which slot runs the canary,
    and the versions."""

    service: str
    rollout_id: int | None = None
    # The policy's router parameters, e.g. {"upstream": "checkout", "slots": {"blue":
    # "10.0.0.1:8080", "green": "10.0.0.2:8080"}}.
    params: dict[str, Any] = field(default_factory=dict)
    canary_slot: str = "green"  # gets `weight` %; the other slot of the two gets the rest
    stable_slot: str = "blue"  # may equal canary_slot (after a success both name the new stable's)
    stable_version: str | None = None
    canary_version: str | None = None
    state: str | None = None  # the rollout's state, for payloads
    # Fail-safe lease (epoch seconds): a router that supports expiry sends everything to the
    # stable slot by itself once it has passed. None: no lease.
    valid_until: float | None = None


def is_slot_name(name: object) -> bool:
    """Whether `name` is a valid slot name (slot names are written into router configs)."""
    return isinstance(name, str) and bool(_SLOT_NAME.fullmatch(name))


def slot_names(params: Mapping[str, Any]) -> tuple[str, str]:
    """The two slot names of a router policy's parameters in the order written; DEFAULT_SLOTS
    when it names none (webhook, pull).

    Validity is `check_params`'s job: parameters whose `slots` is not a mapping of two string
    names also give DEFAULT_SLOTS (a router refuses them when applying)."""
    slots = params.get("slots")
    if isinstance(slots, Mapping) and len(slots) == 2:
        first, second = slots
        if isinstance(first, str) and isinstance(second, str):
            return first, second
    return DEFAULT_SLOTS


def check_weight(weight: int) -> None:
    """Refuse a percentage outside 0-100 (RouterError: nothing is applied)."""
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 100:
        raise RouterError(f"canary weight must be an integer 0-100, got {weight!r}")


def slot_weights(target: RouteTarget, weight: int) -> dict[str, int]:
    """Per-slot percentages: canary_slot gets `weight`, the other of the two slots 100 - weight.

    "The other" comes from the parameters' two slot names, not from `stable_slot`, which equals
    `canary_slot` after a success. RouterError when `weight` is not 0-100 or `canary_slot` is
    not one of the two slots."""
    check_weight(weight)
    names = slot_names(target.params)
    if target.canary_slot not in names:
        shown = target.canary_slot if is_slot_name(target.canary_slot) else "(invalid name)"
        raise RouterError(
            f"canary slot {shown} is not one of the policy's slots ({names[0]}, {names[1]})"
        )
    return {name: weight if name == target.canary_slot else 100 - weight for name in names}


def check_slots(
    params: Mapping[str, Any], kind: str, value_error: Callable[[object], str | None]
) -> list[dict[str, str]]:
    """Field errors for a policy's `slots`: exactly two valid names, each value accepted by
    `value_error` (None when good, else the message), never an echoed value."""
    slots = params.get("slots")
    if slots is None:
        return [{"field": "router.slots", "message": f"required: two slots, {_EXAMPLE[kind]}"}]
    if not isinstance(slots, Mapping):
        return [{"field": "router.slots", "message": f"must be an object, {_EXAMPLE[kind]}"}]
    errors = []
    if len(slots) != 2:
        errors.append(
            {"field": "router.slots", "message": f"must name exactly two slots, not {len(slots)}"}
        )
    if not all(is_slot_name(name) for name in slots):
        errors.append({"field": "router.slots", "message": f"slot names must match {SLOT_NAME}"})
    for name, value in slots.items():
        if is_slot_name(name):
            message = value_error(value)
            if message is not None:
                errors.append({"field": f"router.slots.{name}", "message": message})
    return errors


def unknown_parameters(
    params: Mapping[str, Any], known: tuple[str, ...], kind: str, turn_one: tuple[str, ...] = ()
) -> list[dict[str, str]]:
    """Field errors for parameters a router does not take; turn-1 names are told to use slots."""
    errors = []
    for key in sorted(set(params) - set(known), key=str):
        if key in turn_one:
            message = f"no longer accepted: name two slots instead, {_EXAMPLE[kind]}"
            errors.append({"field": f"router.{key}", "message": message})
        elif isinstance(key, str) and _PARAMETER_NAME.fullmatch(key):
            errors.append({"field": f"router.{key}", "message": f"unknown parameter for {kind}"})
        else:
            errors.append({"field": "router", "message": f"unknown parameter for {kind}"})
    return errors


_EXAMPLE = {
    "an nginx router": '"slots": {"blue": "10.0.0.1:8080", "green": "10.0.0.2:8080"}',
    "a haproxy router": '"slots": {"blue": "srv_blue", "green": "srv_green"}',
}


class Router(Protocol):
    """One configured router instance (server configuration, never API input)."""

    name: str

    def check_params(self, params: dict[str, Any]) -> list[dict[str, str]]:
        """Field errors (`{"field", "message"}`) for a policy's parameters; empty when valid."""
        ...

    async def apply(self, target: RouteTarget, weight: int) -> None:
        """Send `weight` % of the service's traffic to the canary slot and the rest to the other
        slot; raise RouterError on failure.

        Returns only once the new weight is live (confirmed), never merely requested.
        """
        ...

    async def read_back(self, target: RouteTarget) -> int | None:
        """The canary slot's percentage live now, or None when the router cannot tell."""
        ...

    async def health(self) -> str:
        """A one-line description of the router's reachability; RouterError when it is down."""
        ...
