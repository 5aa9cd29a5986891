"""The outbox: PagerDuty alerts written in the transaction of the change that causes them.

Nothing here sends anything or commits: `enqueue` adds a row to the caller's transaction, so the
alert exists exactly when the rollback (or the router failure, or the success) that caused it is
committed, and a crash between that commit and the delivery loses nothing. The worker
(`opsapi.pagerduty.worker`) delivers the rows later, off the request and controller paths.

Routing keys are secrets: they live in the outbox row (the worker needs them) and in the
service's policy, and nowhere else — not in audit details, answers or logs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlmodel import col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from opsapi.canary.models import RolloutRecord, ServiceRecord
from opsapi.canary.policy import PagerDutyPolicy, Policy
from opsapi.errors import Unprocessable
from opsapi.pagerduty.models import OutboxKind, OutboxMessage, OutboxState
from opsapi.storage import rows

SOURCE = "opsapi"
SEVERITY = "critical"
# The traffic layer retries a failing router with back-off; this many failures in a row page.
ROUTER_FAILURES_TO_PAGE = 5
API_PREFIX = "/internal/ops"
_SUMMARY_LIMIT = 1024  # the Events API's limit for payload.summary
PAGES = (OutboxKind.TRIGGER.value, OutboxKind.RESOLVE.value)


def dedup_key(rollout_id: int | None) -> str:
    """The alert key of a rollout: stable, so PagerDuty folds repeats into one alert."""
    return f"opsapi-rollout-{rollout_id}"


def rollout_path(service: str) -> str:
    """Where the API shows the rollout."""
    return f"{API_PREFIX}/canary/{service}"


async def routing_key_of(session: AsyncSession, service: str) -> str | None:
    """The Events API routing key of the service's stored policy, if it has one."""
    record = await session.get(ServiceRecord, service)
    if record is None or not record.policy:
        return None
    settings = record.policy.get("pagerduty")
    if not isinstance(settings, Mapping):
        return None
    key = settings.get("routing_key")
    return key if isinstance(key, str) and key else None


async def enqueue(
    session: AsyncSession,
    *,
    kind: OutboxKind,
    cause: str,
    service: str,
    rollout_id: int | None,
    dedup_key: str,
    routing_key: str,
    payload: dict[str, Any],
    now: datetime,
) -> bool:
    """Add one alert to the caller's transaction (never commits).

    `cause` is unique: enqueueing the same cause again does nothing and returns False.
    """
    message = {"kind": kind.value, "cause": cause, "service": service, "rollout_id": rollout_id,
               "dedup_key": dedup_key, "routing_key": routing_key, "payload": payload}  # fmt: skip
    return cause in await insert_new(session, [message], now=now)


async def insert_new(
    session: AsyncSession, messages: Sequence[Mapping[str, Any]], *, now: datetime
) -> set[str]:
    """Add outbox rows (column -> value; pending, due `now`) to the caller's transaction in one
    plain statement (never commits); a row whose cause is already in the outbox is skipped.
    The causes added now."""
    added: set[str] = set()
    # A few rows a statement: bounded parameters, and few statement shapes to prepare.
    for start in range(0, len(messages), _ROWS_PER_STATEMENT):
        chunk = [
            new_row(message, now=now) for message in messages[start : start + _ROWS_PER_STATEMENT]
        ]
        insert = await pending_new(session, chunk)
        found, _ = await rows.fetch(session, insert.sql() + " RETURNING cause", *insert.values)
        added.update(row["cause"] for row in found)
    return added


def new_row(message: Mapping[str, Any], *, now: datetime) -> dict[str, Any]:
    """A new outbox row's columns: `message`'s (column -> value), pending and due `now`."""
    return {**_NEW, "next_attempt_at": now, "created_at": now, **message}


async def pending_new(session: AsyncSession, new_rows: Sequence[Mapping[str, Any]]) -> rows.Insert:
    """The INSERT of `new_rows` (`new_row`s), to carry with the other writes of their cause
    (nothing is written until it runs); a row whose cause is already in the outbox is skipped."""
    return await rows.pending_insert(session, OutboxMessage, new_rows, unique="cause")


# A new row's columns that callers do not give.
_NEW: dict[str, Any] = {"channel": None, "state": OutboxState.PENDING.value, "attempts": 0,
                        "last_error": None, "delivered_at": None}  # fmt: skip
_ROWS_PER_STATEMENT = 20


# What causes alerts ----------------------------------------------------------------------------


async def of_rollout(session: AsyncSession, rollout_id: int | None) -> list[OutboxMessage]:
    """The rollout's alerts and notifications (both live in the one outbox), oldest first."""
    sql = "SELECT * FROM outbox WHERE rollout_id = $1 ORDER BY id"
    return await rows.fetch_records(session, OutboxMessage, sql, rollout_id)


