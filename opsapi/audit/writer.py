"""Durable audit writes for requests that change nothing, committed in groups.

A read or a refusal has no state change to share a transaction with; its audit event still
must be durable before the answer leaves. Concurrent requests hand their events to one writer
that inserts whatever has accumulated in a single transaction, then releases them all.

One event the database refuses must not fail the others of its group: a failed group is split
in halves and each half retried, down to single events, so only the event at fault fails
(about 2·log2(n) transactions for one bad event among n). A failure that is not about the
data (the database unreachable) fails the whole group at once instead of retrying it piece
by piece.

Refusals may go through `write_refusal`, which applies the per-caller `RefusalLimiter`:
past the limit they are folded into one aggregated event per caller and minute, written by
this writer when the minute is over and at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from opsapi.audit import chain
from opsapi.audit.limiter import RefusalLimiter
from opsapi.clock import Clock, system_clock
from opsapi.metrics import Metrics

log = logging.getLogger("opsapi.audit")

_Pending = tuple[dict[str, Any], asyncio.Future[None]]
# How often finished minutes of the refusal limiter are written out.
_AGGREGATE_SECONDS = 1.0


class AuditWriter:
    """Group-commits audit events; `write()` returns once the event is committed."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        max_batch: int = 500,
        refusals: RefusalLimiter | None = None,
        clock: Clock = system_clock,
        metrics: Metrics | None = None,
    ) -> None:
        self._engine = engine
        self._max_batch = max_batch
        self._pending: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.refusals = refusals if refusals is not None else RefusalLimiter()
        self._clock = clock
        self._metrics = metrics
        self._unwritten: list[dict[str, Any]] = []  # aggregates whose write failed

    def start(self) -> None:
        """Start the background flusher."""
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Flush what is pending, the refusal aggregates included, and stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        await self._write_aggregates(self.refusals.drain())
        if self._unwritten:
            log.error("%d aggregated refusal events could not be written", len(self._unwritten))

    async def write(self, row: dict[str, Any]) -> None:
        """Commit one event (an `audit.service.event_row`); raises if it could not be."""
        if self._closing or self._task is None:
            async with self._engine.begin() as connection:
                await chain.append(connection, [row])
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((row, future))
        self._wakeup.set()
        await future

    async def write_refusal(self, caller_key: str, row: dict[str, Any]) -> bool:
        """Audit a refusal under the per-caller limit: True once `row` is committed, False when
        it was counted into the caller's aggregate for this minute instead (nothing to wait
        for). Raises, like `write`, if the event could not be committed."""
        if not self.refusals.allow(caller_key, row["at"], row):
            if self._metrics is not None:
                self._metrics.audit_refusals_aggregated.inc()
            return False
        await self.write(row)
        return True

    async def flush_refusals(self) -> int:
        """Write the aggregates of the minutes that are over now; how many were written."""
        return await self._write_aggregates(self.refusals.due(self._clock()))

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), _AGGREGATE_SECONDS)
            self._wakeup.clear()
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                await self._flush(batch)
            if self._closing:
                return
            try:
                await self.flush_refusals()
            except Exception:
                log.exception("could not write the refusal aggregates")

    async def _write_aggregates(self, rows: list[dict[str, Any]]) -> int:
        rows = [*self._unwritten, *rows]
        self._unwritten = []
        if not rows:
            return 0
        try:
            async with self._engine.begin() as connection:
                await chain.append(connection, rows)
        except Exception:
            # Kept and tried again on the next pass: a refusal is never silently dropped.
            log.exception("could not write %d aggregated refusal events", len(rows))
            self._unwritten = rows
            return 0
        return len(rows)

    async def _flush(self, batch: list[_Pending]) -> None:
        error = await self._commit([row for row, _ in batch])
        if error is None:
            for _, future in batch:
                if not future.done():
                    future.set_result(None)
            return
        if len(batch) > 1 and not _unavailable(error):
            middle = len(batch) // 2
            await self._flush(batch[:middle])
            await self._flush(batch[middle:])
            return
        log.error("audit write of %d events failed: %s", len(batch), _describe(error))
        if self._metrics is not None:
            self._metrics.audit_write_failures.inc(len(batch))
        for _, future in batch:
            if not future.done():
                future.set_exception(error)

    async def _commit(self, rows: list[dict[str, Any]]) -> Exception | None:
        try:
            async with self._engine.begin() as connection:
                await chain.append(connection, rows)
        except Exception as error:
            return error
        return None


def _unavailable(error: Exception) -> bool:
    """Whether `error` is about reaching the database rather than about the events."""
    if isinstance(error, sa.exc.DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(
        error, OSError | TimeoutError | sa.exc.InterfaceError | sa.exc.OperationalError
    )


def _describe(error: Exception) -> str:
    # The class and the database's own message, not the statement's parameters: those are
    # the events themselves, possibly large and caller-controlled.
    original = getattr(error, "orig", None) or error
    message = (str(original).splitlines() or [""])[0][:200]
    return f"{type(original).__name__}: {message}"
