"""Small helpers for query parameters and timestamps in answers."""

from __future__ import annotations

from datetime import datetime

from starlette.requests import Request

from opsapi.errors import Unprocessable


def int_param(request: Request, name: str, *, default: int, low: int, high: int) -> int:
    """A whole-number query parameter within [low, high], or 422."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise Unprocessable(f"{name} must be a whole number from {low} to {high}")
    return int(raw)


def iso(value: datetime | None) -> str | None:
    """An RFC 3339 UTC timestamp with a Z suffix."""
    return value.isoformat().replace("+00:00", "Z") if value else None
