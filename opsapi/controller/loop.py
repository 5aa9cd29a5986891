"""The controller: claims due rollouts, measures their gates, lets the state machine decide.

One pass: (1) claim due rollouts with `FOR UPDATE SKIP LOCKED` and lease them by pushing their
`next_evaluation_at` forward, so no other replica takes them while they are measured; (2)
measure every gate concurrently, outside any transaction; (3) for each rollout, in its own
transaction, lock the row again, judge the measurements against its stored gate statuses and
apply the result to the state machine, storing the evaluations and the audit events with the
change. A crash anywhere leaves the lease to expire and another pass to redo the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from sqlmodel import col, delete
from sqlmodel.ext.asyncio.session import AsyncSession

from opsapi.audit.models import Source
from opsapi.canary import machine, service
from opsapi.canary.effects import Applied, Cause, Effects
from opsapi.canary.machine import GateStatus
from opsapi.canary.models import RolloutRecord
from opsapi.canary.policy import GatePolicy, MinSample, Policy
from opsapi.clock import Clock
from opsapi.gates import judge
from opsapi.gates.models import GateEvaluation
from opsapi.gates.provider import GateProvider, Measurement, NoProvider
from opsapi.gates.templates import TemplateValues, render
from opsapi.metrics import Metrics
from opsapi.routers.traffic import Traffic
from opsapi.storage import rows
from opsapi.storage.db import SessionFactory
from opsapi.storage.idempotency import IdempotencyRecord

log = logging.getLogger("opsapi.controller")
ACTOR = "controller"
CAUSE = Cause(actor=ACTOR, source=Source.CONTROLLER)
DEFAULT_IDEMPOTENCY_TTL = timedelta(hours=24)
LEASE = timedelta(seconds=30)
# Decisions one replica's controller makes at the same time (each holds a connection).
DECISIONS_AT_ONCE = 8
# A rollout whose decision failed (a database error) is due again this soon.
RETRY_AFTER_FAILURE = timedelta(seconds=1)


@dataclass(frozen=True)
class Claim:
    """What was read under the claim's lock: enough to measure without holding it."""

    rollout_id: int
    service: str
    step_index: int
    values: TemplateValues
    gates: tuple[GatePolicy, ...]
    min_sample: MinSample | None
    overdue: float


@dataclass(frozen=True)
class Measured:
    claim: Claim
    at: datetime
    gates: dict[str, Measurement]
    sample_shortfall: str | None


