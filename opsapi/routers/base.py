"""The router protocol: apply a canary percentage for a service, read back the applied one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


class RouterError(Exception):
    """Applying or reading a weight failed. The message is safe to show and to audit."""


@dataclass(frozen=True)
class RouteTarget:
    """What a router acts on: one service, with that service's parameters from its policy."""

    service: str
    rollout_id: int | None = None
    params: dict[str, Any] = field(default_factory=dict)


class Router(Protocol):
    """One configured router instance (server configuration, never API input)."""

    name: str

    def check_params(self, params: dict[str, Any]) -> list[dict[str, str]]:
        """Field errors (`{"field", "message"}`) for a policy's parameters; empty when valid."""
        ...

    async def apply(self, target: RouteTarget, weight: int) -> None:
        """Send `weight` % of the service's traffic to the canary; raise RouterError on failure.

        Returns only once the new weight is live (confirmed), never merely requested.
        """
        ...

    async def read_back(self, target: RouteTarget) -> int | None:
        """The canary percentage live now, or None when the router cannot tell."""
        ...

    async def health(self) -> str:
        """A one-line description of the router's reachability; RouterError when it is down."""
        ...
