"""A verified-token cache: the same bearer token is not re-verified on every request."""

from __future__ import annotations

import base64
import json
import time
from collections import OrderedDict
from collections.abc import Callable

from opsapi.auth.identity import Identity
from opsapi.auth.tokens import TokenVerifier


class CachedVerifier:
    """Remembers successful verifications until the token expires, at most `ttl_seconds`.

    The TTL bounds how long a token signed by a key since removed from the JWKS stays usable.
    Failures are never cached, so a refused token costs a full verification every time.
    """

    def __init__(
        self,
        inner: TokenVerifier,
        *,
        ttl_seconds: float = 60.0,
        max_entries: int = 4096,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._inner = inner
        self._ttl = ttl_seconds
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[Identity, float]] = OrderedDict()

    async def verify(self, token: str) -> Identity:
        """The token's identity, from the cache while it is valid."""
        now = self._clock()
        cached = self._entries.get(token)
        if cached is not None and now < cached[1]:
            self._entries.move_to_end(token)
            return cached[0]
        identity = await self._inner.verify(token)
        self._entries[token] = (identity, min(now + self._ttl, _expiry(token, now)))
        if len(self._entries) > self._max:
            self._entries.popitem(last=False)
        return identity


def _expiry(token: str, now: float) -> float:
    # Only reached for a token the inner verifier accepted, so its payload is well-formed.
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError):
        return now
