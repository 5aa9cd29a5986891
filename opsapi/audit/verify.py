"""Verifying the audit hash chain: walk it in id order and recompute every link.

An event edited behind the application's back no longer matches its own hash ("hash
mismatch" at that event). A deleted or inserted event breaks the next event's link to its
predecessor ("prev_hash mismatch" at the next event). What the walk cannot see: the newest
events removed from the end, or the whole chain recomputed by someone able to write the
table; only a copy of `last_hash` kept elsewhere (an anchor) catches those.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from opsapi.audit.chain import GENESIS, link
from opsapi.audit.query import AUDIT, COLUMNS
from opsapi.errors import Unprocessable

# Decoding and hashing are CPU work on the event loop (~30 µs an event): modest batches, and a
# pause every few milliseconds, keep other requests' latency flat during a long walk.
_SLICE = 200


async def verify_chain(
    engine: AsyncEngine, *, since_id: int | None = None, batch_size: int = 2000
) -> dict[str, Any]:
    """The verification report of the chain (from event `since_id` on, when given).

    Events committed after the walk started are left for the next run. Each batch is read in
    its own short transaction, so a long walk holds no snapshot and no lock.
    """
    columns = [AUDIT.c[name] for name in COLUMNS]
    since_hash: str | None = None
    async with engine.connect() as connection:
        last_id = int(await connection.scalar(sa.select(sa.func.max(AUDIT.c.id))) or 0)
        if since_id is not None:
            since_hash = await connection.scalar(
                sa.select(AUDIT.c.hash).where(AUDIT.c.id == since_id)
            )
            if since_hash is None:
                raise Unprocessable(f"there is no audit event with id {since_id}")
    # From an anchor event, its own predecessor is taken on trust: the caller compares the
    # `since_hash` we answer with the copy it kept.
    expected_prev: str | None = None if since_id is not None else GENESIS
    checked = 0
    last: Mapping[Any, Any] | None = None
    cursor = since_id - 1 if since_id is not None else 0
    while cursor < last_id:
        async with engine.connect() as connection:
            result = await connection.execute(
                sa.select(*columns)
                .where(AUDIT.c.id > cursor, AUDIT.c.id <= last_id)
                .order_by(AUDIT.c.id)
                .limit(batch_size)
            )
            rows = [row._mapping for row in result]
        if not rows:
            break
        for start in range(0, len(rows), _SLICE):
            for event in rows[start : start + _SLICE]:
                checked += 1
                broken = _check(event, expected_prev)
                if broken is not None:
                    return {"intact": False, "events_checked": checked, "first_broken": broken}
                expected_prev = event["hash"]
                last = event
            await asyncio.sleep(0)
        cursor = rows[-1]["id"]
    report: dict[str, Any] = {
        "intact": True,
        "events": checked,
        "last_id": last["id"] if last else None,
        "last_hash": last["hash"] if last else None,
    }
    if since_id is not None:
        report["since_id"] = since_id
        report["since_hash"] = since_hash
    return report


def _check(event: Mapping[Any, Any], expected_prev: str | None) -> dict[str, Any] | None:
    if expected_prev is not None and event["prev_hash"] != expected_prev:
        return {
            "id": event["id"],
            "reason": "prev_hash mismatch",
            "expected": expected_prev,
            "found": event["prev_hash"],
        }
    recomputed = link(event["prev_hash"], event)
    if event["hash"] != recomputed:
        return {"id": event["id"], "reason": "hash mismatch", "expected": recomputed,
                "found": event["hash"]}  # fmt: skip
    return None
