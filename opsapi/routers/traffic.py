"""Making desired weights real: apply through the rollout's router, record what is applied.

The desired weight is committed first (with the state change and its audit event); applying
it happens after, here, and its result is recorded in a transaction of its own. Applies for one
service are serialised (in-process lock, plus a PostgreSQL advisory lock across replicas) and
always read the latest desired weight inside the lock, so a slow, older apply can never land
after a newer one (a rollback is never overtaken by the promotion before it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from opsapi.audit import service as audit
from opsapi.audit.models import Outcome, Source
from opsapi.canary.machine import OPEN_STATES
from opsapi.canary.models import RolloutRecord, ServiceRecord
from opsapi.canary.policy import Policy
from opsapi.canary.service import policy_of
from opsapi.clock import Clock
from opsapi.metrics import Metrics
from opsapi.notifications import outbox as notifications
from opsapi.notifications.messages import Message
from opsapi.pagerduty import outbox as pagerduty_outbox
from opsapi.routers.base import Router, RouterError, RouteTarget
from opsapi.routers.registry import PULL
from opsapi.storage import rows
from opsapi.storage.db import SessionFactory

log = logging.getLogger("opsapi.routers")
ACTOR = "router"
_APPLY_LOCK = 724_113_003
MAX_BACKOFF = timedelta(seconds=60)
DRIFT_CHECK = timedelta(seconds=30)


@dataclass(frozen=True)
class ApplyOutcome:
    """What an apply did: the weight and generation now live (None when unknown) and the
    error, if any."""

    applied_weight: int | None
    error: str | None
    generation: int | None = None
    # A rollback's instants as recorded with this apply (time to safe).
    time_to_safe: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def backoff(attempts: int) -> timedelta:
    """Wait before the next retry after `attempts` failures: 1 s, 2 s, 4 s … at most 60 s."""
    return min(MAX_BACKOFF, timedelta(seconds=2 ** max(0, attempts - 1)))


class Traffic:
    """Applies rollouts' desired weights through the configured router instances."""

    def __init__(
        self,
        engine: AsyncEngine,
        sessions: SessionFactory,
        routers: dict[str, Router],
        clock: Clock,
        metrics: Metrics,
        *,
        confirm_within: timedelta = timedelta(seconds=10),
    ) -> None:
        self.engine = engine
        self.sessions = sessions
        self.routers = routers
        self.clock = clock
        self.metrics = metrics
        # A rollback not confirmed at 0 this long after its decision pages (DESIGN §12).
        self.confirm_within = confirm_within
        self._locks: dict[str, asyncio.Lock] = {}

    def router_for(self, router_policy: dict[str, object]) -> Router | None:
        """The router instance a rollout uses; None for the built-in pull router."""
        name = str(router_policy.get("name", PULL))
        if name == PULL:
            return None
        router = self.routers.get(name)
        if router is None:
            raise RouterError(f"router instance {name!r} is not configured on this server")
        return router

    async def apply(
        self,
        rollout_id: int,
        service: str,
        *,
        reason: str,
        force: bool = False,
        committed_at: datetime | None = None,
    ) -> ApplyOutcome:
        """Apply the rollout's latest desired generation now; record and audit the result.

        Nothing is sent when that generation is already live (an apply queued behind another
        that made it live), unless `force` (a person's sync, a drift repair)."""
        async with self._exclusive(service):
            record = await self._read(rollout_id)
            if record is None:
                return ApplyOutcome(None, "no such rollout")
            if record.converged and not force:
                return ApplyOutcome(record.applied_weight, None, record.applied_generation)
            weight, generation = record.desired_weight, record.generation
            error = await self._send(record, weight)
            return await self._record(
                rollout_id, weight, generation, error, reason=reason, committed_at=committed_at
            )

    async def sync(self, service: str, *, reason: str = "router-sync") -> ApplyOutcome | None:
        """Re-apply the service's latest desired weight now (None when it has no rollout)."""
        async with self.sessions() as session:
            query = (
                select(RolloutRecord)
                .where(RolloutRecord.service == service)
                .order_by(col(RolloutRecord.id).desc())
                .limit(1)
            )
            record = (await session.exec(query)).first()
        if record is None or record.id is None:
            return None
        return await self.apply(record.id, service, reason=reason, force=True)

    async def check_drift(self, rollout_id: int, service: str) -> ApplyOutcome | None:
        """Read the live weight back; re-apply when it differs from what was applied."""
        async with self.sessions() as session:
            record = await session.get(RolloutRecord, rollout_id)
        if record is None:
            return None
        try:
            router = self.router_for(record.router)
            live = None if router is None else await router.read_back(_target(record))
        except RouterError as error:
            return await self._record(rollout_id, None, None, str(error), reason="drift check")
        # A router that confirms what it applies but cannot tell now (an instance lost its
        # state, or instances disagree) has drifted; one that never can (webhook) has not.
        unknown = live is None and router is not None and getattr(router, "confirms", True)
        if not unknown and (live is None or live == record.applied_weight):
            await self._mark_checked(rollout_id)
            return None
        self.metrics.router_drift.labels(service).inc()
        async with self.sessions() as session, session.begin():
            await audit.record(
                session=session,
                at=self.clock(),
                actor=ACTOR,
                source=Source.SYSTEM,
                action="router.drift",
                outcome=Outcome.SUCCESS,
                service=service,
                rollout_id=rollout_id,
                details={"router": record.router.get("name"), "live_weight": live,
                         "applied_weight": record.applied_weight},
            )  # fmt: skip
        return await self.apply(rollout_id, service, reason="drift", force=True)

    async def reconcile(self) -> int:
        """Re-apply wherever desired ≠ applied, retry failures when due, check for drift; page
        for rollbacks not confirmed within the bound."""
        await self.page_unconfirmed()
        await self.renew_leases()
        now = self.clock()
        async with self.sessions() as session:
            latest = select(func.max(RolloutRecord.id)).group_by(col(RolloutRecord.service))
            records = (
                await session.exec(select(RolloutRecord).where(col(RolloutRecord.id).in_(latest)))
            ).all()
        work = 0
        for record in records:
            if record.router.get("name", PULL) == PULL or record.id is None:
                continue
            if record.router_retry_at is not None and record.router_retry_at > now:
                continue
            if not record.converged:
                await self.apply(record.id, record.service, reason="reconcile")
                work += 1
            elif record.router_checked_at is None or now - record.router_checked_at >= _drift_every(
                record
            ):
                await self.check_drift(record.id, record.service)
                work += 1
        return work

    def lease_until(self, record: RolloutRecord, now: datetime) -> datetime | None:
        """Until when an apply of `record` now holds its weight without renewal (None: no
        lease: pinned, not a canary weight, or a router that cannot hold an expiry)."""
        router = self.router_for(record.router)
        if router is None or not getattr(router, "holds_lease", False):
            return None
        if (
            not record.lease_seconds
            or record.state not in OPEN_STATES
            or record.desired_weight == 0
        ):
            return None
        return now + timedelta(seconds=record.lease_seconds)

    async def renew_leases(self) -> int:
        """Re-apply every converged canary weight whose lease is past half its life."""
        now = self.clock()
        async with self.sessions() as session:
            records = (
                await session.exec(
                    select(RolloutRecord).where(
                        col(RolloutRecord.state).in_(OPEN_STATES),
                        col(RolloutRecord.lease_until).is_not(None),
                    )
                )
            ).all()
        renewed = 0
        for record in records:
            assert record.lease_until is not None
            assert record.id is not None
            half = timedelta(seconds=(record.lease_seconds or 0) / 2)
            if not record.converged or record.lease_until - now > half:
                continue
            await self.apply(record.id, record.service, reason="lease renewal", force=True)
            renewed += 1
        return renewed

    async def _send(self, record: RolloutRecord, weight: int) -> str | None:
        try:
            router = self.router_for(record.router)
            if router is not None:
                await router.apply(_target(record, self.lease_until(record, self.clock())), weight)
        except RouterError as error:
            return str(error)[:2000]
        except Exception:
            log.exception("router apply failed for %s", record.service)
            return "the router failed unexpectedly"
        return None

    async def fetched(self, rollout_id: int, generation: int, *, caller: str) -> bool:
        """A pull client fetched `generation` of the rollout's weight: record it as applied
        (audited, and a rollback's time to safe), once; whether this call recorded it."""
        record = await self._read(rollout_id)
        if record is None or record.generation != generation or record.converged:
            return False
        outcome = await self._record(
            rollout_id, record.desired_weight, generation, None,
            reason=f"fetched by {caller}", only_generation=generation,
        )  # fmt: skip
        return outcome.generation == generation

    async def _read(self, rollout_id: int) -> RolloutRecord | None:
        # One statement outside any transaction: no BEGIN or ROLLBACK around it.
        async with self.sessions() as session:
            found = await rows.fetch_records(
                session, RolloutRecord, _ROLLOUT, rollout_id, alone=True
            )
        return found[0] if found else None

    async def _record(
        self,
        rollout_id: int,
        weight: int | None,
        generation: int | None,
        error: str | None,
        *,
        reason: str,
        committed_at: datetime | None = None,
        only_generation: int | None = None,
    ) -> ApplyOutcome:
        now = self.clock()
        async with self.sessions() as session, session.begin():
            (record,) = await rows.lock_records(
                session, RolloutRecord, f"{_ROLLOUT} FOR UPDATE", rollout_id
            )
            if only_generation is not None and (
                record.generation != only_generation or record.converged
            ):
                # Another replica recorded the fetch first, or a newer generation is out.
                return ApplyOutcome(record.applied_weight, None, None, record.time_to_safe)
            first_failure = error is not None and record.router_error is None
            recovered = error is None and record.router_error is not None
            if error is None:
                renewal = reason == "lease renewal" and record.applied_weight == weight
                record.applied_weight = weight
                record.applied_generation = generation
                record.router_error = None
                record.lease_until = self.lease_until(record, now)
                if weight == 0 and record.time_to_safe and not record.time_to_safe["applied_at"]:
                    await self._safe(session, record, now, committed_at)
                record.router_attempts = 0
                record.router_retry_at = None
                record.router_checked_at = now
            else:
                record.router_error = error
                record.router_attempts += 1
                record.router_retry_at = now + backoff(record.router_attempts)
                if record.router_attempts == pagerduty_outbox.ROUTER_FAILURES_TO_PAGE:
                    # Retrying has not helped: page, once per rollout (same transaction).
                    await pagerduty_outbox.page_router_failure(
                        session, record, error=error, weight=weight or 0, now=now
                    )
                    await _notify_router_failed(session, record, error, now)
            # The rollout's UPDATE travels with the apply's audit event (one round trip fewer
            # before a rollback through a router is answered), or runs alone when none is due.
            update = await rows.pending_update(session, record)
            writes = [update] if update is not None else []
            self.metrics.router_applies.labels("ok" if error is None else "error").inc()
            self.metrics.router_errors.labels(record.service).set(1 if error else 0)
            # Every apply that changes traffic is audited; repeated identical failures are not,
            # so a long outage does not flood the log (attempts are on the rollout).
            audited = (error is None and not renewal) or first_failure or recovered
            if not audited:
                await rows.run_together(session, writes)
            else:
                await audit.record(
                    session=session,
                    alongside=writes,
                    at=now,
                    actor=ACTOR,
                    source=Source.SYSTEM,
                    action="router.apply",
                    outcome=Outcome.SUCCESS if error is None else Outcome.ERROR,
                    service=record.service,
                    rollout_id=rollout_id,
                    details={"router": record.router.get("name"), "weight": weight,
                             "reason": reason, "error": error,
                             "attempts": record.router_attempts},
                )  # fmt: skip
            applied = record.applied_weight
            live = record.applied_generation
            safe = record.time_to_safe
        return ApplyOutcome(applied, error, live, safe)

    async def _safe(
        self,
        session: AsyncSession,
        record: RolloutRecord,
        now: datetime,
        committed_at: datetime | None,
    ) -> None:
        """A rollback's 0 % is live: record when, observe its time to safe, audit the instants."""
        assert record.time_to_safe is not None
        safe = dict(record.time_to_safe)
        router = self.router_for(record.router)
        if committed_at is not None and not safe.get("committed_at"):
            safe["committed_at"] = committed_at.isoformat()
        safe["applied_at"] = now.isoformat()
        # Routers that read the weight back before answering confirm it; a webhook cannot.
        if router is not None and getattr(router, "confirms", True):
            safe["confirmed_at"] = now.isoformat()
        detected = datetime.fromisoformat(safe["detected_at"])
        safe["seconds"] = round((now - detected).total_seconds(), 6)
        record.time_to_safe = safe
        self.metrics.time_to_safe.labels(safe["trigger"], safe["router"]).observe(safe["seconds"])
        await audit.record(
            session=session,
            at=now,
            actor=ACTOR,
            source=Source.SYSTEM,
            action="rollout.safe",
            outcome=Outcome.SUCCESS,
            service=record.service,
            rollout_id=record.id,
            details=safe,
        )

    async def page_unconfirmed(self) -> int:
        """Page for every rollback not confirmed at 0 within the bound (once each)."""
        now = self.clock()
        paged = 0
        async with self.sessions() as session:
            latest = select(func.max(RolloutRecord.id)).group_by(col(RolloutRecord.service))
            records = (
                await session.exec(select(RolloutRecord).where(col(RolloutRecord.id).in_(latest)))
            ).all()
        for candidate in records:
            safe = candidate.time_to_safe
            if not safe or safe.get("confirmed_at") or safe.get("unconfirmed_paged_at"):
                continue
            router = self.router_for(candidate.router)
            if router is None:
                # Pull: applied when a client fetches it; with no client polling there is no
                # traffic to move, so no page (the view shows it unapplied).
                continue
            if safe.get("applied_at") and not getattr(router, "confirms", True):
                continue  # applied where nothing can confirm it (webhook): not unconfirmed
            if now - datetime.fromisoformat(safe["decided_at"]) < self.confirm_within:
                continue
            async with self.sessions() as session, session.begin():
                record = await session.get(RolloutRecord, candidate.id, with_for_update=True)
                if record is None or not record.time_to_safe:
                    continue
                safe = {**record.time_to_safe, "unconfirmed_paged_at": now.isoformat()}
                record.time_to_safe = safe
                session.add(record)
                seconds = self.confirm_within.total_seconds()
                page = await pagerduty_outbox.page_unconfirmed(session, record, seconds, now=now)
                await audit.record(
                    session=session,
                    at=now,
                    actor=ACTOR,
                    source=Source.SYSTEM,
                    action="rollout.unconfirmed",
                    outcome=Outcome.ERROR,
                    service=record.service,
                    rollout_id=record.id,
                    details={**safe, "bound_seconds": seconds, "page": page,
                             "router_error": record.router_error},
                )  # fmt: skip
                paged += 1
        return paged

    async def _mark_checked(self, rollout_id: int) -> None:
        async with self.sessions() as session, session.begin():
            record = await session.get(RolloutRecord, rollout_id, with_for_update=True)
            if record is not None:
                record.router_checked_at = self.clock()
                session.add(record)

    @contextlib.asynccontextmanager
    async def _exclusive(self, service: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(service, asyncio.Lock())
        async with lock:
            if self.engine.dialect.name != "postgresql":
                yield
                return
            # A session lock, taken and released outside any transaction (no BEGIN, no
            # ROLLBACK: two round trips fewer for each apply, a rollback's among them).
            async with self.engine.connect() as connection:
                take = "SELECT pg_advisory_lock($1, hashtext($2))"
                await rows.execute_alone(connection, take, _APPLY_LOCK, service)
                try:
                    yield
                finally:
                    unlock = "SELECT pg_advisory_unlock($1, hashtext($2))"
                    await rows.execute_alone(connection, unlock, _APPLY_LOCK, service)


_ROLLOUT = "SELECT * FROM rollout WHERE id = $1"


def _drift_every(record: RolloutRecord) -> timedelta:
    # As often as the rollout's gates are evaluated, but not more than every DRIFT_CHECK.
    return min(DRIFT_CHECK, timedelta(seconds=record.interval_seconds))


def _target(record: RolloutRecord, valid_until: datetime | None = None) -> RouteTarget:
    params = {key: value for key, value in record.router.items() if key != "name"}
    return RouteTarget(
        valid_until=valid_until.timestamp() if valid_until else None,
        service=record.service,
        rollout_id=record.id,
        params=params,
        canary_slot=record.canary_slot,
        stable_slot=record.stable_slot,
        stable_version=record.stable_version,
        canary_version=record.canary_version,
        state=record.state,
    )


async def _notify_router_failed(
    session: AsyncSession, record: RolloutRecord, error: str, now: datetime
) -> None:
    """Tell the service's channels that its router keeps failing (once per rollout)."""
    row = await session.get(ServiceRecord, record.service)
    rules = policy_of(row, Policy()).notify
    if not rules:
        return
    message = Message(
        event="router_failed",
        service=record.service,
        rollout_id=record.id,
        state=record.state,
        canary_version=record.canary_version,
        stable_version=record.stable_version,
        canary_slot=record.canary_slot,
        stable_slot=record.stable_slot,
        weight=record.desired_weight,
        triggered_by="system",
        actor=ACTOR,
        reason=f"router {record.router.get('name')} failed {record.router_attempts} times: {error}",
    )
    await notifications.enqueue(
        session, rules=rules, message=message, cause=f"router-failed:{record.id}", now=now
    )
