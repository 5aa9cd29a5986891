"""The outbox delivery worker: claims due alerts, sends them off the event loop, records results.

One pass: (1) claim due pending rows with `FOR UPDATE SKIP LOCKED` and lease them by pushing
`next_attempt_at` forward, so no other replica sends them meanwhile; (2) send each through the
Events API in a worker thread, bounded by an overall timeout; (3) record each result in its own
transaction: delivered, or a retry after 1 s, 2 s, 4 s … (at most 60 s), or — after
`max_attempts` — failed, with a metric and an audit event. A crash anywhere leaves the lease to
expire and a later pass to send again (PagerDuty folds repeats by dedup key).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import aliased
from sqlmodel import and_, col, delete, exists, not_, select

from opsapi.audit import service as audit
from opsapi.audit.models import Outcome, Source
from opsapi.clock import Clock
from opsapi.config import Settings
from opsapi.metrics import Metrics
from opsapi.pagerduty.events import Delivery, DeliveryError, EventsApi
from opsapi.pagerduty.models import OutboxKind, OutboxMessage, OutboxState, PagerDutyEvent
from opsapi.storage.db import SessionFactory

log = logging.getLogger("opsapi.pagerduty")
ACTOR = "outbox"
MAX_BACKOFF = timedelta(seconds=60)
DEFAULT_MAX_ATTEMPTS = 8
# Webhook event ids are remembered this long (PagerDuty's own retries span minutes).
EVENT_RETENTION = timedelta(days=30)

Sender = Callable[[Delivery], None]


def backoff(attempts: int) -> timedelta:
    """Wait before the next try after `attempts` failures: 1 s, 2 s, 4 s … at most 60 s."""
    return min(MAX_BACKOFF, timedelta(seconds=2 ** max(0, attempts - 1)))


@dataclass(frozen=True)
class _Claimed:
    id: int
    kind: str
    service: str
    rollout_id: int | None
    delivery: Delivery


class _Interrupted(Exception):
    """The worker is stopping: the send is abandoned (its lease lets a later pass redo it)."""


class DeliveryWorker:
    """Delivers the outbox; several replicas may run one each against one database."""

    def __init__(
        self,
        sessions: SessionFactory,
        clock: Clock,
        metrics: Metrics,
        sender: Sender,
        *,
        timeout_seconds: float,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        poll_seconds: float = 1.0,
        batch_size: int = 20,
        threads: int = 4,
    ) -> None:
        self.sessions = sessions
        self.clock = clock
        self.metrics = metrics
        self.sender = sender
        self.max_attempts = max_attempts
        self.poll_seconds = poll_seconds
        self.batch_size = batch_size
        # The client's own timeout bounds each phase of the request; this bounds the whole call
        # (a hung thread is abandoned, never waited for).
        self.overall_timeout = 2 * timeout_seconds + 1
        self.lease = timedelta(seconds=self.overall_timeout + 30)
        # Its own threads: a hanging PagerDuty never starves the default pool that other
        # blocking clients (Prometheus) use.
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pagerduty")
        self._stopping = asyncio.Event()
        self._next_purge: datetime | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, sessions: SessionFactory, clock: Clock, metrics: Metrics
    ) -> DeliveryWorker:
        """The worker the server's settings describe."""
        api = EventsApi(
            settings.pagerduty_events_url,
            ca_file=settings.pagerduty_ca_file,
            timeout_seconds=settings.pagerduty_timeout_seconds,
        )
        return cls(
            sessions,
            clock,
            metrics,
            api.send,
            timeout_seconds=settings.pagerduty_timeout_seconds,
            max_attempts=settings.pagerduty_max_attempts,
            poll_seconds=settings.pagerduty_poll_seconds,
        )

    async def run_once(self) -> int:
        """Send every alert due now (in batches); return how many were attempted."""
        attempted = 0
        while not self._stopping.is_set():
            claimed = await self._claim()
            if not claimed:
                break
            results = await asyncio.gather(*(self._send(item) for item in claimed))
            for item, result in zip(claimed, results, strict=True):
                if isinstance(result, _Interrupted):
                    continue
                await self._record(item, result)
                attempted += 1
            if len(claimed) < self.batch_size:
                break
        return attempted

    async def run(self, stop: asyncio.Event) -> None:
        """Run passes until `stop` is set; an error in one pass never ends the loop."""
        watcher = asyncio.create_task(self._watch(stop))
        try:
            while not stop.is_set():
                try:
                    await self.run_once()
                    await self.purge_events()
                except Exception:
                    log.exception("outbox delivery pass failed; retrying")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.poll_seconds)
        finally:
            watcher.cancel()
            self.close()

    async def purge_events(self) -> int:
        """Forget webhook event ids older than the retention (at most once an hour)."""
        now = self.clock()
        if self._next_purge is not None and now < self._next_purge:
            return 0
        self._next_purge = now + timedelta(hours=1)
        cutoff = now - EVENT_RETENTION
        async with self.sessions() as session, session.begin():
            result = await session.exec(
                delete(PagerDutyEvent).where(col(PagerDutyEvent.received_at) < cutoff)
            )
        return int(result.rowcount or 0)

    def close(self) -> None:
        """Stop sending: abandon calls in flight (their threads end at the client timeout)."""
        self._stopping.set()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _watch(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._stopping.set()

    async def _claim(self) -> list[_Claimed]:
        now = self.clock()
        earlier = aliased(OutboxMessage)
        # A resolve waits while a trigger of the same key is still pending: sent first, it would
        # leave the alert that trigger opens unresolved.
        trigger_pending = exists().where(
            col(earlier.dedup_key) == col(OutboxMessage.dedup_key),
            col(earlier.kind) == OutboxKind.TRIGGER.value,
            col(earlier.state) == OutboxState.PENDING.value,
            col(earlier.id) < col(OutboxMessage.id),
        )
        query = (
            select(OutboxMessage)
            .where(
                OutboxMessage.state == OutboxState.PENDING.value,
                col(OutboxMessage.next_attempt_at) <= now,
                not_(and_(OutboxMessage.kind == OutboxKind.RESOLVE.value, trigger_pending)),
            )
            .order_by(col(OutboxMessage.next_attempt_at), col(OutboxMessage.id))
            .limit(self.batch_size)
            .with_for_update(skip_locked=True)
        )
        async with self.sessions() as session, session.begin():
            rows = (await session.exec(query)).all()
            claimed = []
            for row in rows:
                assert row.id is not None
                row.next_attempt_at = now + self.lease
                session.add(row)
                delivery = Delivery(row.kind, row.dedup_key, row.routing_key, dict(row.payload))
                claimed.append(_Claimed(row.id, row.kind, row.service, row.rollout_id, delivery))
        return claimed

    async def _send(self, item: _Claimed) -> str | _Interrupted | None:
        """None when delivered, else what went wrong; _Interrupted when stopping first."""
        try:
            future: Future[None] = self._executor.submit(self.sender, item.delivery)
        except RuntimeError:
            return _Interrupted()  # the executor is shut down
        sent: asyncio.Future[Any] = asyncio.wrap_future(future)
        stopping: asyncio.Future[Any] = asyncio.ensure_future(self._stopping.wait())
        try:
            done, _ = await asyncio.wait(
                {sent, stopping}, timeout=self.overall_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopping.cancel()
        if sent not in done:
            # Abandoned: the thread ends at the client's timeout; nobody awaits its result.
            sent.add_done_callback(_swallow)
            if self._stopping.is_set():
                return _Interrupted()
            return f"no answer within {self.overall_timeout:g}s"
        error = sent.exception()
        if error is None:
            return None
        if isinstance(error, DeliveryError):
            return str(error)
        log.error("unexpected error delivering outbox row %d: %r", item.id, error)
        return f"unexpected error: {type(error).__name__}"

    async def _record(self, item: _Claimed, error: str | None) -> None:
        now = self.clock()
        kind = item.kind.removeprefix("pagerduty.")
        async with self.sessions() as session, session.begin():
            row = await session.get(OutboxMessage, item.id, with_for_update=True)
            if row is None or row.state != OutboxState.PENDING.value:
                return
            row.attempts += 1
            if error is None:
                row.state = OutboxState.DELIVERED.value
                row.delivered_at = now
                row.last_error = None
                result = "delivered"
            else:
                row.last_error = error[:2000]
                if row.attempts >= self.max_attempts:
                    row.state = OutboxState.FAILED.value
                    result = "failed"
                else:
                    row.next_attempt_at = now + backoff(row.attempts)
                    result = "retry"
            session.add(row)
            if result != "retry":
                await audit.record(
                    session=session,
                    at=now,
                    actor=ACTOR,
                    source=Source.SYSTEM,
                    action="pagerduty.delivered" if error is None else "pagerduty.delivery_failed",
                    outcome=Outcome.SUCCESS if error is None else Outcome.ERROR,
                    service=item.service,
                    rollout_id=item.rollout_id,
                    details={"kind": item.kind, "dedup_key": row.dedup_key,
                             "attempts": row.attempts, "last_error": row.last_error,
                             "outbox_id": item.id},
                )  # fmt: skip
        self.metrics.pagerduty_deliveries.labels(kind, result).inc()
        if error is not None:
            log.warning(
                "PagerDuty %s %s attempt %d failed (%s): %s",
                kind, item.delivery.dedup_key, row.attempts, result, error,
            )  # fmt: skip


def _swallow(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
