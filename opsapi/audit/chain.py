"""The audit hash chain: each event's hash covers its canonical content and the previous hash.

Appends are serialised (a transaction-scoped PostgreSQL advisory lock, 724113002, taken with the
head read by `audit_append()` for one event, migration 0016, or `audit_chain_head()` for a batch,
migration 0015; SQLite serialises every write transaction),
so the chain never forks and follows the id order. An edit made behind the application's back
breaks the chain at that event, which `verify` reports.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection
from sqlmodel.ext.asyncio.session import AsyncSession

from opsapi.audit import values
from opsapi.audit.models import AuditEvent
from opsapi.storage import rows

GENESIS = "0" * 64
CHAINED_FIELDS = (
    "at", "actor", "roles", "source", "action", "service", "rollout_id", "outcome",
    "request_id", "client_address", "details",
)  # fmt: skip


def canonical(event: Mapping[str, Any]) -> bytes:
    """The bytes an event's hash covers: its fields as sorted, compact JSON."""
    # `event_row` never lets a lone surrogate through; one written behind the application's
    # back must make a hash mismatch, not a crash of the verification.
    return _canonical(event)[0].encode("utf-8", "surrogatepass")


def _canonical(event: Mapping[str, Any]) -> tuple[str, str]:
    """`canonical`'s text, and its details' part (the JSON the event's details column gets)."""
    fields = {name: event.get(name) for name in _OUTER_FIELDS}
    at = fields["at"]
    if isinstance(at, datetime):
        fields["at"] = at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    fields["roles"] = sorted(fields["roles"] or [])
    details = event.get("details") or {}
    if not isinstance(details, values.Encoded):  # read back, or not built by `event_row`
        details = _stored_form(details)
    details_text = values.canonical_text(details)
    outer = values.storable_text(fields)
    # The whole, sorted, has "details" just before "outcome"; the outer fields are flat (a
    # list of roles, no object), so `,"outcome":` occurs once, as that key: in JSON a quote
    # inside a string is always escaped.
    return outer.replace(',"outcome":', f',"details":{details_text},"outcome":', 1), details_text


# Bound in this order, then the details (audit_append takes them last).
_OUTER_FIELDS = CHAINED_FIELDS[:-1]


def _stored_form(value: Any) -> Any:
    # Kept for events written by earlier versions, which hashed a whole float written in
    # exponent form (1e+16) as int(float). `event_row` now stores such a number as the exact
    # integer it denotes, so new events never reach this branch.
    if isinstance(value, float) and value.is_integer() and "e" in repr(value):
        return int(value)
    if isinstance(value, dict):
        return {key: _stored_form(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_stored_form(item) for item in value]
    return value


def link(prev_hash: str, event: Mapping[str, Any]) -> str:
    """The hash of `event` chained after `prev_hash`."""
    return hashlib.sha256(prev_hash.encode() + b"\n" + canonical(event)).hexdigest()


# Before `event_row` made numbers storable, an event whose details held a float such as 1e23
# or -0.0 was hashed as Python had it, while PostgreSQL kept 10**23 or 0.0: its stored hash
# never matched what verify reads back. Those numbers are recognisable, so such an event can
# still be checked: put back what was hashed and compare again.
_LEGACY_TRIES = 8  # ambiguous numbers in one event, tried in every combination


def legacy_link(prev_hash: str, event: Mapping[str, Any], stored_hash: str) -> bool:
    """Whether `event` (as read back) matches `stored_hash` once the numbers an earlier version
    hashed in their Python form are put back in that form."""
    details = event.get("details")
    if not isinstance(details, dict):
        return False
    spots: list[_Spot] = []
    copy = _collect(details, spots)
    if not spots:
        return False
    # Each ambiguous number may have been either form: try every combination of a few, or
    # all of them at once when there are many.
    every = 2 ** len(spots) - 1
    for choice in range(1, every + 1) if len(spots) <= _LEGACY_TRIES else [every]:
        for index, (container, key, stored, alternative) in enumerate(spots):
            container[key] = alternative if choice >> index & 1 else stored
        if link(prev_hash, {**event, "details": copy}) == stored_hash:
            return True
    return False


_Spot = tuple[Any, Any, Any, Any]  # container, key, stored value, value an earlier version hashed


def _collect(value: Any, spots: list[_Spot]) -> Any:
    """A copy of `value`, noting each number an earlier version may have hashed otherwise."""
    if isinstance(value, dict):
        mapping: dict[str, Any] = {}
        for key, item in value.items():
            mapping[key] = _collect(item, spots)
            _note(mapping, key, item, spots)
        return mapping
    if isinstance(value, list):
        items: list[Any] = []
        for index, item in enumerate(value):
            items.append(_collect(item, spots))
            _note(items, index, item, spots)
        return items
    return value


def _note(container: Any, key: Any, item: Any, spots: list[_Spot]) -> None:
    if isinstance(item, float) and item == 0:
        spots.append((container, key, item, -0.0))
    elif isinstance(item, int) and not isinstance(item, bool) and abs(item) >= 10**16:
        try:
            as_float = float(item)
        except OverflowError:
            return
        written = repr(as_float)
        # Exactly the decimal Python writes for a float with an exponent: the earlier version
        # hashed int(float) instead (1e23 was hashed as 99999999999999991611392).
        if "e+" in written and int(Decimal(written)) == item and int(as_float) != item:
            spots.append((container, key, item, int(as_float)))


async def append(
    target: AsyncConnection | AsyncSession,
    events: Sequence[dict[str, Any]],
    *,
    alongside: Sequence[rows.Pending] = (),
) -> None:
    """Insert `events` (event_row dicts) at the end of the chain, in the caller's transaction;
    `alongside`, the writes of the change they record, are made in the same statement when
    that can be done (PostgreSQL, one event), else just before."""
    if not events:
        await rows.run_together(target, alongside)
        return
    postgresql = await rows.dialect_name(target) == "postgresql"
    if postgresql and len(events) == 1:
        # Lock, head read, hash and insert in one round trip (migration 0016); the hash is
        # `link`'s, over the canonical bytes computed here as verify computes them.
        (event,) = events
        text, details = _canonical(event)
        # The details column gets the JSON the hash covers (the same value once parsed).
        parameters = await rows.bound(target, AuditEvent, event, _OUTER_FIELDS)
        parameters += [details, text.encode("utf-8", "surrogatepass")]
        # The change and its event in one round trip (the chain's lock is still taken by
        # audit_append).
        with_clause = rows.carried(alongside, len(parameters) + 1)
        if with_clause is not None:
            prefix, values = with_clause
            await rows.execute_last(target, prefix + _APPEND, *parameters, *values)
            return
    await rows.run_together(target, alongside)
    if postgresql:
        # The append lock, held until the transaction ends (the next appender reads our last
        # hash), then the head read after it, in one round trip (migration 0015).
        found, _ = await rows.fetch(target, "SELECT audit_chain_head() AS hash")
    else:
        found, _ = await rows.fetch(target, "SELECT hash FROM audit_event ORDER BY id DESC LIMIT 1")
    previous = (found[0]["hash"] if found else None) or GENESIS
    chained = []
    for event in events:
        digest = link(previous, event)
        chained.append({**event, "prev_hash": previous, "hash": digest})
        previous = digest
    await rows.insert(target, AuditEvent, chained)


_APPEND = "SELECT audit_append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