async def page_breach(
    session: AsyncSession,
    record: RolloutRecord,
    details: Mapping[str, Any],
    *,
    now: datetime,
) -> dict[str, Any]:
    """Enqueue the trigger of an automatic (gate breach) rollback whose audit `details` name
    the breach; return what the rollback's audit event should say about the page."""
    breach = details.get("breach")
    if not isinstance(breach, Mapping):
        return {}
    routing_key = await routing_key_of(session, record.service)
    if routing_key is None:
        return {"page": "no routing key"}
    key = dedup_key(record.id)
    summary = (
        f"{record.service}: canary {record.canary_version} rolled back by opsapi, gate "
        f"{breach.get('gate')} breached (value {breach.get('value')} vs threshold "
        f"{breach.get('threshold')})"
    )
    custom_details = {
        **_rollout_details(record),
        "reason": record.reason,
        "gate": breach.get("gate"),
        "value": breach.get("value"),
        "threshold": breach.get("threshold"),
        "failing_since": breach.get("failing_since"),
        "from_weight": details.get("from_weight"),
        "gates": [
            {key: gate.get(key) for key in ("name", "phase", "value", "threshold")}
            for gate in record.gates
        ],
    }
    await enqueue(
        session,
        kind=OutboxKind.TRIGGER,
        cause=f"breach:{record.id}",
        service=record.service,
        rollout_id=record.id,
        dedup_key=key,
        routing_key=routing_key,
        payload=_trigger_payload(summary, custom_details),
        now=now,
    )
    return {"page": "enqueued", "dedup_key": key}


async def page_router_failure(
    session: AsyncSession, record: RolloutRecord, *, error: str, weight: int, now: datetime
) -> bool:
    """Enqueue the (one) trigger of a rollout whose router keeps failing."""
    routing_key = await routing_key_of(session, record.service)
    if routing_key is None:
        return False
    router = record.router.get("name", "pull")
    summary = (
        f"{record.service}: router {router} failed {record.router_attempts} times applying "
        f"{weight}% for canary {record.canary_version}: {error}"
    )
    custom_details = {
        **_rollout_details(record),
        "reason": f"router {router} failing",
        "router": router,
        "error": error,
        "attempts": record.router_attempts,
        "weight": weight,
        "applied_weight": record.applied_weight,
    }
    return await enqueue(
        session,
        kind=OutboxKind.TRIGGER,
        cause=f"router-failure:{record.id}",
        service=record.service,
        rollout_id=record.id,
        dedup_key=dedup_key(record.id),
        routing_key=routing_key,
        payload=_trigger_payload(summary, custom_details),
        now=now,
    )


async def page_unconfirmed(
    session: AsyncSession, record: RolloutRecord, bound_seconds: float, *, now: datetime
) -> str:
    """Enqueue the (one) trigger of a rollback whose traffic is not confirmed at 0 in time."""
    routing_key = await routing_key_of(session, record.service)
    if routing_key is None:
        return "no routing key"
    router = record.router.get("name", "pull")
    summary = (
        f"{record.service}: rollback of canary {record.canary_version} not confirmed at 0% "
        f"within {bound_seconds:g}s (router {router}"
        + (f": {record.router_error}" if record.router_error else "")
        + "): users may still reach the canary"
    )
    custom_details = {**_rollout_details(record), "time_to_safe": record.time_to_safe,
                      "router": router, "router_error": record.router_error}  # fmt: skip
    created = await enqueue(
        session,
        kind=OutboxKind.TRIGGER,
        cause=f"unconfirmed:{record.id}",
        service=record.service,
        rollout_id=record.id,
        dedup_key=dedup_key(record.id),
        routing_key=routing_key,
        payload=_trigger_payload(summary, custom_details),
        now=now,
    )
    return "enqueued" if created else "already paged"


async def resolve_earlier(
    session: AsyncSession, record: RolloutRecord, *, now: datetime
) -> list[str]:
    """A rollout succeeded: resolve the alerts of the service's earlier rollouts still open.

    Each earlier triggered dedup key is resolved once, through the routing key it was
    triggered with. Returns the dedup keys resolved.
    """
    # Triggers whose dedup key is resolved already are left out: their resolve would be
    # skipped anyway, and over a service's life they grow without bound.
    sql = (
        "SELECT * FROM outbox t WHERE service = $1 AND kind = $2 AND rollout_id < $3 "
        "AND NOT EXISTS (SELECT 1 FROM outbox r WHERE r.cause = $4 || t.dedup_key) "
        "ORDER BY id"
    )
    triggers = await rows.fetch_records(
        session, OutboxMessage, sql, record.service, OutboxKind.TRIGGER.value, record.id or 0,
        _RESOLVE_CAUSE,
    )  # fmt: skip
    # Each dedup key once, through the routing key of its first trigger.
    first: dict[str, OutboxMessage] = {}
    for trigger in triggers:
        first.setdefault(trigger.dedup_key, trigger)
    created = await insert_new(
        session,
        [
            {"kind": OutboxKind.RESOLVE.value, "cause": _RESOLVE_CAUSE + key,
             "service": record.service, "rollout_id": trigger.rollout_id, "dedup_key": key,
             "routing_key": trigger.routing_key, "payload": {"resolved_by_rollout": record.id}}
            for key, trigger in first.items()
        ],
        now=now,
    )  # fmt: skip
    return [key for key in first if _RESOLVE_CAUSE + key in created]