class Controller:
    """One replica's controller; several may run against one database."""

    def __init__(
        self,
        sessions: SessionFactory,
        clock: Clock,
        metrics: Metrics,
        *,
        provider: GateProvider | None = None,
        traffic: Traffic | None = None,
        batch_size: int = 100,
        poll_seconds: float = 1.0,
        idempotency_ttl: timedelta = DEFAULT_IDEMPOTENCY_TTL,
        effects: Effects | None = None,
    ) -> None:
        self.sessions = sessions
        self.clock = clock
        self.metrics = metrics
        self.provider: GateProvider = provider or NoProvider()
        self.traffic = traffic
        self.batch_size = batch_size
        self.poll_seconds = poll_seconds
        self.idempotency_ttl = idempotency_ttl
        self._next_purge: datetime | None = None
        self._deciding = asyncio.Semaphore(DECISIONS_AT_ONCE)
        # For liveness: when the loop started and last completed a pass (monotonic seconds).
        self._running_since: float | None = None
        self._last_pass: float | None = None
        # Built by the runtime and shared with the API; a controller on its own (tests) makes one.
        self.effects = effects or Effects(traffic=traffic, metrics=metrics, default_policy=Policy())

    async def run_once(self) -> int:
        """Handle every rollout due now (in batches); return how many transitions happened."""
        transitions = 0
        while True:
            claims = await self._claim(self.batch_size)
            if not claims:
                return transitions
            results = await asyncio.gather(*(self.evaluate(claim) for claim in claims))
            transitions += sum(results)
            if len(claims) < self.batch_size:
                return transitions

    async def evaluate(self, claim: Claim) -> int:
        """Measure one claimed rollout and decide about it; how many transitions it made.

        Each claimed rollout is measured and decided on its own: a slow or hung measurement
        (a Prometheus that does not answer for one service) delays no other rollout's decision.
        A decision that fails releases the claim, so the rollout is due again within seconds
        rather than when the lease runs out."""
        measured = await self.measure(claim)
        try:
            # Measuring is waiting on Prometheus and runs wide; deciding holds a database
            # connection and runs a few at a time, leaving the pool to the API.
            async with self._deciding:
                return await self._decide(measured)
        except Exception:
            log.exception(
                "deciding about rollout %s failed; it is due again shortly", claim.rollout_id
            )
            self.metrics.controller_ticks.labels("error").inc()
            await self._release(claim)
            return 0

    async def _release(self, claim: Claim) -> None:
        with contextlib.suppress(Exception):  # if this fails too, the lease runs out by itself
            async with self.sessions() as session, session.begin():
                record = await session.get(RolloutRecord, claim.rollout_id, with_for_update=True)
                if record is not None and record.state in service.OPEN_STATE_VALUES:
                    record.next_evaluation_at = self.clock() + RETRY_AFTER_FAILURE
                    session.add(record)

    async def _claim(self, limit: int) -> list[Claim]:
        now = self.clock()
        async with self.sessions() as session, session.begin():
            due = await service.claim_due(
                now=now, limit=limit, lease_until=now + LEASE, session=session
            )
            claims = [claim_of(record, (now - due_at).total_seconds()) for record, due_at in due]
        lag = max((claim.overdue for claim in claims), default=0.0)
        self.metrics.controller_lag.set(max(0.0, lag))
        return claims

    async def measure(self, claim: Claim) -> Measured:
        """Every gate of `claim` (and its min_sample guard) measured now; never raises."""
        at = self.clock()
        if not claim.gates:
            return Measured(claim, at, {}, None)
        started = time.perf_counter()
        shortfall = None
        if claim.min_sample is not None:
            count = await self.provider.measure(render(claim.min_sample.query, claim.values))
            shortfall = judge.below_min_sample(count, claim.min_sample.min)
        results = await asyncio.gather(*(self._measure_gate(gate, claim) for gate in claim.gates))
        self.metrics.evaluation_seconds.observe(time.perf_counter() - started)
        return Measured(claim, at, dict(zip([g.name for g in claim.gates], results, strict=True)),
                         shortfall)  # fmt: skip

    async def _measure_gate(self, gate: GatePolicy, claim: Claim) -> Measurement:
        canary = self.provider.measure(render(gate.query, claim.values))
        if gate.baseline_query is None:
            return await canary
        stable = self.provider.measure(render(gate.baseline_query, claim.values))
        canary_value, stable_value = await asyncio.gather(canary, stable)
        return judge.gate_value(gate, canary_value, stable_value)

    async def _decide(self, measured: Measured) -> int:
        now = self.clock()
        # Committed on the driver, as a request's transaction is: no trip through SQLAlchemy's
        # transaction objects per decision.
        async with self.sessions() as session, rows.transaction(session):
            applied = await self._apply(measured, now=now, session=session)
        if applied is None:
            return 0
        # Committed first; now make it real (a breach's rollback is not kept waiting).
        await self.effects.finish(applied)
        return sum(1 for e in applied.transition.effects if isinstance(e, machine.Audit))

    async def _apply(
        self, measured: Measured, *, now: datetime, session: AsyncSession
    ) -> Applied | None:
        claim = measured.claim
        # The service before its rollout: every transition locks in this order.
        locked = await self.effects.lock(claim.service, now=now, session=session)
        record = locked.record
        if record is None or record.id != claim.rollout_id:
            return None  # a newer rollout replaced it while we measured
        if record.state not in service.OPEN_STATE_VALUES:
            return None
        if record.step_index != claim.step_index:
            # Promoted while we measured: these numbers describe the previous step.
            record.next_evaluation_at = now
            await rows.save(session, record)
            return None
        event: machine.Event = machine.Tick()
        evaluations: list[rows.Pending] = []
        if claim.gates:
            statuses = self._judge(measured, record)
            evaluations.append(await _evaluations(session, record, statuses, measured.at))
            event = machine.GateResults(statuses)
        # A breach's rollback counts its time to safe from the measurement.
        cause = replace(CAUSE, detected_at=measured.at)
        # The evaluations are written with the rollout (one round trip on PostgreSQL).
        return await self.effects.apply(
            locked, event, now=now, cause=cause, session=session, alongside=evaluations
        )

    def _judge(self, measured: Measured, record: RolloutRecord) -> tuple[GateStatus, ...]:
        statuses = judge_measured(measured, record)
        for status in statuses:
            self.metrics.evaluations.labels(status.phase.value).inc()
        return statuses

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
        """Run passes until `stop` is set; an error in one pass never ends the loop.

        Each poll claims what is due (up to the free share of the batch) and evaluates every
        claim in a task of its own; router reconciliation runs in a task of its own too, so
        neither a slow measurement nor a slow router holds up the next poll."""
        evaluations: set[asyncio.Task[int]] = set()
        reconcile: asyncio.Task[int] | None = None
        self._running_since = time.monotonic()
        try:
            while not stop.is_set():
                try:
                    free = self.batch_size - len(evaluations)
                    for claim in await self._claim(free) if free > 0 else []:
                        task = asyncio.create_task(self.evaluate(claim))
                        evaluations.add(task)
                        task.add_done_callback(evaluations.discard)
                    if self.traffic is not None and (reconcile is None or reconcile.done()):
                        reconcile = asyncio.create_task(self._reconcile())
                    await self.purge_idempotency_keys()
                    self.metrics.controller_ticks.labels("ok").inc()
                    self._last_pass = time.monotonic()
                except Exception:
                    self.metrics.controller_ticks.labels("error").inc()
                    log.exception("controller pass failed; retrying")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.poll_seconds)
        finally:
            # Claims in flight finish their measurement and decision (each is bounded by the
            # provider's timeouts); what is cancelled keeps its lease and is retried elsewhere.
            pending = [*evaluations, *([reconcile] if reconcile is not None else [])]
            if pending:
                await asyncio.wait(pending)

    def stalled_for(self) -> float | None:
        """Seconds since the loop last completed a pass (None when it is not running)."""
        if self._running_since is None:
            return None
        return time.monotonic() - max(self._running_since, self._last_pass or 0.0)

    async def _reconcile(self) -> int:
        assert self.traffic is not None
        try:
            return await self.traffic.reconcile()
        except Exception:
            log.exception("router reconciliation failed; retrying")
            return 0


