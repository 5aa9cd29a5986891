"""What an audit event keeps: every value made storable, and details bounded in size.

Storable means the value survives both databases unchanged, so the hash computed before the
insert is the hash of what `verify` reads back later:

- Numbers: PostgreSQL's jsonb keeps the exact decimal a number was written as and renders
  it its own way. A float Python writes with a positive exponent (`1e+23`) comes back as the
  whole number it denotes (`100000000000000000000000`), so it is stored as that integer; `-0.0`
  comes back as `0.0`, so it is stored as `0.0`. `NaN`, `Infinity` and `-Infinity` have no
  JSON form: they are stored as those strings. Integers too large for Python's own decimal
  conversion (over 13,000 bits) are stored as a hex string (`"0x…"`).
- Text: PostgreSQL refuses NUL and UTF-8 cannot carry a lone surrogate (`"\\ud800"` in JSON):
  each such character is replaced by its JSON escape written out as six characters (`\\u0000`,
  `\\ud800`), so a reviewer sees exactly which code unit was sent.
- Anything else that is not JSON (a datetime, a set) becomes its text or a list; nesting
  deeper than 64 levels is replaced by a marker.

Bounded means the details of one event never exceed a budget (4 KiB, or 128 KiB for a
successful, authorised action), measured as canonical JSON. Past it, small entries are kept
whole and large ones are replaced by a cut marker carrying the sha256 and size of the whole
value, so that a reviewer can match what was cut against a copy of the request.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Set
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any

import orjson

# Refused calls and reads: what the caller sent is kept up to this size.
DETAILS_BUDGET = 4 * 1024
# A successful action was authorised and its input validated (a policy change with its
# before and after): keep it whole up to twice the largest request body.
SUCCESS_BUDGET = 128 * 1024
MAX_DEPTH = 64
TRUNCATED = "_truncated"
CUT = "_cut"

_INT_BITS = 13_000  # ~3,900 digits: below Python's 4,300-digit int/str conversion limit
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_HEAD_CHARS = 256
_CUT_OVERHEAD = 128  # a cut marker without its head: {"_cut":true,"bytes":…,"sha256":"…",…}
_SUMMARY_ROOM = 1024  # reserved for the `_truncated` summary
_LISTED_CUTS = 10
_PATH_CHARS = 64
_DESCEND = 2  # levels of objects whose small entries are kept while large ones are cut


def encode(value: Any) -> bytes:
    """Canonical JSON: sorted keys, compact, UTF-8 (the form the hash chain covers)."""
    return canonical_text(value).encode("utf-8", "surrogatepass")


def canonical_text(value: Any) -> str:
    """`encode`'s JSON as text (an `Encoded` value's is not computed again)."""
    if isinstance(value, Encoded):
        return value.text
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def storable_text(value: Any) -> str:
    """`canonical_text` of a value as `storable` leaves it (no NaN or infinity, text without
    lone surrogates), written by orjson (several times faster) wherever it writes exactly what
    the standard library writes: everywhere but floats under 1e-4, which Python writes with an
    exponent of at least two digits (`1e-05`, `1.5e-07`) and orjson in full (`0.00001`) or
    with one digit (`1.5e-7`), and what orjson refuses (integers past 64 bits, keys that are
    not text, other types): the standard library writes those."""
    try:
        written = orjson.dumps(value, option=_SORTED)
    except TypeError:  # orjson's refusal (JSONEncodeError is one)
        return canonical_text(value)
    # Any such float is written "0.0000…" or "…<digit>e-…" by orjson; text that merely looks
    # like one takes the slow way too.
    if _TINY_FLOAT.search(written):
        return canonical_text(value)
    return written.decode()


# Types the standard library refuses are refused here too (then refused by it). Subclasses of
# text and numbers (enum members) are written as their value, as the standard library does.
_SORTED = orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
_TINY_FLOAT = re.compile(rb"0\.0000|[0-9]e-")


class Encoded(dict[str, Any]):
    """Details with their canonical JSON, computed once: `bound` measures it, the hash chain
    covers it and the database stores it. A value, never changed once built."""

    __slots__ = ("text",)

    def __init__(self, details: dict[str, Any], text: str) -> None:
        super().__init__(details)
        self.text = text


def digest(value: Any) -> str:
    """The sha256 of a value's canonical JSON, as a cut marker records it."""
    return hashlib.sha256(encode(value)).hexdigest()


def text(value: str) -> str:
    """`value` with NUL and lone surrogates written out as `\\uXXXX` escapes."""
    if value.isascii() and "\x00" not in value:
        return value
    return _UNSTORABLE.sub(lambda match: f"\\u{ord(match.group()):04x}", value)


def column_text(value: str | None, limit: int) -> str | None:
    """Text for a bounded column: storable, at most `limit` characters."""
    return None if value is None else text(str(value))[:limit]


