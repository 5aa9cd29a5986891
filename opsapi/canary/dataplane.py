"""The data plane: `GET /canary/{service}/weight`, which application instances poll (DESIGN §11).

Answers come from an in-process copy of each service's weight document, fetched from the database
once per change: a change to what the answer shows makes the database itself (triggers on
`rollout` and `service`, migration 0014) send `NOTIFY opsapi_weights, '<service>'`, delivered
when the changing transaction commits, and each replica's listener drops its copy and wakes the
long polls of that service (SQLite, one process: the interpreter invalidates directly). While
the listener is down (reconnecting), copies live one second.

An answer carries an `ETag` (a digest of the document); `If-None-Match` with the current tag is
answered 304 without touching the database, and `?wait=30s` keeps a 304-bound poll open until the
document changes (or the wait ends). Polls are audited as one event per caller, service and
minute (count, first and last poll), not one row per poll; control-plane reads stay per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger("opsapi.dataplane")
CHANNEL = "opsapi_weights"
UNLISTENED_TTL = 1.0  # seconds a copy lives while no listener keeps it fresh
_LOADS = 3  # loads of one copy while changes keep landing during them
# Pauses before recording a fetch again after a failure (a deadlock broken by PostgreSQL, a
# connection lost): a client that fetched once and keeps its copy may not fetch again soon.
RECORD_RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class WeightDocument:
    """One service's weight answer as JSON bytes, with its entity tag."""

    body: bytes
    etag: str
    rollout_id: int | None
    generation: int | None
    # Whether the pull router serves this rollout (a fetch of it then counts as applied).
    pull: bool = False

    @classmethod
    def of(cls, document: dict[str, Any], *, generation: int | None, pull: bool) -> WeightDocument:
        """The document as served (compact JSON) and its tag."""
        body = json.dumps(document, separators=(",", ":"), sort_keys=True).encode()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        return cls(body, etag, document.get("rollout_id"), generation, pull)


@dataclass
class _Entry:
    document: WeightDocument
    loaded_at: float


Loader = Callable[[str], Awaitable[WeightDocument]]
# Records that a client fetched (rollout id, generation); whether this call recorded it.
FetchRecorder = Callable[[int, int], Awaitable[bool]]


class WeightCache:
    """Each service's current weight document, loaded once per change."""

    def __init__(self, *, record_retry_delays: tuple[float, ...] = RECORD_RETRY_DELAYS) -> None:
        self._entries: dict[str, _Entry] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._loading: dict[str, asyncio.Future[WeightDocument]] = {}
        # Changes announced per service, so that a load knows whether one landed meanwhile.
        self._versions: dict[str, int] = {}
        # False while no database listener keeps copies fresh (SQLite keeps them fresh itself).
        self.listening = False
        # The (rollout, generation) of each service whose first fetch this replica recorded.
        self._fetched: dict[str, tuple[int, int]] = {}
        self._recording: set[asyncio.Task[None]] = set()
        self._record_retry_delays = record_retry_delays

    async def get(self, service: str, load: Loader) -> WeightDocument:
        """The current document (loaded once even when many polls ask at the same moment)."""
        entry = self._entries.get(service)
        if entry is not None and (
            self.listening or time.monotonic() - entry.loaded_at < UNLISTENED_TTL
        ):
            return entry.document
        pending = self._loading.get(service)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[WeightDocument] = asyncio.get_running_loop().create_future()
        self._loading[service] = future
        try:
            for _ in range(_LOADS):
                version = self._versions.get(service, 0)
                document = await load(service)
                # A change announced while this load ran may not be in what it read: kept,
                # that copy would hide the change from every poll until the next one.
                current = self._versions.get(service, 0) == version
                if current:
                    break
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # retrieved: waiters re-raise it, nobody logs it twice
            raise
        finally:
            self._loading.pop(service, None)
        if current:  # (changing faster than it loads: answered, not kept)
            self._entries[service] = _Entry(document, time.monotonic())
        future.set_result(document)
        return document

    def fetched(self, service: str, document: WeightDocument, record: FetchRecorder) -> None:
        """A client now holds `document`: for the pull router, its generation is applied
        (DESIGN §11). Recorded once per generation and replica, in the background (the poll
        does not wait for a write); a failed recording is tried again a few times, then by the
        next fetch."""
        if not document.pull or document.rollout_id is None or document.generation is None:
            return
        key = (document.rollout_id, document.generation)
        if self._fetched.get(service) == key:
            return
        self._fetched[service] = key
        task = asyncio.create_task(self._record_fetch(service, key, record))
        self._recording.add(task)
        task.add_done_callback(self._recording.discard)

    async def settle(self) -> None:
        """Wait for the fetches being recorded now (shutdown, tests)."""
        while self._recording:
            await asyncio.gather(*self._recording, return_exceptions=True)

    async def _record_fetch(
        self, service: str, key: tuple[int, int], record: FetchRecorder
    ) -> None:
        for delay in (*self._record_retry_delays, None):
            try:
                await record(*key)
                return
            except Exception as error:
                log.warning(
                    "recording a fetch of %s failed: %s: %s",
                    service, error.__class__.__name__, str(error)[:200],
                )  # fmt: skip
            if delay is None or self._fetched.get(service) != key:
                break  # out of attempts, or a newer generation is being recorded instead
            await asyncio.sleep(delay)
        if self._fetched.get(service) == key:
            del self._fetched[service]  # the next fetch tries again

    def invalidate(self, service: str) -> None:
        """The service's document changed: drop the copy, wake its long polls."""
        self._versions[service] = self._versions.get(service, 0) + 1
        self._entries.pop(service, None)
        event = self._changed.pop(service, None)
        if event is not None:
            event.set()

    def invalidate_all(self) -> None:
        """Everything may have changed (the listener reconnected)."""
        for service in list(self._entries) + list(self._changed):
            self.invalidate(service)

    async def wait_change(self, service: str, etag: str, seconds: float, load: Loader) -> bool:
        """Wait up to `seconds` for the document to differ from `etag`; whether it did."""
        deadline = time.monotonic() + seconds
        while True:
            if (await self.get(service, load)).etag != etag:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            event = self._changed.setdefault(service, asyncio.Event())
            # Without a listener, look again each second (copies expire that fast).
            wait = left if self.listening else min(left, UNLISTENED_TTL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), wait)


