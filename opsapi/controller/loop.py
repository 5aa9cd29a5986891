"""Claims due rollouts and lets the state machine act on the passage of time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta

from sqlmodel import col, delete

from opsapi.audit import service as audit
from opsapi.audit.models import Outcome, Source
from opsapi.canary import machine, service
from opsapi.clock import Clock
from opsapi.metrics import Metrics
from opsapi.storage.db import SessionFactory
from opsapi.storage.idempotency import IdempotencyRecord

log = logging.getLogger("opsapi.controller")
ACTOR = "controller"
DEFAULT_IDEMPOTENCY_TTL = timedelta(hours=24)


class Controller:
    """One replica's controller; several may run against one database (SKIP LOCKED claims)."""

    def __init__(
        self,
        sessions: SessionFactory,
        clock: Clock,
        metrics: Metrics,
        *,
        batch_size: int = 100,
        poll_seconds: float = 1.0,
        idempotency_ttl: timedelta = DEFAULT_IDEMPOTENCY_TTL,
    ) -> None:
        self.sessions = sessions
        self.clock = clock
        self.metrics = metrics
        self.batch_size = batch_size
        self.poll_seconds = poll_seconds
        self.idempotency_ttl = idempotency_ttl
        self._next_purge: datetime | None = None

    async def run_once(self) -> int:
        """Handle every rollout due now; return how many transitions happened."""
        now = self.clock()
        transitions = 0
        async with self.sessions() as session, session.begin():
            due = await service.claim_due(now=now, limit=self.batch_size, session=session)
            if due:
                oldest = min(r.next_evaluation_at or now for r in due)
                self.metrics.controller_lag.set(max(0.0, (now - oldest).total_seconds()))
            else:
                self.metrics.controller_lag.set(0.0)
            for record in due:
                async with session.begin_nested():
                    applied = await service.apply_event(
                        record, machine.Tick(), now=now, session=session
                    )
                    for effect in applied.transition.effects:
                        if not isinstance(effect, machine.Audit):
                            continue
                        transitions += 1
                        self.metrics.transitions.labels(effect.action, record.triggered_by).inc()
                        audit.record(
                            session=session,
                            at=now,
                            actor=ACTOR,
                            source=Source.CONTROLLER,
                            action=effect.action,
                            outcome=Outcome.SUCCESS,
                            service=record.service,
                            rollout_id=record.id,
                            details={**effect.details, "triggered_by": record.triggered_by},
                        )
        return transitions

    async def purge_idempotency_keys(self) -> int:
        """Forget stored first responses older than the TTL (at most once a minute)."""
        now = self.clock()
        if self._next_purge is not None and now < self._next_purge:
            return 0
        self._next_purge = now + timedelta(minutes=1)
        cutoff = now - self.idempotency_ttl
        async with self.sessions() as session, session.begin():
            result = await session.exec(
                delete(IdempotencyRecord).where(col(IdempotencyRecord.created_at) < cutoff)
            )
        return int(result.rowcount or 0)

    async def run(self, stop: asyncio.Event) -> None:
        """Run passes until `stop` is set; an error in one pass never ends the loop."""
        while not stop.is_set():
            try:
                await self.run_once()
                await self.purge_idempotency_keys()
                self.metrics.controller_ticks.labels("ok").inc()
            except Exception:
                self.metrics.controller_ticks.labels("error").inc()
                log.exception("controller pass failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.poll_seconds)
