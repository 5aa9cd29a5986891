"""The audit's canonical JSON: the fast writer writes exactly what the standard library writes
for every value an event can hold, so hashes never depend on which one wrote them."""

from __future__ import annotations

import enum
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opsapi.audit.values import canonical_text, storable, storable_text
from tests.audit.test_stored_values import json_values


def standard(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class Phase(enum.StrEnum):
    PASS = "pass"


# Values where orjson alone writes otherwise or refuses, and the common shapes of details.
CASES = [
    pytest.param({"value": 1e-05}, id="float-below-1e-4"),
    pytest.param({"value": -9.5e-07, "ok": 0.0001}, id="negative-tiny-and-1e-4"),
    pytest.param([1e-300, 5e-324], id="subnormal"),
    pytest.param({"big": 2**64, "small": -(2**63) - 1}, id="past-64-bits"),
    pytest.param({"n": 1e16, "m": 1e23, "z": -0.0}, id="exponents"),
    pytest.param({"é": 1, "e": 2, "\U0001f600": 3, "\uffff": 4, "Z": 5}, id="key-order"),
    pytest.param({"t": '\x00\x1f\x7f\u2028"\\/\t\n'}, id="escapes"),
    pytest.param({"state": Phase.PASS, Phase.PASS: [True, None]}, id="enum-members"),
    pytest.param({"text": "0.00001 looks like a number"}, id="text-like-a-tiny-float"),
    pytest.param(
        {
            "from_state": "progressing",
            "to_state": "rolled_back",
            "weight": 0,
            "transitions": [{"action": "rollout.rolled_back", "gates": [{"value": 0.0123}]}],
        },
        id="transition-details",
    ),
]


@pytest.mark.parametrize("value", CASES)
def test_the_fast_writer_writes_what_the_standard_library_writes(value: Any) -> None:
    kept = storable(value)
    assert storable_text(kept) == standard(kept) == canonical_text(kept)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=json_values())
def test_any_storable_document_is_written_as_the_standard_library_writes_it(
    document: Any,
) -> None:
    kept = storable(document)
    assert storable_text(kept) == standard(kept)


@settings(max_examples=3000, deadline=None)
@given(number=st.floats(allow_nan=False, allow_infinity=False))
def test_every_float_is_written_as_python_writes_it(number: float) -> None:
    assert storable_text({"value": number}) == standard({"value": number})
