"""Per-caller limit on audited refusals: past it, refusals are counted, not stored one by one.

Every refused call is still accounted for. The first `per_minute` refusals of a caller in a
calendar minute (UTC) are audited as usual; the rest of that minute are folded into one
aggregated event (`audit.refusals`) that says how many there were, of which actions,
outcomes, statuses, services and client addresses, and when the first and last came. It is
written once the minute is over (or when the server stops). A caller is whatever key the
pipeline passes: the token's subject, or the client address for a request without one.

Memory is bounded: at most `max_callers` callers are tracked per minute; refusals of further
callers share one bucket (caller `*`), and each aggregate keeps at most 20 distinct values
per breakdown (the rest are counted under `(other)`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from opsapi.audit.models import Outcome, Source
from opsapi.audit.service import event_row

ACTION = "audit.refusals"
OVERFLOW = "*"
_MINUTE = timedelta(minutes=1)
_DISTINCT = 20
_OTHER = "(other)"


@dataclass
class _Window:
    start: datetime
    admitted: int = 0
    folded: int = 0
    first_at: datetime | None = None
    last_at: datetime | None = None
    actor: str | None = None
    roles: list[str] = field(default_factory=list)
    first_request: str | None = None
    last_request: str | None = None
    breakdown: dict[str, Counter[str]] = field(default_factory=dict)

    def fold(self, now: datetime, event: Mapping[str, Any] | None) -> None:
        self.folded += 1
        self.first_at = self.first_at or now
        self.last_at = now
        if event is None:
            return
        if self.actor is None:
            self.actor = event.get("actor")
            self.roles = list(event.get("roles") or [])
        request = event.get("request_id")
        self.first_request = self.first_request or request
        self.last_request = request or self.last_request
        status = (event.get("details") or {}).get("status")
        for name, value in (
            ("actors", event.get("actor")),
            ("actions", event.get("action")),
            ("outcomes", event.get("outcome")),
            ("statuses", None if status is None else str(status)),
            ("services", event.get("service")),
            ("client_addresses", event.get("client_address")),
        ):
            if value is None:
                continue
            counts = self.breakdown.setdefault(name, Counter())
            key = str(value) if str(value) in counts or len(counts) < _DISTINCT else _OTHER
            counts[key] += 1


class RefusalLimiter:
    """Admits `per_minute` audited refusals per caller and minute; counts the rest."""

    def __init__(self, per_minute: int = 30, *, max_callers: int = 10_000) -> None:
        if per_minute < 0 or max_callers < 1:
            raise ValueError("per_minute must be >= 0 and max_callers >= 1")
        self.per_minute = per_minute
        self.max_callers = max_callers
        self._windows: dict[str, _Window] = {}
        self._closed: list[tuple[str, _Window]] = []
        self._latest = datetime.min.replace(tzinfo=UTC)

    def allow(self, caller_key: str, now: datetime, event: Mapping[str, Any] | None = None) -> bool:
        """True: audit this refusal as usual. False: it was counted into the caller's
        aggregate for this minute (`event`, the refusal's `event_row`, adds its breakdown)."""
        start = _minute(now)
        if start > self._latest:
            self._close_stale(start)
            self._latest = start
        window = self._windows.get(caller_key)
        # Requests finish out of order: a late one from the minute before counts in this one.
        if window is None:
            if len(self._windows) >= self.max_callers and caller_key != OVERFLOW:
                return self.allow(OVERFLOW, now, event)
            window = self._windows[caller_key] = _Window(max(start, self._latest))
        if window.admitted < self.per_minute:
            window.admitted += 1
            return True
        window.fold(now, event)
        return False

    def pending(self) -> int:
        """Refusals counted but not yet written in an aggregate."""
        return sum(w.folded for w in self._windows.values()) + sum(
            w.folded for _, w in self._closed
        )

    def due(self, now: datetime) -> list[dict[str, Any]]:
        """The aggregated events (`event_row`s) of every minute that ended by `now`."""
        self._close_stale(_minute(now))
        return self._take()

    def drain(self) -> list[dict[str, Any]]:
        """The aggregated events of every minute, the current one included (at shutdown)."""
        for key, window in list(self._windows.items()):
            self._close(key, window)
        return self._take()

    def _take(self) -> list[dict[str, Any]]:
        closed, self._closed = self._closed, []
        return [_aggregate(key, window, self.per_minute) for key, window in closed]

    def _close(self, key: str, window: _Window) -> None:
        del self._windows[key]
        if window.folded:
            self._closed.append((key, window))

    def _close_stale(self, current: datetime) -> None:
        for key, window in list(self._windows.items()):
            if window.start < current:
                self._close(key, window)


def _minute(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(second=0, microsecond=0)


def _aggregate(key: str, window: _Window, per_minute: int) -> dict[str, Any]:
    assert window.last_at is not None
    assert window.first_at is not None
    outcomes = window.breakdown.get("outcomes", Counter())
    try:
        outcome = Outcome(outcomes.most_common(1)[0][0]) if outcomes else Outcome.DENIED
    except ValueError:
        outcome = Outcome.DENIED
    shared = key == OVERFLOW
    return event_row(
        at=window.last_at,
        actor="(other callers)" if shared else window.actor or key,
        roles=() if shared else window.roles,
        source=Source.API,
        action=ACTION,
        outcome=outcome,
        details={
            "aggregated": True,
            "caller": key,
            "count": window.folded,
            "limit_per_minute": per_minute,
            "window": {"start": _text(window.start), "end": _text(window.start + _MINUTE)},
            "first_at": _text(window.first_at),
            "last_at": _text(window.last_at),
            "request_ids": {"first": window.first_request, "last": window.last_request},
            **{name: dict(counts.most_common()) for name, counts in window.breakdown.items()},
        },
    )


def _text(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
