"""Notifications in the outbox: written in the transaction of their transition, delivered later
by the outbox worker (`opsapi.pagerduty.worker`), never by the caller.

`enqueue` adds one row per channel whose rule hears the event and never commits: the
notification exists exactly when the transition does, a rolled-back transaction leaves none, and
a crash after the commit loses none. A row names its channel only; the channel's URL and secret
stay in the channels file and are read by the worker at delivery.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from datetime import datetime
from typing import Any

from sqlmodel import col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from opsapi.notifications.messages import Message
from opsapi.notifications.rules import NotifyRule, channels_for
from opsapi.pagerduty.models import OutboxKind, OutboxMessage, OutboxState
from opsapi.pagerduty.outbox import insert_new, new_row

# The outbox's unique `cause` is "notify:<channel>:<cause>" (at most 255 characters).
CAUSE_LIMIT = 180


def row_cause(cause: str, channel: str) -> str:
    """The outbox cause of one channel's notification of a transition."""
    return f"notify:{channel}:{cause}"


async def enqueue(
    session: AsyncSession,
    *,
    rules: Iterable[NotifyRule],
    message: Message,
    cause: str,
    now: datetime,
) -> list[str]:
    """Add the notifications of `message` to the caller's transaction (never commits).

    One row per channel whose rule hears `message.event`; `cause` names the transition uniquely
    (e.g. "rollout:42:promoted:3"), so enqueueing the same cause again adds nothing. Returns the
    channels enqueued now. A channel missing from the channels file is enqueued all the same:
    its delivery fails visibly instead of the notification vanishing.
    """
    new = notices(rules=rules, message=message, cause=cause, now=now)
    if not new:
        return []
    created = await insert_new(session, new, now=now)
    return [row["channel"] for row in new if row["cause"] in created]


def notices(
    *,
    rules: Iterable[NotifyRule],
    message: Message,
    cause: str,
    now: datetime,
    enqueued: Container[str] = (),
) -> list[dict[str, Any]]:
    """The outbox rows (`pagerduty.outbox.new_row`s) of `message`'s notifications: one per
    channel whose rule hears its event, except a channel whose row for `cause` is among the
    causes `enqueued` already. Written by `enqueue`, or carried with the transition's other
    writes (`pagerduty.outbox.pending_new`)."""
    if not cause or len(cause) > CAUSE_LIMIT:
        raise ValueError(f"cause must be 1 to {CAUSE_LIMIT} characters")
    channels = channels_for(rules, message.event)
    if not channels:
        return []
    payload = {"message": message.as_dict()}
    return [
        new_row({"kind": OutboxKind.NOTIFICATION.value, "cause": row_cause(cause, channel),
                 "service": message.service, "rollout_id": message.rollout_id,
                 "channel": channel, "dedup_key": cause, "routing_key": "", "payload": payload},
                now=now)
        for channel in channels
        if row_cause(cause, channel) not in enqueued
    ]  # fmt: skip


async def deliveries_for(session: AsyncSession, rollout_id: int | None) -> list[dict[str, Any]]:
    """The rollout's notifications and their delivery state (for the rollout view).

    Channel names only: a channel's URL is never shown.
    """
    if rollout_id is None:
        return []
    found = (
        await session.exec(
            select(OutboxMessage)
            .where(
                OutboxMessage.rollout_id == rollout_id,
                OutboxMessage.kind == OutboxKind.NOTIFICATION.value,
            )
            .order_by(col(OutboxMessage.id))
        )
    ).all()
    return [delivery_view(row) for row in found]


def delivery_view(row: OutboxMessage) -> dict[str, Any]:
    """One notification as the rollout view shows it (the channel's name, never its URL)."""
    return {
        "channel": row.channel,
        "event": (row.payload.get("message") or {}).get("event"),
        "state": row.state,
        "attempts": row.attempts,
        "last_error": row.last_error,
        "created_at": row.created_at.isoformat(),
        "delivered_at": row.delivered_at.isoformat() if row.delivered_at else None,
    }


async def pending_count(session: AsyncSession) -> int:
    """How many notifications wait for delivery."""
    query = (
        select(func.count())
        .select_from(OutboxMessage)
        .where(
            OutboxMessage.state == OutboxState.PENDING.value,
            OutboxMessage.kind == OutboxKind.NOTIFICATION.value,
        )
    )
    return int((await session.exec(query)).one())
