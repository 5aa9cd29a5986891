"""Tables of the canary domain: service policies and rollouts."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from opsapi.canary.machine import State
from opsapi.storage.types import JSONDocument, StrEnumText, UTCDateTime

OPEN_STATES_SQL = "state NOT IN ('succeeded', 'rolled_back', 'reverted')"


class ServiceRecord(SQLModel, table=True):
    """A service's stored policy and its current stable version."""

    __tablename__ = "service"

    name: str = Field(primary_key=True, max_length=63)
    policy: dict[str, Any] = Field(sa_type=JSONDocument)
    stable_version: str | None = Field(default=None, max_length=128)
    # The slot serving the stable version (the policy's first slot until the first success),
    # and the version and slot a revert goes back to (cleared once a rollout takes that slot).
    stable_slot: str | None = Field(default=None, max_length=32)
    previous_version: str | None = Field(default=None, max_length=128)
    previous_slot: str | None = Field(default=None, max_length=32)
    updated_at: datetime = Field(sa_type=UTCDateTime)
    updated_by: str = Field(max_length=255)


class RolloutRecord(SQLModel, table=True):
    """One attempt to move a service from its stable version to a canary version."""

    __tablename__ = "rollout"
    __table_args__ = (
        # At most one open rollout per service, enforced by the database itself.
        sa.Index(
            "uq_rollout_open_service",
            "service",
            unique=True,
            postgresql_where=sa.text(OPEN_STATES_SQL),
            sqlite_where=sa.text(OPEN_STATES_SQL),
        ),
        sa.Index("ix_rollout_service_id", "service", "id"),
        sa.Index(
            "ix_rollout_due",
            "next_evaluation_at",
            postgresql_where=sa.text("next_evaluation_at IS NOT NULL"),
            sqlite_where=sa.text("next_evaluation_at IS NOT NULL"),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    service: str = Field(max_length=63)
    state: State = Field(sa_type=StrEnumText(State))
    canary_version: str = Field(max_length=128)
    stable_version: str | None = Field(default=None, max_length=128)
    # Where the stable and the canary version run (after a success both name the canary's slot).
    stable_slot: str = Field(
        default="blue", max_length=32, sa_column_kwargs={"server_default": "blue"}
    )
    canary_slot: str = Field(
        default="green", max_length=32, sa_column_kwargs={"server_default": "green"}
    )
    steps: list[dict[str, Any]] = Field(sa_type=JSONDocument)
    step_index: int
    desired_weight: int
    applied_weight: int | None = None
    step_started_at: datetime = Field(sa_type=UTCDateTime)
    paused_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    paused_seconds: float = 0.0
    auto_promote: bool = False
    interval_seconds: float = 60.0
    router: dict[str, Any] = Field(sa_type=JSONDocument)
    gates: list[dict[str, Any]] = Field(default_factory=list, sa_type=JSONDocument)
    # The gates and min_sample guard the rollout started with (a policy change applies to the
    # next rollout, as its steps do).
    gate_policy: dict[str, Any] = Field(default_factory=dict, sa_type=JSONDocument)
    triggered_by: str = Field(max_length=32)
    reason: str | None = Field(default=None, max_length=2000)
    created_by: str = Field(max_length=255)
    created_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    next_evaluation_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    router_error: str | None = Field(default=None, max_length=2000)
    # Failed applies since the last success, when the next retry is due, when the live weight
    # was last read back (drift check).
    router_attempts: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    router_retry_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    router_checked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # Bumped whenever what the router must apply changes (a weight, or the slots' roles); an
    # apply records the generation it made live. Converged: applied_generation == generation.
    generation: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    applied_generation: int | None = None

    # A rollback's (or revert's) instants, ISO 8601: cause seen, decision committed, router
    # applied, traffic confirmed at 0 (DESIGN §12); None for other rollouts.
    time_to_safe: dict[str, Any] | None = Field(default=None, sa_type=JSONDocument)
    # The fail-safe lease of the applied canary weight (None: off, or the router cannot hold
    # an expiry) and when the lease last applied runs out (DESIGN §12).
    lease_seconds: float | None = None
    lease_until: datetime | None = Field(default=None, sa_type=UTCDateTime)

    @property
    def converged(self) -> bool:
        """Whether the router has made the latest desired state live."""
        return self.applied_generation == self.generation and self.router_error is None


class RejectedVersion(SQLModel, table=True):
    """A version rolled back by a breach or an incident: not started again without an override."""

    __tablename__ = "rejected_version"
    __table_args__ = (
        # One standing rejection per version of a service; lifted ones stay as history.
        sa.Index(
            "uq_rejected_version_standing",
            "service",
            "version",
            unique=True,
            postgresql_where=sa.text("lifted_at IS NULL"),
            sqlite_where=sa.text("lifted_at IS NULL"),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    service: str = Field(max_length=63)
    version: str = Field(max_length=128)
    rollout_id: int | None = None
    reason: str = Field(max_length=2000)
    rejected_at: datetime = Field(sa_type=UTCDateTime)
    lifted_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    lifted_by: str | None = Field(default=None, max_length=255)
    lift_reason: str | None = Field(default=None, max_length=2000)


class Incident(SQLModel, table=True):
    """A PagerDuty incident on a mapped service: while open, changes to the service are held."""

    __tablename__ = "incident"
    __table_args__ = (sa.Index("ix_incident_open", "service", "resolved_at"),)

    id: str = Field(primary_key=True, max_length=128)  # PagerDuty's incident id
    service: str = Field(primary_key=True, max_length=63)
    number: int | None = None
    title: str = Field(default="", max_length=500)
    html_url: str | None = Field(default=None, max_length=1000)
    status: str = Field(max_length=32)
    opened_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)
    resolved_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class FreezeRecord(SQLModel, table=True):
    """A freeze window set by an admin through the API (server-configured ones live in a file)."""

    __tablename__ = "freeze_window"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=100)
    services: list[str] = Field(sa_type=JSONDocument)
    reason: str = Field(max_length=2000)
    starts_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    ends_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    cron: str | None = Field(default=None, max_length=100)
    duration_seconds: float | None = None
    timezone: str = Field(default="UTC", max_length=64)
    created_by: str = Field(max_length=255)
    created_at: datetime = Field(sa_type=UTCDateTime)
    deleted_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    deleted_by: str | None = Field(default=None, max_length=255)