async def _evaluations(
    session: AsyncSession, record: RolloutRecord, statuses: tuple[GateStatus, ...], at: datetime
) -> rows.Insert:
    """A pass's evaluations of `record` as one pending INSERT (no ORM objects: thousands are
    written in every pass)."""
    assert record.id is not None
    return await rows.pending_insert(
        session,
        GateEvaluation,
        [
            {
                "rollout_id": record.id,
                "at": at,
                "gate": status.name,
                "step_index": record.step_index,
                "weight": record.desired_weight,
                "phase": status.phase.value,
                "value": status.value,
                "threshold": status.threshold,
                "breached": status.breached,
                "detail": (status.detail or "")[:1000] or None,
            }
            for status in statuses
        ],
    )


def judge_measured(measured: Measured, record: RolloutRecord) -> tuple[GateStatus, ...]:
    """The gates' new statuses from `measured`, given those stored on the rollout (pure)."""
    previous = {status.name: status for status in service.to_machine(record).gates}
    statuses = []
    for gate in measured.claim.gates:
        before = previous.get(gate.name)
        if measured.sample_shortfall is not None:
            statuses.append(judge.insufficient_sample(gate, measured.sample_shortfall, before))
        else:
            statuses.append(judge.judge(gate, measured.gates[gate.name], before, measured.at))
    return tuple(statuses)


def claim_of(record: RolloutRecord, overdue: float) -> Claim:
    assert record.id is not None
    policy = record.gate_policy or {}
    gates = tuple(GatePolicy.model_validate(gate) for gate in policy.get("gates", []))
    min_sample = policy.get("min_sample")
    return Claim(
        rollout_id=record.id,
        service=record.service,
        step_index=record.step_index,
        values=TemplateValues(record.service, record.canary_version, record.stable_version),
        gates=gates,
        min_sample=MinSample.model_validate(min_sample) if min_sample else None,
        overdue=overdue,
    )
