"""Stored gate evaluations: every measurement the controller judged, for review."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from opsapi.storage.types import UTCDateTime


class GateEvaluation(SQLModel, table=True):
    """One gate's judgement at one evaluation of a rollout."""

    __tablename__ = "gate_evaluation"
    __table_args__ = (sa.Index("ix_gate_evaluation_rollout", "rollout_id", "id"),)

    id: int | None = Field(
        default=None, sa_type=sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True
    )
    rollout_id: int
    at: datetime = Field(sa_type=UTCDateTime)
    gate: str = Field(max_length=63)
    step_index: int
    weight: int
    phase: str = Field(max_length=16)
    value: float | None = None
    threshold: float | None = None
    breached: bool = False
    detail: str | None = Field(default=None, max_length=1000)
