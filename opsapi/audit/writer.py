"""Durable audit writes for requests that change nothing, committed in groups.

A read or a refusal has no state change to share a transaction with; its audit event still
must be durable before the answer leaves. Concurrent requests hand their events to one writer
that inserts whatever has accumulated in a single transaction, then releases them all.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from opsapi.audit import chain

log = logging.getLogger("opsapi.audit")


class AuditWriter:
    """Group-commits audit events; `write()` returns once the event is committed."""

    def __init__(self, engine: AsyncEngine, *, max_batch: int = 500) -> None:
        self._engine = engine
        self._max_batch = max_batch
        self._pending: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        """Start the background flusher."""
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Flush what is pending and stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task

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

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                await self._flush(batch)
            if self._closing:
                return

    async def _flush(self, batch: list[tuple[dict[str, Any], asyncio.Future[None]]]) -> None:
        try:
            async with self._engine.begin() as connection:
                await chain.append(connection, [row for row, _ in batch])
        except Exception as error:
            log.exception("audit batch of %d events failed", len(batch))
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for _, future in batch:
            if not future.done():
                future.set_result(None)
