"""Durations as ops engineers write them: "30s", "15m", "2h", "1h30m"."""

from __future__ import annotations

import functools
import re
from datetime import timedelta

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
MAX_DURATION = timedelta(days=30)


def parse_duration(text: str) -> timedelta:
    """Parse "90s", "15m", "2h", "1h30m" into a timedelta; raise ValueError otherwise."""
    if not isinstance(text, str) or not text or len(text) > 32:
        raise ValueError("a duration is a string such as '30s', '15m' or '2h'")
    return _parsed(text)


@functools.lru_cache(maxsize=4096)
def _parsed(text: str) -> timedelta:
    # Cached: every controller decision reads the same few durations back from stored policies.
    position = 0
    seconds = 0.0
    for match in _PART.finditer(text):
        if match.start() != position:
            break
        seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if position != len(text):
        raise ValueError(f"{text!r} is not a duration such as '30s', '15m' or '2h'")
    # Checked before a timedelta is built: "99999999999d" is beyond timedelta's range.
    if seconds > MAX_DURATION.total_seconds():
        raise ValueError(f"{text!r} is longer than 30 days")
    return timedelta(seconds=seconds)


@functools.lru_cache(maxsize=4096)
def format_duration(duration: timedelta) -> str:
    """Render a timedelta in the shortest exact form: 1800 s -> "30m", 5400 s -> "1h30m"."""
    # Cached: a view renders the same few durations (steps, interval) on every answer.
    total_ms = round(duration.total_seconds() * 1000)
    if total_ms == 0:
        return "0s"
    parts: list[str] = []
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        count, total_ms = divmod(total_ms, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
