"""The webhook router against a real receiver (a ThreadingHTTPServer) that checks signatures."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from opsapi.routers.base import Router, RouterError, RouteTarget
from opsapi.routers.webhook import WebhookRouter, redact_url, signature
from tests.support.processes import free_port

SECRET = "webhook-secret-0123456789abcdef"
TARGET = RouteTarget(
    "checkout",
    rollout_id=42,
    params={},
    canary_slot="green",
    stable_slot="blue",
    stable_version="v1",
    canary_version="v2",
    state="progressing",
)


def body(target: RouteTarget, percent: int, weights: dict[str, int]) -> dict[str, object]:
    """What the receiver must be sent for `target` at `percent`."""
    return {
        "service": target.service,
        "rollout_id": target.rollout_id,
        "canary_percent": percent,
        "canary_slot": target.canary_slot,
        "stable_slot": target.stable_slot,
        "canary_version": target.canary_version,
        "stable_version": target.stable_version,
        "state": target.state,
        "weights": weights,
    }


@dataclass
class Receiver:
    """What the receiver was sent, and how it should answer the next requests."""

    url: str
    secret: bytes
    statuses: list[int] = field(default_factory=list)  # answers to come; then 204
    delay: float = 0.0
    accepted: list[dict[str, object]] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)  # accepted bodies exactly as received
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
        # What was received is noted before answering: the client may look once it has the
        # answer.
        if not hmac.compare_digest(signature, "sha256=" + expected.hexdigest()):
            receiver.rejected.append("signature")
            self._answer(401, "bad signature")
        elif not timestamp.isdigit() or abs(time.time() - int(timestamp)) > 300:
            receiver.rejected.append("timestamp")
            self._answer(401, "stale timestamp")
        else:
            time.sleep(receiver.delay)
            status = receiver.statuses.pop(0) if receiver.statuses else 204
            if status < 300:
                receiver.accepted.append(json.loads(body))
                receiver.raw.append(body)
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
        body(TARGET, 25, {"blue": 75, "green": 25}),
        {"service": "checkout", "rollout_id": None, "canary_percent": 0, "canary_slot": "green",
         "stable_slot": "blue", "canary_version": None, "stable_version": None, "state": None,
         "weights": {"blue": 100, "green": 0}},
    ]  # fmt: skip
    # Compact JSON with sorted keys: what the signature covers is reproducible by a receiver.
    assert (
        receiver.raw[0]
        == json.dumps(receiver.accepted[0], separators=(",", ":"), sort_keys=True).encode()
    )
    assert await router.read_back(TARGET) is None


async def test_consecutive_releases_carry_versions_slots_and_weights(receiver: Receiver) -> None:
    router = WebhookRouter("hook", receiver.url, SECRET, timeout=2.0)
    # v2's canary in green at 25 %, then 100 %, then its success (green is the stable slot);
    first = TARGET
    await router.apply(first, 25)
    await router.apply(first, 100)
    succeeded = replace(first, stable_slot="green", state="succeeded")
    await router.apply(succeeded, 100)
    # v3's canary in blue (the other slot) at 50 %, then rolled back.
    second = replace(
        first, rollout_id=43, canary_slot="blue", stable_slot="green", stable_version="v2",
        canary_version="v3",
    )  # fmt: skip
    await router.apply(second, 50)
    rolled_back = replace(second, state="rolled_back")
    await router.apply(rolled_back, 0)

    assert receiver.rejected == []  # every delivery's signature verified
    assert receiver.accepted == [
        body(first, 25, {"blue": 75, "green": 25}),
        body(first, 100, {"blue": 0, "green": 100}),
        body(succeeded, 100, {"blue": 0, "green": 100}),
        body(second, 50, {"blue": 50, "green": 50}),
        body(rolled_back, 0, {"blue": 0, "green": 100}),
    ]
    # Routing by version: after the rollback all traffic goes to the slot running v2.
    last = receiver.accepted[-1]
    assert last["weights"] == {last["stable_slot"]: 100, last["canary_slot"]: 0}
    assert last["stable_version"] == "v2"


async def test_a_canary_slot_outside_the_slots_is_never_sent(receiver: Receiver) -> None:
    router = WebhookRouter("hook", receiver.url, SECRET, timeout=2.0)
    with pytest.raises(RouterError, match="canary slot red is not one of the policy's slots"):
        await router.apply(replace(TARGET, canary_slot="red"), 25)
    with pytest.raises(RouterError, match="0-100"):
        await router.apply(TARGET, 101)
    assert receiver.accepted == []
    assert receiver.rejected == []


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
    assert receiver.accepted == [body(TARGET, 10, {"blue": 90, "green": 10})]


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
