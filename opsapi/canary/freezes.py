"""Freeze windows: when starts and promotions of a service are held (DESIGN §12). Pure.

A window is absolute (`starts_at` … `ends_at`) or recurring (a cron expression for its start in
its time zone, and a duration): "every Friday 17:00 Europe/Berlin for 64 hours". Services are
named, or `*` for all. Rollback and revert are never held.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from croniter import croniter
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from opsapi.canary.machine import Hold, HoldKind
from opsapi.canary.policy import SERVICE_NAME, Duration
from opsapi.durations import format_duration

ALL_SERVICES = "*"
SERVICE_OR_ALL = r"^(\*|" + SERVICE_NAME.pattern.strip("^$") + r")$"


@dataclass(frozen=True)
class FreezeWindow:
    """One freeze window; `source` says where it was set (`server` file or `api`)."""

    name: str
    services: tuple[str, ...]
    reason: str
    starts_at: datetime | None = None
    ends_at: datetime | None = None
    cron: str | None = None
    duration: timedelta | None = None
    timezone: str = "UTC"
    source: str = "server"
    id: int | None = None

    def covers(self, service: str) -> bool:
        """Whether the window applies to `service`."""
        return ALL_SERVICES in self.services or service in self.services

    def active_until(self, now: datetime) -> datetime | None:
        """When the occurrence of the window that holds `now` ends; None when none holds it."""
        if self.cron is not None and self.duration is not None:
            local = now.astimezone(ZoneInfo(self.timezone))
            # The latest start at or before now (a start exactly now counts).
            start: datetime = croniter(self.cron, local + timedelta(seconds=1)).get_prev(datetime)
            end = start + self.duration
            return end if start <= local < end else None
        if self.starts_at is not None and self.ends_at is not None:
            return self.ends_at if self.starts_at <= now < self.ends_at else None
        return None

    def next_start(self, now: datetime) -> datetime | None:
        """When the window next begins after `now` (None for a past absolute window)."""
        if self.cron is not None:
            local = now.astimezone(ZoneInfo(self.timezone))
            start: datetime = croniter(self.cron, local).get_next(datetime)
            return start
        if self.starts_at is not None and self.starts_at > now:
            return self.starts_at
        return None


def check_window(
    *,
    starts_at: datetime | None,
    ends_at: datetime | None,
    cron: str | None,
    duration: timedelta | None,
    timezone: str,
) -> list[str]:
    """What is wrong with a window's timing (empty when it is usable)."""
    problems = []
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        problems.append("timezone: not an IANA time zone such as Europe/Berlin")
    absolute = starts_at is not None or ends_at is not None
    recurring = cron is not None or duration is not None
    if absolute == recurring:
        problems.append("give either starts_at and ends_at, or cron and duration")
    if absolute and (starts_at is None or ends_at is None or ends_at <= starts_at):
        problems.append("ends_at must follow starts_at")
    if recurring:
        if cron is None or not croniter.is_valid(cron):
            problems.append("cron: not a cron expression such as '0 17 * * FRI'")
        if duration is None or duration <= timedelta(0):
            problems.append("duration: must be positive")
    return problems


def holds_for(service: str, windows: Iterable[FreezeWindow], now: datetime) -> list[Hold]:
    """The freeze windows holding `service` at `now`, as machine holds."""
    holds = []
    for window in windows:
        until = window.active_until(now) if window.covers(service) else None
        if until is not None:
            left = format_duration(timedelta(seconds=int((until - now).total_seconds())))
            detail = f"freeze window {window.name!r} until {until.isoformat()} ({left} left)"
            if window.reason:
                detail += f": {window.reason}"
            holds.append(Hold(HoldKind.FROZEN, detail, until))
    return holds


def describe(window: FreezeWindow, now: datetime) -> dict[str, object]:
    """A window as `GET /freezes` shows it."""
    until = window.active_until(now)
    upcoming = window.next_start(now)
    return {
        "id": window.id,
        "name": window.name,
        "source": window.source,
        "services": list(window.services),
        "reason": window.reason,
        "starts_at": window.starts_at.isoformat() if window.starts_at else None,
        "ends_at": window.ends_at.isoformat() if window.ends_at else None,
        "cron": window.cron,
        "duration": format_duration(window.duration) if window.duration else None,
        "timezone": window.timezone,
        "active": until is not None,
        "active_until": until.isoformat() if until else None,
        "next_start": upcoming.isoformat() if upcoming else None,
    }


def sorted_windows(windows: Sequence[FreezeWindow]) -> list[FreezeWindow]:
    """Server-configured windows first, then the API's by id."""
    return sorted(windows, key=lambda w: (w.source != "server", w.id or 0, w.name))


class FreezeSpec(BaseModel):
    """A freeze window as written in the freezes file or a `POST /freezes` body."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,99}$")
    services: list[Annotated[str, Field(pattern=SERVICE_OR_ALL)]] = Field(
        min_length=1, max_length=200
    )
    reason: str = Field(min_length=1, max_length=2000)
    starts_at: AwareDatetime | None = None
    ends_at: AwareDatetime | None = None
    cron: str | None = Field(default=None, max_length=100)
    duration: Duration | None = None
    timezone: str = Field(default="UTC", max_length=64)

    @model_validator(mode="after")
    def _usable(self) -> FreezeSpec:
        problems = check_window(starts_at=self.starts_at, ends_at=self.ends_at, cron=self.cron,
                                duration=self.duration, timezone=self.timezone)  # fmt: skip
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def window(self, *, source: str, id: int | None = None) -> FreezeWindow:
        """The window this spec describes."""
        return FreezeWindow(
            name=self.name,
            services=tuple(self.services),
            reason=self.reason,
            starts_at=self.starts_at,
            ends_at=self.ends_at,
            cron=self.cron,
            duration=self.duration,
            timezone=self.timezone,
            source=source,
            id=id,
        )


class FreezesFileError(ValueError):
    """The freezes file cannot be used (the message names the window and the problem)."""


def load_freezes(path: Path | None) -> list[FreezeWindow]:
    """The server's freeze windows from `OPSAPI_FREEZES_FILE` (JSON or YAML list); none without."""
    if path is None:
        return []
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise FreezesFileError(f"freezes file {path}: cannot read it ({error.__class__.__name__})"
                               ) from None  # fmt: skip
    if data is None:
        return []
    if not isinstance(data, list):
        raise FreezesFileError(f"freezes file {path}: must be a list of windows")
    windows = []
    for index, item in enumerate(data):
        try:
            windows.append(FreezeSpec.model_validate(item).window(source="server"))
        except ValidationError as error:
            first = error.errors(include_input=False, include_url=False)[0]
            where = ".".join(str(part) for part in first["loc"]) or "window"
            raise FreezesFileError(
                f"freezes file {path}: window {index}: {where}: {first['msg']}"
            ) from None
    return windows