# A resolve's cause: this prefix and the dedup key it resolves (one resolve per key).
_RESOLVE_CAUSE = "resolve:"


def _rollout_details(record: RolloutRecord) -> dict[str, Any]:
    return {
        "service": record.service,
        "rollout_id": record.id,
        "rollout": rollout_path(record.service),
        "canary_version": record.canary_version,
        "stable_version": record.stable_version,
        "state": record.state,
        "desired_weight": record.desired_weight,
    }


def _trigger_payload(summary: str, custom_details: dict[str, Any]) -> dict[str, Any]:
    return {
        "summary": summary[:_SUMMARY_LIMIT],
        "source": SOURCE,
        "severity": SEVERITY,
        "custom_details": custom_details,
    }


# What the API shows ------------------------------------------------------------------------------


async def alerts_for(session: AsyncSession, rollout_id: int | None) -> list[dict[str, Any]]:
    """The rollout's alerts and their delivery state (the rollout view's `alerts`)."""
    if rollout_id is None:
        return []
    rows = (
        await session.exec(
            select(OutboxMessage)
            .where(OutboxMessage.rollout_id == rollout_id, col(OutboxMessage.kind).in_(PAGES))
            .order_by(col(OutboxMessage.id))
        )
    ).all()
    return [alert_view(row) for row in rows]


def alert_view(row: OutboxMessage) -> dict[str, Any]:
    """One alert as the rollout view shows it (never its routing key)."""
    return {
        "kind": row.kind,
        "state": row.state,
        "attempts": row.attempts,
        "last_error": row.last_error,
        "dedup_key": row.dedup_key,
        "delivered_at": row.delivered_at.isoformat() if row.delivered_at else None,
    }


async def pending_count(session: AsyncSession) -> int:
    """How many alerts wait for delivery."""
    query = (
        select(func.count())
        .select_from(OutboxMessage)
        .where(OutboxMessage.state == OutboxState.PENDING.value, col(OutboxMessage.kind).in_(PAGES))
    )
    return int((await session.exec(query)).one())


# Routing keys in policy documents -------------------------------------------------------------

REDACTION_MARK = "…"


def redact_key(key: str) -> str:
    """What answers show of a routing key: its last 4 characters (nothing of a short one)."""
    return REDACTION_MARK + key[-4:] if len(key) > 8 else REDACTION_MARK


def redact_policy_document(document: dict[str, Any]) -> dict[str, Any]:
    """A policy document (as answered) with the routing key redacted."""
    settings = document.get("pagerduty")
    if not isinstance(settings, dict) or not settings.get("routing_key"):
        return document
    redacted = {**settings, "routing_key": redact_key(str(settings["routing_key"]))}
    return {**document, "pagerduty": redacted}


def keep_stored_routing_key(policy: Policy, stored: Policy) -> Policy:
    """A PUT that sends back the redacted key it read keeps the stored key.

    Any other value starting with the redaction mark is refused (422): storing it would
    silently break paging.
    """
    if policy.pagerduty is None or not policy.pagerduty.routing_key:
        return policy
    sent = policy.pagerduty.routing_key
    if not sent.startswith(REDACTION_MARK):
        return policy
    current = stored.pagerduty.routing_key if stored.pagerduty else None
    if current is None or sent != redact_key(current):
        message = "routing_key is a redacted value that does not match the stored key"
        raise Unprocessable(
            message, errors=[{"field": "pagerduty.routing_key", "message": message}]
        )
    settings = PagerDutyPolicy.model_validate(
        {**policy.pagerduty.model_dump(), "routing_key": current}
    )
    return policy.model_copy(update={"pagerduty": settings})


def mapped_services(
    records: Sequence[ServiceRecord], pagerduty_service_id: str
) -> list[tuple[str, PagerDutyPolicy]]:
    """The opsapi services whose policy maps `pagerduty_service_id`, by name."""
    found = []
    for record in records:
        settings = (record.policy or {}).get("pagerduty")
        if not isinstance(settings, dict):
            continue
        if pagerduty_service_id in (settings.get("service_ids") or []):
            found.append((record.name, PagerDutyPolicy.model_validate(settings)))
    return sorted(found, key=lambda item: item[0])
