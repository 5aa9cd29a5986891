"""Writing audit events. `record()` adds to the caller's transaction and never commits."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlmodel.ext.asyncio.session import AsyncSession

from opsapi.audit import chain, values
from opsapi.audit.models import Outcome, Source
from opsapi.storage import rows

# Keys whose values never reach the audit log, whatever the caller passes.
_SECRET_KEY = re.compile(r"(secret|token|password|signature|authorization|routing_key)", re.I)
REDACTED = "[redacted]"
_INT32 = range(-(2**31), 2**31)  # rollout_id is a 32-bit integer on PostgreSQL


def redact(value: Any) -> Any:
    """A copy of `value` with secret-looking keys replaced by a marker."""
    if value is None or isinstance(value, str | int | float):
        return value  # a leaf (most values): no abstract-class check
    if isinstance(value, Mapping):
        return {
            str(key): REDACTED if _is_secret(str(key)) else redact(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    return value


@functools.lru_cache(maxsize=4096)
def _is_secret(key: str) -> bool:
    # Cached: the same few keys come back in every event.
    return _SECRET_KEY.search(key) is not None


def event_row(
    *,
    at: datetime,
    actor: str,
    source: Source,
    action: str,
    outcome: Outcome,
    roles: Iterable[str] = (),
    service: str | None = None,
    rollout_id: int | None = None,
    request_id: str | None = None,
    client_address: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The column values of one audit event: secrets redacted, every value storable
    (`audit.values`), details bounded (4 KiB; 128 KiB for a success)."""
    kept: dict[str, Any] = redact(values.storable(dict(details or {})))
    if rollout_id is not None and rollout_id not in _INT32:
        kept.setdefault("rollout_id", values.storable(rollout_id))
        rollout_id = None
    budget = values.SUCCESS_BUDGET if outcome is Outcome.SUCCESS else values.DETAILS_BUDGET
    return {
        "at": at,
        "actor": values.column_text(actor, 255),
        "roles": sorted(values.text(str(role))[:64] for role in roles),
        "source": values.column_text(source.value, 16),
        "action": values.column_text(action, 64),
        "service": values.column_text(service, 63),
        "rollout_id": rollout_id,
        "outcome": values.column_text(outcome.value, 16),
        "request_id": values.column_text(request_id, 64),
        "client_address": values.column_text(client_address, 64),
        "details": values.bound(kept, budget),
    }


async def record(
    *, session: AsyncSession, alongside: Sequence[rows.Pending] = (), **fields: Any
) -> None:
    """Append one audit event (`event_row` fields) in the session's transaction; no commit.
    `alongside`: the pending writes of the change it records (one round trip for all)."""
    await chain.append(session, [event_row(**fields)], alongside=alongside)
