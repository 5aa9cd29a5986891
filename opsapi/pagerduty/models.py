"""Tables of the outbox (PagerDuty alerts and notifications) and of the PagerDuty webhook events
already processed."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from opsapi.storage.types import JSONDocument, UTCDateTime


class OutboxState(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class OutboxKind(enum.StrEnum):
    TRIGGER = "pagerduty.trigger"
    RESOLVE = "pagerduty.resolve"
    # A rollout event told to a notification channel (opsapi.notifications).
    NOTIFICATION = "notification"


class OutboxMessage(SQLModel, table=True):
    """One alert or notification to deliver, written in the same transaction as its cause.

    PagerDuty rows carry a dedup and a routing key; notification rows carry the channel's name
    (its URL stays in the channels file), an empty routing key, and the transition's cause as
    dedup key.
    """

    __tablename__ = "outbox"
    __table_args__ = (
        # What the worker claims: pending rows, the most overdue first.
        sa.Index(
            "ix_outbox_due",
            "next_attempt_at",
            postgresql_where=sa.text("state = 'pending'"),
            sqlite_where=sa.text("state = 'pending'"),
        ),
        sa.Index("ix_outbox_rollout", "rollout_id", "id"),
        sa.Index("ix_outbox_service_kind", "service", "kind", "id"),
        sa.Index("ix_outbox_dedup_key", "dedup_key", "id"),
        # One row per cause: the same cause never enqueues twice (e.g. "router-failure:12").
        sa.Index("uq_outbox_cause", "cause", unique=True),
    )

    id: int | None = Field(
        default=None, sa_type=sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True
    )
    kind: str = Field(max_length=32)
    cause: str = Field(max_length=255)
    service: str = Field(max_length=63)
    rollout_id: int | None = None
    channel: str | None = Field(default=None, max_length=63)
    dedup_key: str = Field(max_length=255)
    # A secret: never copied into audit details, API answers or logs.
    routing_key: str = Field(max_length=64)
    payload: dict[str, Any] = Field(default_factory=dict, sa_type=JSONDocument)
    state: str = Field(default=OutboxState.PENDING.value, max_length=16)
    attempts: int = 0
    next_attempt_at: datetime = Field(sa_type=UTCDateTime)
    last_error: str | None = Field(default=None, max_length=2000)
    created_at: datetime = Field(sa_type=UTCDateTime)
    delivered_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class PagerDutyEvent(SQLModel, table=True):
    """A webhook event already handled: a redelivery of the same event id acts no more."""

    __tablename__ = "pagerduty_event"
    __table_args__ = (sa.Index("ix_pagerduty_event_received", "received_at"),)

    id: str = Field(primary_key=True, max_length=128)
    event_type: str = Field(max_length=64)
    received_at: datetime = Field(sa_type=UTCDateTime)
    outcome: str = Field(max_length=16)
