"""Webhook router: a signed POST to the user's own system, which moves the traffic itself.

Each apply is one POST of a JSON body (compact, keys sorted; shown here spread out)::

    {"canary_percent": 25, "canary_slot": "green", "canary_version": "v3",
     "rollout_id": 42, "service": "checkout", "stable_slot": "blue",
     "stable_version": "v2", "state": "progressing", "weights": {"blue": 75, "green": 25}}

The receiver routes by version, never by position: `weights` gives each slot's percentage (the
slots are `blue` and `green`; the canary slot gets `canary_percent`, the other slot the rest) and
the versions say what runs where. Consecutive releases alternate slots: after a success
`stable_slot` equals `canary_slot`, and the next rollout's canary is in the other slot.
`rollout_id`, the versions and `state` may be null when unknown.

Headers:

- `X-Opsapi-Timestamp`: Unix time in seconds, as a decimal string;
- `X-Opsapi-Signature`: `sha256=` + hex HMAC-SHA256, keyed with the instance's secret, of the
  bytes `<timestamp>.<raw body>` (the timestamp header's value, a dot, the body exactly as sent).

A receiver recomputes the HMAC over the raw body it received, compares in constant time, and
rejects a timestamp more than a few minutes from its clock: signing the timestamp is what makes an
old, captured request unusable later. Any 2xx means applied (the receiver must answer only once the
weight is live); anything else, a redirect included, or a network error raises RouterError. There
are no retries here (the outbox retries) and `read_back` cannot tell: it returns None.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from typing import Any

import httpx

from opsapi.canary.policy import is_service_name
from opsapi.routers.base import RouterError, RouteTarget, slot_weights

SIGNATURE_HEADER = "X-Opsapi-Signature"
TIMESTAMP_HEADER = "X-Opsapi-Timestamp"


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """The `X-Opsapi-Signature` value for `body` sent at `timestamp`."""
    digest = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def redact_url(url: str) -> str:
    """`url` without credentials, query or fragment: safe for messages and reprs."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "<invalid url>"
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.scheme}://{parsed.host}{port}{parsed.path}"


def payload(target: RouteTarget, weight: int) -> bytes:
    """The JSON body announcing `weight` % for the target's canary slot (see the module doc)."""
    weights = slot_weights(target, weight)
    body: dict[str, Any] = {
        "service": target.service,
        "rollout_id": target.rollout_id,
        "canary_percent": weight,
        "canary_slot": target.canary_slot,
        "stable_slot": target.stable_slot,
        "canary_version": target.canary_version,
        "stable_version": target.stable_version,
        "state": target.state,
        "weights": weights,
    }
    if target.valid_until is not None:
        # Epoch seconds after which, unrenewed, the receiver must send everything to stable.
        body["valid_until"] = target.valid_until
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


class WebhookRouter:
    """Posts each weight change, signed, to the instance's URL."""

    # A 2xx says the receiver took the weight; nothing can be read back to confirm it.
    confirms = False
    # The payload carries `valid_until`: a receiver falls back to stable once it has passed.
    holds_lease = True

    def __init__(
        self,
        name: str,
        url: str,
        secret: str,
        timeout: float = 5.0,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL:
            raise ValueError("url must be an http:// or https:// URL with a host") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError("url must be an http:// or https:// URL with a host")
        self.name = name
        self.url = url
        self.timeout = timeout
        self._secret = secret.encode()
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    def __repr__(self) -> str:
        return f"WebhookRouter(name={self.name!r}, url={redact_url(self.url)!r})"

    def check_params(self, params: dict[str, Any]) -> list[dict[str, str]]:
        """A webhook router takes no per-service parameters."""
        return [
            {"field": f"router.{key}", "message": "a webhook router takes no parameters"}
            for key in sorted(params, key=str)
        ]

    async def health(self) -> str:
        """The receiver's host accepts a TCP connection (no request is sent)."""
        url = httpx.URL(self.url)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            async with asyncio.timeout(self.timeout):
                _, writer = await asyncio.open_connection(url.host, port)
                writer.close()
        except (OSError, TimeoutError) as error:
            raise RouterError(
                f"webhook router {self.name!r}: cannot connect to {redact_url(self.url)} "
                f"({error.__class__.__name__})"
            ) from None
        return f"{redact_url(self.url)} accepts connections"

    async def apply(self, target: RouteTarget, weight: int) -> None:
        """One signed POST; returns on 2xx, raises RouterError otherwise."""
        if not is_service_name(target.service):
            raise RouterError(f"webhook router {self.name!r}: invalid service name")
        body = payload(target, weight)
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: signature(self._secret, timestamp, body),
        }
        where = redact_url(self.url)
        try:
            response = await self._http().post(self.url, content=body, headers=headers)
        except httpx.TimeoutException:
            raise RouterError(
                f"webhook router {self.name!r}: no answer from {where} within {self.timeout:g}s"
            ) from None
        except httpx.HTTPError as error:
            raise RouterError(
                f"webhook router {self.name!r}: cannot reach {where} ({error.__class__.__name__})"
            ) from None
        if not response.is_success:
            raise RouterError(
                f"webhook router {self.name!r}: {where} answered {response.status_code} "
                f"{response.reason_phrase}: {self._excerpt(response.text)}"
            )

    async def read_back(self, target: RouteTarget) -> int | None:
        """Unsupported: the receiving system alone knows what is live."""
        return None

    def _http(self) -> httpx.AsyncClient:
        # One client (and TLS context, and kept-alive connection) for every apply: building one
        # per apply cost tens of milliseconds of a rollback under load.
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self.timeout, transport=self._transport, follow_redirects=False
            )
        return self._client

    def _excerpt(self, text: str) -> str:
        # The receiver's answer goes into messages that are audited: bounded, and scrubbed of
        # the secret in case a misbehaving receiver echoes what it was given.
        text = " ".join(text.split())
        secret = self._secret.decode()
        if secret:
            text = text.replace(secret, "[redacted]")
        return (text[:200] + "…") if len(text) > 200 else (text or "empty body")
