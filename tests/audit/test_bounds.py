"""A caller cannot grow the append-only table without bound: what an event keeps from input
is bounded (4 KiB of details for refusals), with the size and sha256 of what was cut."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.audit.test_review_api import audit_get
from tests.support.app import Harness, running_app

BUDGET = 4096


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256(value: Any) -> str:
    return hashlib.sha256(canonical(value)).hexdigest()


async def verify(api: Harness) -> dict[str, Any]:
    response = await audit_get(api, "/audit/verify")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


# Refused /execute params a viewer can send inside the 64 KB body limit.
LARGE_PARAMS = [
    pytest.param({"service": "checkout", "blob": "A" * 60_000}, id="one-large-string"),
    pytest.param({f"k{i:05d}": i for i in range(4000)}, id="many-small-keys"),
    pytest.param({"service": "checkout", "list": list(range(12_000))}, id="long-list"),
    pytest.param({"x" * 30_000: 1, "y": "é" * 10_000}, id="huge-key-and-unicode"),
    pytest.param({"a": {"b": {"c": {"d": "Z" * 50_000}}}}, id="nested"),
]


@pytest.mark.parametrize("params", LARGE_PARAMS)
async def test_a_refused_call_keeps_a_bounded_matchable_record(
    api_any_db: Harness, params: dict[str, Any]
) -> None:
    # given a viewer sending large params to an operation that refuses them
    response = await api_any_db.post(
        "/execute", {"operation": "health-check", "params": params}, role="viewer"
    )
    assert response.status_code == 422

    # then its audit event keeps at most 4 KiB of details
    [event] = await api_any_db.audit_events(action="execute.health-check")
    assert len(canonical(event.details)) <= BUDGET
    # and says what was cut: the size and sha256 of the whole details, which can be matched
    summary = event.details["_truncated"]
    assert summary["bytes"] > BUDGET
    assert summary["budget"] == BUDGET
    assert event.details["status"] == 422
    assert event.details["detail"] == "invalid parameters for health-check"
    # and the chain still verifies
    assert (await verify(api_any_db))["intact"] is True


async def test_a_cut_value_can_be_matched_against_the_request(api: Harness) -> None:
    # given a refused call whose params hold one large value among small ones
    params = {"service": "checkout", "note": "small", "blob": "A" * 60_000}
    await api.post("/execute", {"operation": "health-check", "params": params}, role="viewer")

    # then the small params are kept whole, the large one is a marker a reviewer can match
    [event] = await api.audit_events(action="execute.health-check")
    kept = event.details["params"]
    assert (kept["service"], kept["note"]) == ("checkout", "small")
    assert kept["blob"] == {
        "_cut": True,
        "bytes": len(canonical(params["blob"])),
        "sha256": sha256(params["blob"]),
        "head": kept["blob"]["head"],
    }
    assert kept["blob"]["head"].startswith('"AAAA')
    assert event.details["_truncated"]["cut"] == ["params.blob"]


async def test_an_authorised_change_is_kept_whole(api: Harness) -> None:
    # given an admin policy of about 20 KB (long gate queries), well past the refusal budget
    query = 'sum(rate(http_requests_total{service="{service}"}[5m]))' + " + 0" * 400
    gates = [{"name": f"g{i}", "query": query, "op": ">", "threshold": i} for i in range(10)]
    response = await api.put("/services/payments", {"gates": gates})
    assert response.status_code == 200, response.text

    # then its audit event keeps the whole before/after
    [event] = await api.audit_events(action="service.put")
    assert "_truncated" not in event.details
    assert [g["query"] for g in event.details["after"]["gates"]] == [query] * 10


@pytest.fixture
async def unlimited(pg_url: str, key_file: Path) -> AsyncIterator[Harness]:
    """The app with the per-caller refusal limit out of the way: every refusal is its own row."""
    async with running_app(pg_url, key_file, audit_refusals_per_minute=1000) as harness:
        yield harness


async def test_refused_calls_grow_the_table_by_a_bounded_amount(unlimited: Harness) -> None:
    api = unlimited

    # given the table's size, then 100 refused calls of 60 KB each
    async def table_bytes() -> int:
        async with api.runtime.engine.connect() as connection:
            await connection.execute(sa.text("ANALYZE audit_event"))
            size = await connection.scalar(sa.text("SELECT pg_total_relation_size('audit_event')"))
        return int(size)

    before = await table_bytes()
    for _ in range(100):
        blob = base64.b64encode(os.urandom(45_000)).decode()  # 60,000 characters, incompressible
        await api.post("/execute", {"operation": "health-check", "params": {"blob": blob}},
                       role="viewer")  # fmt: skip

    # then the table grew by less than 10 KB an event (it was 60 KB+ an event)
    assert len(await api.audit_events()) == 100
    assert (await table_bytes() - before) / 100 < 10_000
