"""The outbox delivery worker: claims due rows, sends them off the event loop, records results.

The one outbox holds PagerDuty alerts (`pagerduty.*` kinds, sent through the Events API) and
notifications (kind `notification`, sent to their channel by `opsapi.notifications.sender`): one
worker, one sender per kind, each in its own thread pool so a slow chat channel never holds up a
page.

One pass: (1) claim due pending rows with `FOR UPDATE SKIP LOCKED` and lease them by pushing
`next_attempt_at` forward, so no other replica sends them meanwhile; (2) send each in a worker
thread, bounded by an overall timeout; (3) record each result in its own transaction: delivered,
or a retry after 1 s, 2 s, 4 s … (at most 60 s), or — after `max_attempts` — failed, with a
metric and an audit event. A crash anywhere leaves the lease to expire and a later pass to send
again: delivery is at least once (PagerDuty folds repeats by dedup key; a webhook channel gets
the same `delivery_id` again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
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
from opsapi.notifications.channels import ChannelConfig, load_channels, redact
from opsapi.notifications.sender import Notification, NotificationError, Notifier
from opsapi.pagerduty.events import Delivery, DeliveryError, EventsApi
from opsapi.pagerduty.models import OutboxKind, OutboxMessage, OutboxState, PagerDutyEvent
from opsapi.storage.db import SessionFactory

log = logging.getLogger("opsapi.pagerduty")
notification_log = logging.getLogger("opsapi.notifications")
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
    delivery: Delivery | Notification


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
        notifier: Notifier | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        poll_seconds: float = 1.0,
        batch_size: int = 20,
        threads: int = 4,
    ) -> None:
        self.sessions = sessions
        self.clock = clock
        self.metrics = metrics
        self.sender = sender
        # No channels configured: notification rows fail visibly ("not configured").
        self.notifier = notifier or Notifier({}, public_url=None)
        self.max_attempts = max_attempts
        self.poll_seconds = poll_seconds
        self.batch_size = batch_size
        # The client's own timeout bounds each phase of the request; this bounds the whole call
        # (a hung thread is abandoned, never waited for).
        self.overall_timeout = 2 * timeout_seconds + 1
        longest = max(self.overall_timeout, self.notifier.longest_timeout)
        self.lease = timedelta(seconds=longest + 30)
        # Its own threads: a hanging PagerDuty never starves the default pool that other
        # blocking clients (Prometheus) use.
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pagerduty")
        # Notifications get theirs, one per row of a batch: a dead chat channel neither delays
        # a page nor leaves a claimed notification queued behind others until it times out.
        self._notify_executor = ThreadPoolExecutor(
            max_workers=batch_size, thread_name_prefix="notify"
        )
        self._stopping = asyncio.Event()
        self._next_purge: datetime | None = None

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        sessions: SessionFactory,
        clock: Clock,
        metrics: Metrics,
        *,
        channels: Mapping[str, ChannelConfig] | None = None,
    ) -> DeliveryWorker:
        """The worker the server's settings describe; `channels` defaults to the channels file's
        (a bad file raises ChannelsFileError, failing the start)."""
        if channels is None:
            channels = load_channels(settings.notifications_file)
        notifier = Notifier(channels, public_url=settings.public_url)
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
            notifier=notifier,
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
        self._notify_executor.shutdown(wait=False, cancel_futures=True)

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
                delivery: Delivery | Notification
                if row.kind == OutboxKind.NOTIFICATION:
                    delivery = Notification(row.id, row.channel or "", dict(row.payload))
                else:
                    delivery = Delivery(row.kind, row.dedup_key, row.routing_key, dict(row.payload))
                claimed.append(_Claimed(row.id, row.kind, row.service, row.rollout_id, delivery))
        return claimed

    async def _send(self, item: _Claimed) -> str | _Interrupted | None:
        """None when delivered, else what went wrong; _Interrupted when stopping first."""
        delivery = item.delivery
        try:
            future: Future[None]
            if isinstance(delivery, Notification):
                overall = self.notifier.overall_timeout(delivery.channel)
                future = self._notify_executor.submit(self.notifier.send, delivery)
            else:
                overall = self.overall_timeout
                future = self._executor.submit(self.sender, delivery)
        except RuntimeError:
            return _Interrupted()  # the executor is shut down
        sent: asyncio.Future[Any] = asyncio.wrap_future(future)
        stopping: asyncio.Future[Any] = asyncio.ensure_future(self._stopping.wait())
        try:
            done, _ = await asyncio.wait(
                {sent, stopping}, timeout=overall, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopping.cancel()
        if sent not in done:
            # Abandoned: the thread ends at the client's timeout; nobody awaits its result.
            sent.add_done_callback(_swallow)
            if self._stopping.is_set():
                return _Interrupted()
            return f"no answer within {overall:g}s"
        error = sent.exception()
        if error is None:
            return None
        if isinstance(error, DeliveryError | NotificationError):
            return str(error)
        log.error("unexpected error delivering outbox row %d: %r", item.id, error)
        return f"unexpected error: {type(error).__name__}"

    async def _record(self, item: _Claimed, error: str | None) -> None:
        if isinstance(item.delivery, Notification):
            await self._record_notification(item, item.delivery, error)
            return
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

    async def _record_notification(
        self, item: _Claimed, notification: Notification, error: str | None
    ) -> None:
        now = self.clock()
        channel = notification.channel
        event = (notification.payload.get("message") or {}).get("event")
        if error is not None:
            # Belt and braces: the sender redacts already; a stray URL never reaches the log.
            error = redact(error, self.notifier.secret_fragments(channel))[:2000]
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
                row.last_error = error
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
                    action=(
                        "notification.delivered" if error is None
                        else "notification.delivery_failed"
                    ),
                    outcome=Outcome.SUCCESS if error is None else Outcome.ERROR,
                    service=item.service,
                    rollout_id=item.rollout_id,
                    details={"channel": channel, "event": event, "attempts": row.attempts,
                             "last_error": row.last_error, "outbox_id": item.id},
                )  # fmt: skip
        self.metrics.notifications.labels(channel, result).inc()
        if error is not None:
            notification_log.warning(
                "notification %d (%s) to channel %s attempt %d failed (%s): %s",
                item.id, event, channel, row.attempts, result, error,
            )  # fmt: skip


def _swallow(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
