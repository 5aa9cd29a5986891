"""Sending one alert to the PagerDuty Events API v2 — the only module that imports `pagerduty`.

The `pagerduty` client is synchronous and retries by itself with blocking `time.sleep` (429
without limit, 5xx several times, network errors three times). Here every call makes exactly
one HTTP request, bounded by a timeout, and raises `DeliveryError` on anything but success; the
outbox worker owns retries and back-off. Call `send` from a worker thread, never on the event
loop.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pagerduty
from httpx2 import Response

from opsapi.pagerduty.models import OutboxKind

_ERROR_LIMIT = 300


@dataclass(frozen=True)
class Delivery:
    """What the worker hands a thread: plain values, no database objects."""

    kind: str
    dedup_key: str
    routing_key: str
    payload: dict[str, Any]


class DeliveryError(Exception):
    """The Events API did not accept the event; the message is safe to store and show."""


class _Rejected(pagerduty.HttpError):
    """A non-2xx answer, raised before the client's own retry loop can look at it."""


class _OneShotClient(pagerduty.EventsApiV2Client):
    """The Events API client with its retry loop short-circuited.

    `ApiClient.request` retries inside one call (sleeping in the calling thread); `postprocess`
    runs after every response and before that loop, so raising there makes each call a single
    request whatever the status.
    """

    def postprocess(self, response: Response) -> None:
        if not response.is_success:
            raise _Rejected(f"HTTP {response.status_code}", response)


class EventsApi:
    """Sends deliveries to `base_url` (must be https://; `ca_file` to trust a private CA)."""

    def __init__(self, base_url: str, *, ca_file: Path | None, timeout_seconds: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_seconds = timeout_seconds
        self._verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=str(ca_file)) if ca_file else True
        )

    def send(self, delivery: Delivery) -> None:
        """Deliver one event (blocking, one HTTP request); raise DeliveryError on failure."""
        try:
            client = _OneShotClient(
                delivery.routing_key, base_url=self.base_url, verify=self._verify
            )
        except pagerduty.UrlError as error:
            raise DeliveryError(f"bad Events API URL: {error}") from None
        # 7.2 passes its own `timeout` attribute (60 s) with every request: a `timeout=` given to
        # the constructor is silently ignored. Belt and braces against its retry loop as well.
        client.timeout = self.timeout_seconds  # type: ignore[assignment]  # declared int, any number works
        client.retry = {}
        client.max_http_attempts = 0
        client.max_network_attempts = 0
        client.sleep_timer = 0
        try:
            if delivery.kind == OutboxKind.TRIGGER:
                payload = delivery.payload
                client.trigger(
                    str(payload["summary"]),
                    str(payload.get("source", "opsapi")),
                    dedup_key=delivery.dedup_key,
                    severity=str(payload.get("severity", "critical")),
                    custom_details=dict(payload.get("custom_details") or {}),
                )
            elif delivery.kind == OutboxKind.RESOLVE:
                client.resolve(delivery.dedup_key)
            else:
                raise DeliveryError(f"unknown outbox kind {delivery.kind!r}")
        except pagerduty.Error as error:
            raise DeliveryError(_describe(error, delivery.routing_key)) from None
        finally:
            client.close()


def _describe(error: pagerduty.Error, routing_key: str) -> str:
    """A short, secret-free account of what went wrong."""
    response = error.response
    if response is not None:
        body = " ".join(response.text.split())
        text = f"HTTP {response.status_code}: {body}" if body else f"HTTP {response.status_code}"
    else:
        cause = error.__cause__
        text = f"network error: {type(cause).__name__}" if cause else str(error)
        if cause is not None and str(cause):
            text += f": {cause}"
    return text.replace(routing_key, "[redacted]")[:_ERROR_LIMIT]
