"""The gate provider protocol: measure a query → a value, or no data. Never raises."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Measurement:
    """A query's value, or None with the reason there is no data."""

    value: float | None
    error: str | None = None

    @property
    def has_data(self) -> bool:
        return self.value is not None


class GateProvider(Protocol):
    async def measure(self, query: str) -> Measurement:
        """The query's single value now; an outage or empty answer is no data, never an error."""
        ...


class NoProvider:
    """Used when no metrics backend is configured: every query is no data."""

    async def measure(self, query: str) -> Measurement:
        """Always no data."""
        return Measurement(None, "no metrics backend configured (OPSAPI_PROMETHEUS_URL)")
