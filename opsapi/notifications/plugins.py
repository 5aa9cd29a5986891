"""The only module that touches apprise: turning a channel URL into a plugin, quietly.

apprise logs through the `apprise` logger, and some of its messages quote what it was given (an
unparseable URL, an invalid token). Those records never reach opsapi's logs: the logger does not
propagate, and a handler keeps the warnings of the current thread for the caller to redact and
use as the delivery's error.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

import apprise
from apprise.plugins.base import NotifyBase

_LOGGER = logging.getLogger("apprise")


class _ThreadCapture(logging.Handler):
    """Keeps the apprise warnings emitted by the thread that asked for them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        messages: list[str] | None = getattr(self._local, "messages", None)
        if messages is not None:
            with contextlib.suppress(Exception):
                messages.append(record.getMessage())

    @contextlib.contextmanager
    def collect(self) -> Iterator[list[str]]:
        self._local.messages = []
        try:
            yield self._local.messages
        finally:
            self._local.messages = None


_CAPTURE = _ThreadCapture()
_LOGGER.addHandler(_CAPTURE)
_LOGGER.setLevel(logging.WARNING)
_LOGGER.propagate = False
# Nothing written to disk: opsapi keeps its own delivery state in the outbox.
_ASSET = apprise.AppriseAsset(storage_mode="memory")


def captured() -> contextlib.AbstractContextManager[list[str]]:
    """Collect the apprise warnings this thread emits inside the block."""
    return _CAPTURE.collect()


def instantiate(url: str) -> NotifyBase | None:
    """The apprise plugin for `url`, or None when apprise cannot use it (nothing logged)."""
    with captured():
        try:
            return apprise.Apprise.instantiate(url, asset=_ASSET, suppress_exceptions=True)
        except Exception:  # apprise promises None; a plugin bug must not crash start-up either
            return None


def service_name(plugin: NotifyBase) -> str:
    """The plugin's class name, e.g. `NotifySlack`."""
    return type(plugin).__name__
