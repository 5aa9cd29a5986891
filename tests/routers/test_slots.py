"""Slot arithmetic shared by every router: which slot gets the canary percentage, which the rest."""

from __future__ import annotations

from typing import Any

import pytest

from opsapi.routers.base import (
    DEFAULT_SLOTS,
    RouterError,
    RouteTarget,
    is_slot_name,
    slot_names,
    slot_weights,
)

NGINX = {"upstream": "u", "slots": {"green": "10.0.0.2:80", "blue": "10.0.0.1:80"}}


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (NGINX, ("green", "blue")),  # the order written
        ({"backend": "b", "slots": {"a": "s1", "b": "s2"}}, ("a", "b")),
        ({}, DEFAULT_SLOTS),  # webhook, pull
        ({"slots": {"only": "h:1"}}, DEFAULT_SLOTS),  # invalid: refused by check_params
        ({"slots": "blue,green"}, DEFAULT_SLOTS),
    ],
)
def test_slot_names(params: dict[str, Any], expected: tuple[str, str]) -> None:
    assert slot_names(params) == expected


@pytest.mark.parametrize(
    ("canary", "stable", "weight", "expected"),
    [
        ("green", "blue", 25, {"green": 25, "blue": 75}),  # first release
        ("green", "blue", 0, {"green": 0, "blue": 100}),  # rolled back
        ("green", "green", 100, {"green": 100, "blue": 0}),  # succeeded: both name green
        ("blue", "green", 25, {"green": 75, "blue": 25}),  # second release, in the other slot
        ("blue", "green", 0, {"green": 100, "blue": 0}),
        ("blue", "blue", 100, {"green": 0, "blue": 100}),
    ],
)
def test_slot_weights_give_the_rest_to_the_other_slot(
    canary: str, stable: str, weight: int, expected: dict[str, int]
) -> None:
    target = RouteTarget("checkout", params=NGINX, canary_slot=canary, stable_slot=stable)
    assert slot_weights(target, weight) == expected


def test_slot_weights_refuse_a_foreign_slot_and_bad_weights() -> None:
    with pytest.raises(RouterError, match=r"canary slot red is not one of .*\(green, blue\)"):
        slot_weights(RouteTarget("s", params=NGINX, canary_slot="red"), 10)
    with pytest.raises(RouterError, match=r"canary slot \(invalid name\)"):
        slot_weights(RouteTarget("s", params=NGINX, canary_slot="x; rm -rf /"), 10)
    for weight in (-1, 101, True, 2.5):
        with pytest.raises(RouterError, match="0-100"):
            slot_weights(RouteTarget("s", params=NGINX), weight)  # type: ignore[arg-type]
    # Webhook and pull: the default slots.
    assert slot_weights(RouteTarget("s"), 10) == {"blue": 90, "green": 10}


@pytest.mark.parametrize(
    ("name", "valid"),
    [("blue", True), ("a", True), ("slot_2-b", True), ("x" * 32, True), ("x" * 33, False),
     ("Blue", False), ("-a", False), ("_a", False), ("a b", False), ("", False), (3, False)],
)  # fmt: skip
def test_slot_names_are_strict(name: object, valid: bool) -> None:
    assert is_slot_name(name) is valid