def storable(value: Any, depth: int = 0) -> Any:
    """A JSON value that both databases store and give back unchanged (see the module doc)."""
    if isinstance(value, str):  # the most common value first; `text`'s check inline
        return value if value.isascii() and "\x00" not in value else text(value)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value) if value.bit_length() <= _INT_BITS else f"{int(value):#x}"
    if isinstance(value, float):
        return _number(value)
    if depth >= MAX_DEPTH:
        return "[nested too deep]"
    if type(value) is dict or isinstance(value, Mapping):  # a dict without the ABC's check
        result: dict[str, Any] = {}
        for key, item in value.items():
            name = (
                key if type(key) is str and key.isascii() and "\x00" not in key else text(str(key))
            )
            while name in result:  # two keys that became one text: keep both
                name += "'"
            result[name] = storable(item, depth + 1)
        return result
    if isinstance(value, list | tuple | Set):
        return [storable(item, depth + 1) for item in value]
    if isinstance(value, Decimal):
        return _number(float(value)) if value.is_finite() else str(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    return text(str(value))


def _number(value: float) -> Any:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    if value == 0:
        return 0.0
    written = repr(value)
    if "e+" in written:
        # Exactly the integer PostgreSQL keeps for the text JSON writes.
        return int(Decimal(written))
    return value


def bound(details: dict[str, Any], budget: int = DETAILS_BUDGET) -> dict[str, Any]:
    """`details` if its canonical JSON fits `budget` bytes; else a structured cut of it.

    The cut keeps small entries whole (smallest first), descends two levels into large
    objects, and replaces other large values by `{"_cut": true, "bytes", "sha256", "head"}`
    (`head`: the start of its canonical JSON). `_truncated` then says how large the whole
    was, its sha256, which values were cut (`cut`), and how many entries were left out
    (`dropped`) of which objects (`partial`).
    """
    text = storable_text(details)
    whole = text.encode("utf-8", "surrogatepass")
    if len(whole) <= budget:
        return Encoded(details, text)
    cutter = _Cutter()
    kept = cutter.fit(details, max(budget - _SUMMARY_ROOM, 2), "", 0)
    summary: dict[str, Any] = {
        "bytes": len(whole),
        "sha256": hashlib.sha256(whole).hexdigest(),
        "budget": budget,
        "cut": cutter.paths[:_LISTED_CUTS],
    }
    if len(cutter.paths) > _LISTED_CUTS:
        summary["cut_unlisted"] = len(cutter.paths) - _LISTED_CUTS
    if cutter.dropped:
        summary["dropped"] = cutter.dropped  # entries left out, not even a marker
        summary["partial"] = cutter.partial[:_LISTED_CUTS]  # the objects they were left out of
    result = {**kept, TRUNCATED: summary}
    text = canonical_text(result)
    if len(text.encode("utf-8", "surrogatepass")) > budget:
        # Only with absurd keys: keep the summary alone.
        result = {TRUNCATED: {**summary, "cut": [], "dropped": len(details)}}
        text = canonical_text(result)
    return Encoded(result, text)


class _Cutter:
    def __init__(self) -> None:
        self.paths: list[str] = []
        self.partial: list[str] = []
        self.dropped = 0

    def fit(self, value: dict[str, Any], room: int, path: str, depth: int) -> dict[str, Any]:
        """The entries of `value` that fit `room` bytes: small ones whole, large ones cut."""
        entries = sorted(
            ((key, item, len(encode(key)) + 2, encode(item)) for key, item in value.items()),
            key=lambda entry: (len(entry[3]), entry[0]),
        )
        # An entry larger than a quarter of the room is cut (each gets an equal share of what
        # the small ones leave); room for a few of those markers is kept from the small ones.
        large = [entry for entry in entries if len(entry[3]) > room // 4]
        small = entries[: len(entries) - len(large)]
        reserve = min(len(large), 4) * (_CUT_OVERHEAD + 32)
        kept: dict[str, Any] = {}
        used = 2  # {}
        left_out = 0
        for key, item, key_size, encoded in small:
            if used + key_size + len(encoded) <= room - reserve:
                kept[key] = item
                used += key_size + len(encoded)
            else:
                left_out += 1
        for index, (key, item, key_size, encoded) in enumerate(large):
            share = (room - used) // (len(large) - index) - key_size
            where = f"{path}.{key}" if path else key
            if isinstance(item, dict) and depth < _DESCEND and share >= 2 * _CUT_OVERHEAD:
                kept[key] = self.fit(item, share, where, depth + 1)
            elif share >= _CUT_OVERHEAD:
                kept[key] = _cut_marker(encoded, share - _CUT_OVERHEAD)
                self.paths.append(where[:_PATH_CHARS])
            else:
                left_out += 1
                continue
            used += key_size + len(encode(kept[key]))
        if left_out:
            self.dropped += left_out
            self.partial.append(path[:_PATH_CHARS] or "(top)")
        return {key: kept[key] for key in value if key in kept}


def _cut_marker(encoded: bytes, head_room: int) -> dict[str, Any]:
    head = encoded.decode("utf-8", "surrogatepass")[: min(_HEAD_CHARS, head_room)]
    while head and len(encode(head)) > head_room:  # escaping can make it longer
        head = head[: len(head) // 2]
    return {
        CUT: True,
        "bytes": len(encoded),
        "sha256": hashlib.sha256(encoded).hexdigest(),
        "head": head,
    }
