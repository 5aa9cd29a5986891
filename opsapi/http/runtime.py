"""What a running server holds: settings, database, token verifier, clock, metrics."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from opsapi.audit.writer import AuditWriter
from opsapi.auth.tokens import TokenVerifier
from opsapi.canary.policy import Policy
from opsapi.clock import Clock
from opsapi.config import Settings
from opsapi.metrics import Metrics
from opsapi.routers.traffic import Traffic
from opsapi.storage.db import SessionFactory


@dataclass
class Runtime:
    settings: Settings
    engine: AsyncEngine
    sessions: SessionFactory
    verifier: TokenVerifier
    clock: Clock
    metrics: Metrics
    audit_writer: AuditWriter
    default_policy: Policy
    traffic: Traffic
