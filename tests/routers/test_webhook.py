"""The webhook router against a real receiver (a ThreadingHTTPServer) that checks signatures."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from opsapi.routers.base import Router, RouterError, RouteTarget
from opsapi.routers.webhook import WebhookRouter, redact_url, signature
from tests.support.processes import free_port

SECRET = "webhook-secret-0123456789abcdef"
TARGET = RouteTarget("checkout", rollout_id=42, params={})


@dataclass
class Receiver:
    """What the receiver was sent, and how it should answer the next requests."""

    url: str
    secret: bytes
    statuses: list[int] = field(default_factory=list)  # answers to come; then 204
    delay: float = 0.0
    accepted: list[dict[str, object]] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        receiver = self.server.receiver
        body = self.rfile.read(int(self.headers["Content-Length"]))
        timestamp = self.headers.get("X-Opsapi-Timestamp", "")
        # Verified independently of the router's own helper: HMAC of "<timestamp>.<body>".
        expected = hmac.new(receiver.secret, f"{timestamp}.".encode() + body, hashlib.sha256)
        signature = self.headers.get("X-Opsapi-Signature", "")
        if not hmac.compare_digest(signature, "sha256=" + expected.hexdigest()):
            self._answer(401, "bad signature")
            receiver.rejected.append("signature")
        elif not timestamp.isdigit() or abs(time.time() - int(timestamp)) > 300:
            self._answer(401, "stale timestamp")
            receiver.rejected.append("timestamp")
        else:
            time.sleep(receiver.delay)
            status = receiver.statuses.pop(0) if receiver.statuses else 204
            if status < 300:
                receiver.accepted.append(json.loads(body))
            self._answer(status, "" if status == 204 else "try later")

    def _answer(self, status: int, text: str) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text.encode())

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    receiver: Receiver

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that timed out and left: expected in the timeout test


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.receiver = Receiver(
        f"http://127.0.0.1:{server.server_address[1]}/opsapi/weights", SECRET.encode()
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


async def test_signed_post_is_accepted(receiver: Receiver) -> None:
    router: Router = WebhookRouter("hook", receiver.url, SECRET, timeout=2.0)
    await router.apply(TARGET, 25)
    await router.apply(RouteTarget("checkout"), 0)
    assert receiver.accepted == [
        {"service": "checkout", "rollout_id": 42, "canary_percent": 25},
        {"service": "checkout", "rollout_id": None, "canary_percent": 0},
    ]
    assert await router.read_back(TARGET) is None


async def test_wrong_secret_is_rejected(receiver: Receiver) -> None:
    wrong = "another-secret-that-is-long-enough"
    router = WebhookRouter("hook", receiver.url, wrong, timeout=2.0)
    with pytest.raises(RouterError, match="answered 401 Unauthorized: bad signature") as error:
        await router.apply(TARGET, 25)
    assert receiver.rejected == ["signature"]
    assert receiver.accepted == []
    assert wrong not in str(error.value)
    assert wrong not in repr(router)


async def test_failing_receiver_then_recovery(receiver: Receiver) -> None:
    receiver.statuses = [503, 500]
    router = WebhookRouter("hook", receiver.url, SECRET, timeout=2.0)
    with pytest.raises(RouterError, match="answered 503"):
        await router.apply(TARGET, 10)
    with pytest.raises(RouterError, match="answered 500"):
        await router.apply(TARGET, 10)
    await router.apply(TARGET, 10)
    assert receiver.accepted == [{"service": "checkout", "rollout_id": 42, "canary_percent": 10}]


async def test_timeout_and_network_errors_are_router_errors(receiver: Receiver) -> None:
    receiver.delay = 1.0
    slow = WebhookRouter("hook", receiver.url, SECRET, timeout=0.2)
    started = time.monotonic()
    with pytest.raises(RouterError, match=r"no answer from .* within 0\.2s"):
        await slow.apply(TARGET, 10)
    assert time.monotonic() - started < 1.0

    closed = WebhookRouter("hook", f"http://127.0.0.1:{free_port()}/x", SECRET, timeout=1.0)
    with pytest.raises(RouterError, match=r"cannot reach .*ConnectError"):
        await closed.apply(TARGET, 10)


async def test_receiver_echoing_the_secret_does_not_leak_it() -> None:
    def echo(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, text=f"bad request, your key was {SECRET}")

    router = WebhookRouter(
        "hook", "https://user:pw@hooks.example/p?token=t0k", SECRET,
        transport=httpx.MockTransport(echo),
    )  # fmt: skip
    with pytest.raises(RouterError) as error:
        await router.apply(TARGET, 10)
    message = str(error.value)
    assert SECRET not in message
    assert "[redacted]" in message
    assert "t0k" not in message
    assert "pw" not in message
    assert "https://hooks.example/p" in message


def test_signature_covers_timestamp_and_body() -> None:
    body = b'{"canary_percent":5}'
    expected = hmac.new(b"k", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert signature(b"k", "1700000000", body) == f"sha256={expected}"
    assert signature(b"k", "1700000001", body) != signature(b"k", "1700000000", body)


def test_params_and_url() -> None:
    router = WebhookRouter("hook", "https://hooks.example/x", SECRET)
    assert router.check_params({}) == []
    assert router.check_params({"url": "https://evil"}) == [
        {"field": "router.url", "message": "a webhook router takes no parameters"}
    ]
    assert redact_url("https://u:p@h.example:8443/a/b?q=1#f") == "https://h.example:8443/a/b"
    with pytest.raises(ValueError, match="http"):
        WebhookRouter("hook", "ftp://hooks.example/x", SECRET)
