"""What a running process holds: settings, database, token verifier, clock, metrics, workers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncEngine

from opsapi.audit.writer import AuditWriter
from opsapi.auth.tokens import TokenVerifier
from opsapi.canary.dataplane import PollAudit, WeightCache
from opsapi.canary.effects import Effects
from opsapi.canary.policy import Policy
from opsapi.clock import Clock
from opsapi.config import Settings
from opsapi.metrics import Metrics
from opsapi.routers.traffic import Traffic
from opsapi.storage.db import DatabaseHealth, SessionFactory

if TYPE_CHECKING:
    from opsapi.controller.loop import Controller
    from opsapi.gates.provider import GateProvider
    from opsapi.pagerduty.worker import DeliveryWorker


@dataclass
class Runtime:
    """Everything `opsapi.runtime.build_runtime` builds; one per process (or test app)."""

    settings: Settings
    engine: AsyncEngine
    sessions: SessionFactory
    verifier: TokenVerifier
    clock: Clock
    metrics: Metrics
    audit_writer: AuditWriter
    default_policy: Policy
    traffic: Traffic
    # The one interpreter of the machine's plans, shared by the API, the controller, webhooks.
    effects: Effects
    # The data plane: each service's weight answer, and its polls counted per minute.
    weights: WeightCache
    polls: PollAudit
    # Repeated status reads of a service by one caller in a minute, counted (the first is not).
    repeats: PollAudit
    provider: GateProvider
    controller: Controller
    delivery: DeliveryWorker
    # Told the outcome of every statement; `/readyz` answers 503 while database work fails.
    database_health: DatabaseHealth
    # Set when the process begins to stop: the background loops finish their pass and end.
    stop: asyncio.Event = field(default_factory=asyncio.Event)
