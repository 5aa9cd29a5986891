"""The engine's JSON columns: written and read fast, and exactly as the standard library writes
and reads them."""

from __future__ import annotations

import enum
import json
import math
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from opsapi.canary.models import ServiceRecord
from opsapi.storage import rows
from opsapi.storage.db import SessionFactory, dump_json, load_json

NOW = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


class Slot(enum.StrEnum):
    BLUE = "blue"


# What JSON columns hold (policies, routers, steps, gates), and what orjson alone would refuse
# or write otherwise: integers past 64 bits, a lone surrogate, an enum, non-string keys.
VALUES: list[Any] = [
    {"name": "pull", "nested": {"a": [1, None, "ü", 1.5, True]}},
    {"applied_at": None, "confirmed_at": None, "values": (0.5, None, 1e300)},
    [{"weight": 10, "wait": 30.0}, {"weight": 100, "wait": 0}],
    {"threshold": 2**70, "negative": -(2**64)},
    {"text": "lone \ud800 surrogate"},
    {"slot": Slot.BLUE, "slots": [Slot.BLUE]},
    {1: "one", "2": "two"},
    "",
    None,
]


@pytest.mark.parametrize("value", VALUES)
def test_a_json_column_gets_what_the_standard_library_writes(value: Any) -> None:
    assert json.loads(dump_json(value)) == json.loads(json.dumps(value))


@pytest.mark.parametrize(
    "value",
    [
        {"n": math.nan},
        [math.inf, None],
        {"n": -math.inf},
        {"applied_at": None, "deep": [1, {"at": None, "x": (2.5, math.nan)}]},
    ],
)
def test_what_is_not_json_is_written_as_the_standard_library_writes_it(value: Any) -> None:
    # (text PostgreSQL refuses: never silently null, as orjson would write it)
    assert dump_json(value) == json.dumps(value)


@pytest.mark.parametrize("value", [{"at": NOW}, {"raw": b"bytes"}, {"set": {1, 2}}])
def test_what_the_standard_library_refuses_is_refused(value: Any) -> None:
    with pytest.raises(TypeError):
        json.dumps(value)
    with pytest.raises(TypeError):
        dump_json(value)


# Texts a JSON column may hold, and what orjson alone would read otherwise or refuse: integers
# past 64 bits (orjson: a float), NaN and infinities, nesting deeper than orjson's limit.
TEXTS = [
    '{"threshold": 1180591620717411303424, "negative": -18446744073709551616}',
    '{"edge": 9223372036854775807, "below": -9223372036854775808, "u64": 18446744073709551615}',
    '{"ratio": 0.1, "tiny": 1e-7, "huge": 1.7976931348623157e308, "whole": 1.0, "n": 10}',
    '{"over": 1e400, "nan": NaN, "inf": -Infinity}',
    '{"text": "z\\u00f6 \\n \\"q\\"", "list": [null, true, false, ""], "empty": {}}',
    "[" * 600 + "]" * 600,
    '"just text"',
    "12",
]


def same(left: Any, right: Any) -> bool:
    """Equal, and of the same types throughout (1 and 1.0 are equal but not the same)."""
    return json.dumps(left, sort_keys=True) == json.dumps(right, sort_keys=True)


@pytest.mark.parametrize("text", TEXTS)
def test_a_json_column_reads_as_the_standard_library_reads_it(text: str) -> None:
    assert same(load_json(text), json.loads(text))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(JSON_VALUES)
def test_any_document_reads_back_as_the_standard_library_reads_it(value: Any) -> None:
    text = json.dumps(value)
    assert same(load_json(text), json.loads(text))


def test_what_is_not_json_is_refused() -> None:
    for text in ("", "{", "[1,]", "{'a': 1}"):
        with pytest.raises(json.JSONDecodeError):
            load_json(text)


async def test_a_stored_document_reads_back_whole(sessions: SessionFactory) -> None:
    # given a service whose policy holds a number past 64 bits and non-ASCII text
    policy = {"gates": [{"name": "errors", "threshold": 2**70}], "owner": "zoë", "ok": True}
    async with sessions() as session, session.begin():
        record = ServiceRecord(name="checkout", policy=policy, updated_at=NOW, updated_by="a")
        await rows.save(session, record)
    # when it is read back, then it is what was written
    async with sessions() as session:
        stored = await session.get(ServiceRecord, "checkout")
    assert stored is not None
    assert stored.policy == policy