class Listener:
    """Listens for `NOTIFY opsapi_weights` on its own connection; reconnects when it drops."""

    def __init__(self, engine: AsyncEngine, cache: WeightCache) -> None:
        self._dsn = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._cache = cache
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start listening in the background."""
        self._task = asyncio.create_task(self._run(), name="weights-listener")

    async def stop(self) -> None:
        """Stop listening."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            connection: asyncpg.Connection | None = None
            try:
                connection = await asyncpg.connect(self._dsn, timeout=5)
                lost = asyncio.Event()
                connection.add_termination_listener(_setter(lost))
                await connection.add_listener(CHANNEL, self._notified)
                # Anything may have changed while nobody listened.
                self._cache.invalidate_all()
                self._cache.listening = True
                await lost.wait()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("weights listener: %s; retrying", error.__class__.__name__)
            finally:
                self._cache.listening = False
                if connection is not None and not connection.is_closed():
                    with contextlib.suppress(Exception):
                        await connection.close(timeout=2)
            await asyncio.sleep(1)

    def _notified(self, _connection: Any, _pid: int, _channel: str, service: str) -> None:
        self._cache.invalidate(service)


def _setter(event: asyncio.Event) -> Callable[[Any], None]:
    return lambda _connection: event.set()


@dataclass(frozen=True)
class Poll:
    """One read to count: who made it, of which service and rollout, from where, when."""

    caller: str
    roles: list[str]
    service: str
    rollout_id: int | None
    address: str | None
    at: datetime

    @property
    def key(self) -> tuple[str, str, str]:
        """The (caller, service, minute) it is counted under."""
        return (self.caller, self.service, minute_of(self.at))


def minute_of(at: datetime) -> str:
    """The minute of `at` as polls are counted under it: `at.strftime("%Y-%m-%dT%H:%M")`."""
    if at.year < 1000:
        return at.strftime("%Y-%m-%dT%H:%M")  # the format below pads the year; strftime not
    # A third of strftime's cost (1.5 against 5.3 us here), on every poll.
    return f"{at.year}-{at.month:02}-{at.day:02}T{at.hour:02}:{at.minute:02}"


@dataclass
class _Polls:
    count: int
    first: datetime
    last: datetime
    address: str | None
    roles: list[str] = field(default_factory=list)
    rollout_id: int | None = None


class PollAudit:
    """Counts polls per (caller, service, minute); `drain()` gives the minutes that are over."""

    def __init__(self) -> None:
        self._polls: dict[tuple[str, str, str], _Polls] = {}

    def count(self, poll: Poll) -> None:
        """Count one poll."""
        key = poll.key
        polls = self._polls.get(key)
        if polls is None:
            self._polls[key] = _Polls(1, poll.at, poll.at, poll.address,
                                           sorted(poll.roles), poll.rollout_id)  # fmt: skip
            return
        if polls.count == 0:
            polls.first = poll.at
        polls.count += 1
        polls.last = max(polls.last, poll.at)
        polls.rollout_id = poll.rollout_id

    def repeat(self, poll: Poll) -> bool:
        """Whether this read repeats one the caller made of the service this minute (then it is
        counted); the first of each minute is not (it is audited on its own)."""
        key = poll.key
        if key not in self._polls:
            self._polls[key] = _Polls(0, poll.at, poll.at, poll.address,
                                           sorted(poll.roles), poll.rollout_id)  # fmt: skip
            return False
        self.count(poll)
        return True

    def drain(self, now: datetime | None = None) -> list[dict[str, Any]]:
        """Audit-event fields for every minute before `now`'s (all minutes when None)."""
        current = minute_of(now) if now is not None else None
        rows = []
        for key in sorted(self._polls):
            caller, service, minute = key
            if current is not None and minute >= current:
                continue
            polls = self._polls.pop(key)
            if polls.count == 0:
                continue
            rows.append({
                "at": polls.last,
                "actor": caller,
                "roles": polls.roles,
                "service": service,
                "rollout_id": polls.rollout_id,
                "client_address": polls.address,
                "details": {"minute": minute, "polls": polls.count,
                            "first": polls.first.isoformat(), "last": polls.last.isoformat()},
            })  # fmt: skip
        return rows
