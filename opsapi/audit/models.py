"""The audit event table."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from opsapi.storage.types import JSONDocument, UTCDateTime


class Source(enum.StrEnum):
    API = "api"
    CONTROLLER = "controller"
    PAGERDUTY = "pagerduty"
    SYSTEM = "system"


class Outcome(enum.StrEnum):
    SUCCESS = "success"
    DENIED = "denied"
    CONFLICT = "conflict"
    ERROR = "error"
    IGNORED = "ignored"


class AuditEvent(SQLModel, table=True):
    """One action or refused attempt, as reviewers read it later."""

    __tablename__ = "audit_event"
    __table_args__ = (
        sa.Index("ix_audit_at", "at", "id"),
        sa.Index("ix_audit_service_at", "service", "at", "id"),
        sa.Index("ix_audit_actor_at", "actor", "at", "id"),
        sa.Index("ix_audit_action_at", "action", "at", "id"),
        sa.Index("ix_audit_outcome_at", "outcome", "at", "id"),
        sa.Index("ix_audit_source_at", "source", "at", "id"),
        sa.Index("ix_audit_rollout", "rollout_id", "id"),
    )

    id: int | None = Field(
        default=None, sa_type=sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True
    )
    at: datetime = Field(sa_type=UTCDateTime)
    actor: str = Field(max_length=255)
    roles: list[str] = Field(default_factory=list, sa_type=JSONDocument)
    source: str = Field(max_length=16)
    action: str = Field(max_length=64)
    service: str | None = Field(default=None, max_length=63)
    rollout_id: int | None = None
    outcome: str = Field(max_length=16)
    request_id: str | None = Field(default=None, max_length=64)
    client_address: str | None = Field(default=None, max_length=64)
    details: dict[str, Any] = Field(default_factory=dict, sa_type=JSONDocument)
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)
