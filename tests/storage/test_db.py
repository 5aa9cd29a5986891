"""The engine's JSON columns: written fast, and exactly as the standard library writes them."""

from __future__ import annotations

import enum
import json
import math
from datetime import UTC, datetime
from typing import Any

import pytest

from opsapi.canary.models import ServiceRecord
from opsapi.storage import rows
from opsapi.storage.db import SessionFactory, dump_json

NOW = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


class Slot(enum.StrEnum):
    BLUE = "blue"


# What JSON columns hold (policies, routers, steps, gates), and what orjson alone would refuse
# or write otherwise: integers past 64 bits, a lone surrogate, an enum, non-string keys.
VALUES: list[Any] = [
    {"name": "pull", "nested": {"a": [1, None, "ü", 1.5, True]}},
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


@pytest.mark.parametrize("value", [{"n": math.nan}, [math.inf, None], {"n": -math.inf}])
def test_what_is_not_json_is_written_as_the_standard_library_writes_it(value: Any) -> None:
    # (text PostgreSQL refuses: never silently null, as orjson would write it)
    assert dump_json(value) == json.dumps(value)


@pytest.mark.parametrize("value", [{"at": NOW}, {"raw": b"bytes"}, {"set": {1, 2}}])
def test_what_the_standard_library_refuses_is_refused(value: Any) -> None:
    with pytest.raises(TypeError):
        json.dumps(value)
    with pytest.raises(TypeError):
        dump_json(value)


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
