"""The audit hash chain: each event's hash covers its canonical content and the previous hash.

Appends are serialised (a transaction-scoped PostgreSQL advisory lock; SQLite serialises every
write transaction anyway), so the chain never forks and follows the id order. An edit made
behind the application's back breaks the chain at that event, which `verify` reports.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlmodel.ext.asyncio.session import AsyncSession

from opsapi.audit.models import AuditEvent

GENESIS = "0" * 64
_APPEND_LOCK = 724_113_002
CHAINED_FIELDS = (
    "at", "actor", "roles", "source", "action", "service", "rollout_id", "outcome",
    "request_id", "client_address", "details",
)  # fmt: skip


def canonical(event: Mapping[str, Any]) -> bytes:
    """The bytes an event's hash covers: its fields as sorted, compact JSON."""
    fields = {name: event.get(name) for name in CHAINED_FIELDS}
    at = fields["at"]
    if isinstance(at, datetime):
        fields["at"] = at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    fields["roles"] = sorted(fields["roles"] or [])
    fields["details"] = _stored_form(fields["details"] or {})
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _stored_form(value: Any) -> Any:
    # A whole float that JSON writes in exponent form (1e+16) comes back from PostgreSQL's jsonb
    # as an integer: hash what the database will give back, not what Python wrote.
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


async def append(target: AsyncConnection | AsyncSession, rows: Sequence[dict[str, Any]]) -> None:
    """Insert `rows` (event_row dicts) at the end of the chain, in the caller's transaction."""
    if not rows:
        return
    connection = await target.connection() if isinstance(target, AsyncSession) else target
    if connection.dialect.name == "postgresql":
        # Held until the transaction ends: the next appender reads our last hash.
        await connection.execute(text(f"SELECT pg_advisory_xact_lock({_APPEND_LOCK})"))
    result = await connection.execute(text("SELECT hash FROM audit_event ORDER BY id DESC LIMIT 1"))
    previous = result.scalar() or GENESIS
    chained = []
    for row in rows:
        digest = link(previous, row)
        chained.append({**row, "prev_hash": previous, "hash": digest})
        previous = digest
    await connection.execute(insert(AuditEvent), chained)
