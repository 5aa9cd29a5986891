"""Verifying the audit hash chain: walk it in id order and recompute every link.

Once events have been archived (`opsapi audit archive`), the walk starts from the latest
checkpoint: the first event after it must follow the checkpoint's hash, and every checkpoint
must carry a valid signature and continue the one before it. The archived events themselves are
verified offline, in their archive files (`opsapi audit verify-archive`).

An event edited behind the application's back no longer matches its own hash ("hash
mismatch" at that event). A deleted or inserted event breaks the next event's link to its
predecessor ("prev_hash mismatch" at the next event). Every row is walked, whatever its id
(one inserted with id 0 or -5 is checked first). What the walk alone cannot see: the newest
events removed from the end, or the whole chain recomputed by someone able to write the
table. The chain's head (`head`: newest id and hash) is published for that: a copy kept
elsewhere and passed back as `expect_head` says whether that event is still in the chain,
at that id, with that hash.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from opsapi.audit.chain import GENESIS, legacy_link, link
from opsapi.audit.checkpoint import chain_problem, latest_checkpoint, read_checkpoints
from opsapi.audit.query import AUDIT, COLUMNS
from opsapi.errors import Unprocessable
from opsapi.metrics import Metrics

# Decoding and hashing are CPU work on the event loop (~30 µs an event): modest batches, and a
# pause every few milliseconds, keep other requests' latency flat during a long walk.
_SLICE = 200


@dataclass(frozen=True)
class Head:
    """The newest event of the chain: its id and hash."""

    id: int
    hash: str

    def as_dict(self) -> dict[str, Any]:
        """`{"id", "hash"}`, as answers show it."""
        return {"id": self.id, "hash": self.hash}


async def chain_head(source: AsyncEngine | AsyncConnection) -> Head | None:
    """The newest event (highest id), or None for an empty log."""
    query = sa.select(AUDIT.c.id, AUDIT.c.hash).order_by(AUDIT.c.id.desc()).limit(1)
    if isinstance(source, AsyncEngine):
        async with source.connect() as connection:
            row = (await connection.execute(query)).first()
    else:
        row = (await source.execute(query)).first()
    return None if row is None else Head(int(row[0]), str(row[1]))


async def publish_head(engine: AsyncEngine, metrics: Metrics) -> Head | None:
    """Set `opsapi_audit_head_id` from the database (one index lookup); the head read."""
    head = await chain_head(engine)
    metrics.audit_head_id.set(head.id if head else 0)
    return head


async def verify_chain(
    engine: AsyncEngine,
    *,
    since_id: int | None = None,
    expect_head: Head | None = None,
    batch_size: int = 2000,
) -> dict[str, Any]:
    """The verification report of the chain: from the latest checkpoint on (the first event
    after it must follow its hash), or from event `since_id` on, when given.

    Events committed after the walk started are left for the next run. Each batch is read in
    its own short transaction, so a long walk holds no snapshot and no lock.
    """
    for _ in range(_RESTARTS):
        report, restart = await _verify_once(engine, since_id, expect_head, batch_size)
        if not restart:
            break
    return report


# An archive that removes events while a walk runs makes a gap the walk did not expect; the
# walk then starts again from the checkpoint that now covers the gap (a few times at most).
_RESTARTS = 3


async def _verify_once(
    engine: AsyncEngine, since_id: int | None, expect_head: Head | None, batch_size: int
) -> tuple[dict[str, Any], bool]:
    """(the report, whether a checkpoint recorded during the walk explains its break)."""
    columns = [AUDIT.c[name] for name in COLUMNS]
    since_hash: str | None = None
    expected_found: str | None = None
    async with engine.connect() as connection:
        head = await chain_head(connection)
        checkpoints = await read_checkpoints(connection)
        latest = checkpoints[-1] if checkpoints else None
        if since_id is not None:
            since_hash = await _hash_of(connection, since_id)
            if since_hash is None:
                archived = latest is not None and since_id <= latest.last_id
                raise Unprocessable(
                    f"there is no audit event with id {since_id}"
                    + (f" (archived: checkpoint {latest.id})" if archived and latest else "")
                )
        if expect_head is not None:
            if since_id is not None and expect_head.id < since_id:
                raise Unprocessable(
                    "expect_head must not be before since_id: the walk must reach it"
                )
            expected_found = await _hash_of(connection, expect_head.id)
        pending = 0
        if latest is not None:
            pending = int(
                await connection.scalar(
                    sa.select(sa.func.count()).where(AUDIT.c.id <= latest.last_id)
                )
                or 0
            )
    # From an anchor event, its own predecessor is taken on trust: the caller compares the
    # `since_hash` we answer with the copy it kept. From a checkpoint, the first event after
    # it must follow the checkpoint's hash.
    expected_prev: str | None = GENESIS
    after: int | None = None
    if since_id is not None:
        expected_prev, after = None, since_id - 1
    elif latest is not None:
        expected_prev, after = latest.last_hash, latest.last_id
    checked = 0
    legacy = 0
    last: Mapping[Any, Any] | None = None
    broken = chain_problem(checkpoints)
    while head is not None and broken is None:
        query = sa.select(*columns).where(AUDIT.c.id <= head.id)
        if after is not None:
            query = query.where(AUDIT.c.id > after)
        async with engine.connect() as connection:
            result = await connection.execute(query.order_by(AUDIT.c.id).limit(batch_size))
            rows = [row._mapping for row in result]
        if not rows:
            break
        for start in range(0, len(rows), _SLICE):
            for event in rows[start : start + _SLICE]:
                checked += 1
                broken, was_legacy = _check(event, expected_prev)
                if broken is not None:
                    break
                legacy += was_legacy
                expected_prev = event["hash"]
                last = event
            if broken is not None:
                break
            await asyncio.sleep(0)
        after = rows[-1]["id"]
    if broken is not None and broken["reason"] == "prev_hash mismatch":
        async with engine.connect() as connection:
            now_latest = await latest_checkpoint(connection)
        if now_latest is not None and (latest is None or now_latest.last_id > latest.last_id):
            return {}, True
    expected_archived = (
        expect_head is not None
        and expected_found is None
        and latest is not None
        and expect_head.id <= latest.last_id
    )
    if expect_head is not None and latest is not None and expect_head.id == latest.last_id:
        # The checkpoint keeps the hash of its last event after the event itself is gone.
        expected_found = expected_found or latest.last_hash
        expected_archived = False
    if (
        broken is None
        and expect_head is not None
        and not expected_archived
        and expected_found != expect_head.hash
    ):
        broken = {
            "id": expect_head.id,
            "reason": f"expected head {'missing' if expected_found is None else 'differs'}",
            "expected": expect_head.hash,
            "found": expected_found,
        }
    report: dict[str, Any]
    if broken is None:
        report = {
            "intact": True,
            "events": checked,
            "last_id": last["id"] if last else None,
            "last_hash": last["hash"] if last else None,
        }
    else:
        report = {"intact": False, "events_checked": checked, "first_broken": broken}
    report["head"] = head.as_dict() if head else None
    if latest is not None:
        report["checkpoint"] = latest.summary()
        report["checkpoints"] = len(checkpoints)
        if pending:
            report["pending_removal"] = pending
    if legacy:
        report["legacy_number_events"] = legacy
    if since_id is not None:
        report["since_id"] = since_id
        report["since_hash"] = since_hash
    if expect_head is not None:
        report["expected_head"] = {
            **expect_head.as_dict(),
            "found": expected_found,
            "matches": None if expected_archived else expected_found == expect_head.hash,
        }
        if expected_archived and latest is not None:
            # Only the archive still holds that event: `opsapi audit verify-archive
            # --expect-head` checks it there.
            report["expected_head"]["archived"] = True
    return report, False


async def _hash_of(connection: AsyncConnection, event_id: int) -> str | None:
    value = await connection.scalar(sa.select(AUDIT.c.hash).where(AUDIT.c.id == event_id))
    return None if value is None else str(value)


def _check(
    event: Mapping[Any, Any], expected_prev: str | None
) -> tuple[dict[str, Any] | None, bool]:
    """(the break at `event`, or None; whether it matched only in its legacy reading)."""
    if expected_prev is not None and event["prev_hash"] != expected_prev:
        return {
            "id": event["id"],
            "reason": "prev_hash mismatch",
            "expected": expected_prev,
            "found": event["prev_hash"],
        }, False
    recomputed = link(event["prev_hash"], event)
    if event["hash"] == recomputed:
        return None, False
    if legacy_link(event["prev_hash"], event, event["hash"]):
        return None, True
    return {"id": event["id"], "reason": "hash mismatch", "expected": recomputed,
            "found": event["hash"]}, False  # fmt: skip
