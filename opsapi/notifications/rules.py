"""A service policy's `notify` rules: which channels hear which of its rollout events.

    "notify": [{"channel": "ops-alerts", "events": ["rolled_back", "succeeded"]},
               {"channel": "audit-mail"}]                       # no `events`: every event

Channels themselves are server configuration (`opsapi.notifications.channels`); a rule only
names one, and `check_rules` refuses a name the server does not know.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from opsapi.notifications.messages import EventName

CHANNEL_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"


def _distinct(events: list[EventName] | None) -> list[EventName] | None:
    if events is not None and len(set(events)) != len(events):
        raise ValueError("events must not repeat")
    return events


class NotifyRule(BaseModel):
    """One channel and the events it hears (`events` unset: all of them)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    channel: str = Field(pattern=CHANNEL_NAME)
    events: Annotated[list[EventName] | None, AfterValidator(_distinct)] = Field(
        default=None, min_length=1
    )

    def hears(self, event: str) -> bool:
        """Whether this rule's channel is told about `event`."""
        return self.events is None or event in self.events


def check_rules(rules: Iterable[NotifyRule], channels: Collection[str]) -> list[dict[str, str]]:
    """Problems of `rules` against the configured channel names, as `{"field", "message"}`."""
    problems: list[dict[str, str]] = []
    seen: set[str] = set()
    known = ", ".join(sorted(channels)) or "none"
    for index, rule in enumerate(rules):
        field = f"notify.{index}.channel"
        if rule.channel not in channels:
            message = f"unknown channel {rule.channel!r}; configured channels: {known}"
            problems.append({"field": field, "message": message})
        elif rule.channel in seen:
            message = f"channel {rule.channel!r} is listed twice; merge its events into one rule"
            problems.append({"field": field, "message": message})
        seen.add(rule.channel)
    return problems


def channels_for(rules: Iterable[NotifyRule], event: str) -> list[str]:
    """The channels that hear `event`, in rule order, each once."""
    found: list[str] = []
    for rule in rules:
        if rule.hears(event) and rule.channel not in found:
            found.append(rule.channel)
    return found
