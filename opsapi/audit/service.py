"""Writing audit events. `record()` adds to the caller's transaction and never commits."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from sqlmodel.ext.asyncio.session import AsyncSession

from opsapi.audit import chain
from opsapi.audit.models import Outcome, Source

# Keys whose values never reach the audit log, whatever the caller passes.
_SECRET_KEY = re.compile(r"(secret|token|password|signature|authorization|routing_key)", re.I)
REDACTED = "[redacted]"


def redact(value: Any) -> Any:
    """A copy of `value` with secret-looking keys replaced by a marker."""
    if isinstance(value, Mapping):
        return {
            str(key): REDACTED if _SECRET_KEY.search(str(key)) else redact(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    return value


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
    """The column values of one audit event, secrets redacted."""
    return {
        "at": at,
        "actor": actor[:255],
        "roles": sorted(roles),
        "source": source.value,
        "action": action,
        "service": service,
        "rollout_id": rollout_id,
        "outcome": outcome.value,
        "request_id": request_id,
        "client_address": client_address,
        "details": redact(dict(details or {})),
    }


async def record(*, session: AsyncSession, **fields: Any) -> None:
    """Append one audit event (`event_row` fields) in the session's transaction; no commit."""
    await chain.append(session, [event_row(**fields)])
