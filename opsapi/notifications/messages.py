"""What a notification says: a `Message` (plain facts of one transition) rendered to a title and
a body. Pure: no I/O, no configuration but the public URL passed in.

The same message is stored in the outbox row (`as_dict`) and rendered at delivery, so a row
survives restarts and upgrades as data, not as pre-formatted text.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

EVENTS = (
    "started",
    "awaiting_promotion",
    "promoted",
    "paused",
    "resumed",
    "succeeded",
    "rolled_back",
    "reverted",
    "router_failed",
    "gate_failing",
)
EventName = Literal[
    "started",
    "awaiting_promotion",
    "promoted",
    "paused",
    "resumed",
    "succeeded",
    "rolled_back",
    "reverted",
    "router_failed",
    "gate_failing",
]
Severity = Literal["info", "success", "warning", "failure"]

API_PREFIX = "/internal/ops"
REASON_LIMIT = 1000

_SEVERITY: dict[str, Severity] = {
    "started": "info",
    "awaiting_promotion": "info",
    "promoted": "info",
    "paused": "warning",
    "resumed": "info",
    "succeeded": "success",
    "rolled_back": "failure",
    "reverted": "warning",
    "router_failed": "failure",
    "gate_failing": "warning",
}


@dataclass(frozen=True)
class Message:
    """The facts of one transition worth telling; `reverted` names the version reverted as the
    canary and the version restored as the stable one."""

    event: str
    service: str
    rollout_id: int | None
    state: str
    canary_version: str
    stable_version: str | None
    canary_slot: str | None
    stable_slot: str | None
    weight: int
    triggered_by: str  # user, controller, pagerduty, system
    actor: str  # who: a token's subject, "controller", "pagerduty" …
    reason: str | None

    def __post_init__(self) -> None:
        if self.event not in EVENTS:
            raise ValueError(f"unknown notification event {self.event!r}")

    @property
    def path(self) -> str:
        """Where the API shows the rollout."""
        return f"{API_PREFIX}/canary/{self.service}"

    def link(self, public_url: str | None) -> str:
        """The rollout's address: absolute under `public_url`, else just the path."""
        return public_url.rstrip("/") + self.path if public_url else self.path

    def as_dict(self) -> dict[str, Any]:
        """The message as JSON-ready data (what the outbox row stores)."""
        # Every field is a scalar: a plain copy is what `asdict`'s deep copy would give, without
        # a deep copy per field on every notifying transition.
        return {name: getattr(self, name) for name in _FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Message:
        """The message `as_dict` stored (unknown keys ignored: a newer writer may add some)."""
        names = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


_FIELDS = tuple(field.name for field in fields(Message))


@dataclass(frozen=True)
class Rendered:
    """A message as people read it."""

    title: str
    body: str
    severity: Severity
    link: str


def render(message: Message, public_url: str | None) -> Rendered:
    """Title and body of `message`: service, versions, slot, weight, who/what and why, link."""
    link = message.link(public_url)
    body = [
        f"Service: {message.service}",
        f"Canary: {message.canary_version}{_slot(message.canary_slot)}, "
        f"at {message.weight}% of traffic",
        f"Stable: {message.stable_version or 'unknown'}{_slot(message.stable_slot)}",
        f"State: {message.state}",
        f"By: {_who(message)}",
    ]
    if message.reason:
        body.append(f"Reason: {_clip(message.reason)}")
    rollout = f"Rollout #{message.rollout_id}" if message.rollout_id is not None else "Rollout"
    body.append(f"{rollout}: {link}")
    return Rendered(_one_line(_title(message)), "\n".join(body), _SEVERITY[message.event], link)


def _title(m: Message) -> str:
    canary = f"canary {m.canary_version}"
    stable = m.stable_version or "the stable version"
    match m.event:
        case "started":
            return f"{m.service}: {canary} started at {m.weight}%"
        case "awaiting_promotion":
            return f"{m.service}: {canary} at {m.weight}% is ready and awaits promotion"
        case "promoted":
            return f"{m.service}: {canary} promoted to {m.weight}%"
        case "paused":
            return f"{m.service}: {canary} paused at {m.weight}%"
        case "resumed":
            return f"{m.service}: {canary} resumed at {m.weight}%"
        case "succeeded":
            return f"{m.service}: {canary} succeeded and is now stable"
        case "rolled_back":
            return f"{m.service}: {canary} rolled back, traffic back to {stable}"
        case "reverted":
            return f"{m.service}: {m.canary_version} reverted, traffic back to {stable}"
        case "router_failed":
            return f"{m.service}: router failing to apply {m.weight}% for {canary}"
        case _:  # gate_failing
            return f"{m.service}: gate failing for {canary} at {m.weight}%"


def _who(m: Message) -> str:
    return m.actor if m.actor == m.triggered_by else f"{m.actor} ({m.triggered_by})"


def _slot(slot: str | None) -> str:
    return f" in slot {slot}" if slot else ""


def _clip(text: str) -> str:
    return text if len(text) <= REASON_LIMIT else text[: REASON_LIMIT - 1] + "…"


def _one_line(text: str) -> str:
    return " ".join(text.split())
