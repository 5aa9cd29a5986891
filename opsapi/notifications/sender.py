"""Delivering one notification to its channel: blocking, one attempt, bounded by the channel's
timeout. The outbox worker calls `Notifier.send` in a worker thread and owns retries.

Slack, Teams, e-mail and `apprise` channels go through apprise (it builds each service's
payload); apprise's own retries are off. A `webhook` channel gets opsapi's JSON document, signed
like the webhook router's calls (`X-Opsapi-Timestamp`, `X-Opsapi-Signature: sha256=<HMAC-SHA256
of "<timestamp>.<body>">`): apprise's generic `json://` can add fixed headers only, not a
signature over the body it builds.

Errors are `NotificationError`s whose message is safe to store, audit and show: every fragment
of the channel's URL and secret that could be a secret is redacted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
from apprise import NotifyFormat, NotifyType

from opsapi.notifications import plugins
from opsapi.notifications.channels import (
    DEFAULT_TIMEOUT,
    ChannelConfig,
    EmailChannel,
    WebhookChannel,
    redact,
    secret_fragments,
)
from opsapi.notifications.messages import Message, Rendered, render
from opsapi.routers.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, signature

DELIVERY_HEADER = "X-Opsapi-Delivery"
_ERROR_LIMIT = 300
DOCUMENT_VERSION = 1


class NotificationError(Exception):
    """The channel did not take the notification; the message is safe to store and show."""


@dataclass(frozen=True)
class Notification:
    """What the worker hands a thread: plain values, no database objects."""

    id: int
    channel: str
    payload: dict[str, Any]


def check_public_url(public_url: str | None) -> str | None:
    """`public_url` if usable as the base of links (http(s), a host, no query); else ValueError."""
    if public_url is None or public_url == "":
        return None
    parts = urlsplit(public_url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise ValueError("OPSAPI_PUBLIC_URL must be an http:// or https:// URL without a query")
    return public_url.rstrip("/")


class Notifier:
    """Sends notifications to the configured channels."""

    def __init__(self, channels: Mapping[str, ChannelConfig], *, public_url: str | None) -> None:
        self.channels = dict(channels)
        self.public_url = check_public_url(public_url)
        self._secrets = {name: secret_fragments(config) for name, config in self.channels.items()}

    def overall_timeout(self, channel: str) -> float:
        """How long one send to `channel` may take as a whole (connect, then read, +1 s)."""
        config = self.channels.get(channel)
        return 2 * (config.timeout if config else DEFAULT_TIMEOUT) + 1

    @property
    def longest_timeout(self) -> float:
        """The largest `overall_timeout` of any channel."""
        return max((self.overall_timeout(name) for name in self.channels), default=0.0)

    def secret_fragments(self, channel: str) -> list[str]:
        """What must never be shown of `channel`'s configuration (nothing when unknown)."""
        return self._secrets.get(channel, [])

    def send(self, notification: Notification) -> None:
        """Deliver one notification (blocking, one attempt); raise NotificationError on failure."""
        config = self.channels.get(notification.channel)
        if config is None:
            raise NotificationError(
                f"channel {notification.channel!r} is not configured on this server"
            )
        try:
            message = Message.from_dict(dict(notification.payload["message"]))
        except (KeyError, TypeError, ValueError):
            raise NotificationError("the outbox row holds no readable message") from None
        rendered = render(message, self.public_url)
        fragments = self._secrets[notification.channel]
        try:
            if isinstance(config, WebhookChannel):
                _post_signed(config, notification, message, rendered)
            else:
                _through_apprise(config, rendered)
        except NotificationError as error:
            raise NotificationError(redact(str(error), fragments)[:_ERROR_LIMIT]) from None


def _through_apprise(config: ChannelConfig, rendered: Rendered) -> None:
    plugin = plugins.instantiate(config.url.get_secret_value())
    if plugin is None:
        raise NotificationError("apprise cannot use the channel's URL")
    # One attempt, bounded: the outbox retries with its own back-off.
    plugin.retry = 0
    plugin.socket_connect_timeout = config.timeout
    plugin.socket_read_timeout = config.timeout
    if isinstance(config, EmailChannel):
        # A plain-text mail keeps the body's lines (apprise's HTML conversion joins them).
        plugin.notify_format = NotifyFormat.TEXT
    with plugins.captured() as warnings:
        try:
            delivered = plugin.notify(
                body=rendered.body,
                title=rendered.title,
                notify_type=NotifyType(rendered.severity),
                body_format=NotifyFormat.TEXT,
            )
        except Exception as error:  # a plugin bug is a failed attempt, not a dead worker
            name = f"{plugins.service_name(plugin)}: {type(error).__name__}"
            raise NotificationError(name) from None
    if not delivered:
        said = " ".join(" ".join(warnings).split())
        raise NotificationError(said or f"{plugins.service_name(plugin)} refused the notification")


def document(notification: Notification, message: Message, rendered: Rendered) -> dict[str, Any]:
    """The JSON document a webhook channel receives."""
    return {
        "version": DOCUMENT_VERSION,
        "delivery_id": notification.id,
        **message.as_dict(),
        "title": rendered.title,
        "text": rendered.body,
        "severity": rendered.severity,
        "link": rendered.link,
    }


def _post_signed(
    config: WebhookChannel, notification: Notification, message: Message, rendered: Rendered
) -> None:
    body = json.dumps(
        document(notification, message, rendered), separators=(",", ":"), sort_keys=True
    ).encode()
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "opsapi-notifications",
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: signature(config.secret.get_secret_value().encode(), timestamp, body),
        DELIVERY_HEADER: str(notification.id),
    }
    try:
        response = requests.post(
            config.url.get_secret_value(),
            data=body,
            headers=headers,
            timeout=(config.timeout, config.timeout),
            allow_redirects=False,
        )
    except requests.Timeout as error:
        raise NotificationError(f"timeout: {type(error).__name__}") from None
    except requests.RequestException as error:
        raise NotificationError(f"network error: {_cause(error)}") from None
    with response:
        if not 200 <= response.status_code < 300:
            text = " ".join(response.text[:200].split())
            raise NotificationError(f"HTTP {response.status_code}" + (f": {text}" if text else ""))


def _cause(error: BaseException) -> str:
    """The error's class and its innermost OS reason (never its message: it quotes the URL)."""
    reason = ""
    seen: BaseException | None = error
    for _ in range(10):  # chains are short; a cycle must not loop forever
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.strerror:
            reason = seen.strerror
        seen = seen.__cause__ or seen.__context__
    return f"{type(error).__name__} ({reason})" if reason else type(error).__name__
