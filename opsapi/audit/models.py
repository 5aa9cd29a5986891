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


class AuditCheckpoint(SQLModel, table=True):
    """A signed record that the events from the chain's start (or the previous checkpoint) up
    to `last_id` were archived; only events a checkpoint covers may ever be removed.

    Append-only like the events (triggers); on insert the database checks that `last_hash` is
    event `last_id`'s hash, that the checkpoint continues the latest one (`anchor_*`) and that
    `first_id` and `events` describe the events it covers.
    """

    __tablename__ = "audit_checkpoint"
    __table_args__ = (
        sa.Index("uq_audit_checkpoint_last_id", "last_id", unique=True),
        sa.CheckConstraint("events > 0", name="ck_audit_checkpoint_events"),
    )

    id: int | None = Field(
        default=None, sa_type=sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True
    )
    created_at: datetime = Field(sa_type=UTCDateTime)
    archived_before: datetime = Field(sa_type=UTCDateTime)
    # The previous checkpoint's last event (id, hash), or no id and 64 zeros: the chain's start.
    anchor_id: int | None = Field(default=None, sa_type=sa.BigInteger())
    anchor_hash: str = Field(max_length=64)
    first_id: int = Field(sa_type=sa.BigInteger())
    last_id: int = Field(sa_type=sa.BigInteger())
    last_hash: str = Field(max_length=64)
    events: int = Field(sa_type=sa.BigInteger())
    archive_name: str = Field(max_length=255)
    archive_sha256: str = Field(max_length=64)
    # Ed25519: the key's id (sha256 of the raw public key), the public key and the signature
    # over the other fields (base64).
    key_id: str = Field(max_length=64)
    public_key: str = Field(max_length=64)
    signature: str = Field(max_length=128)
