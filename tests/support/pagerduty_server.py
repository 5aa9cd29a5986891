"""A local PagerDuty Events API v2 for tests: HTTPS (a `trustme` CA), `POST /v2/enqueue`.

    with EventsApiServer(tmp_path) as server:
        server.script(500, 429, ("hang", 3))  # then 202 for every later request
        ... OPSAPI_PAGERDUTY_EVENTS_URL=server.url, OPSAPI_PAGERDUTY_CA_FILE=server.ca_file ...
        server.accepted()  # the events answered 202, in order

The `pagerduty` client refuses plain http://, hence TLS. Every request is recorded with the answer
it got (`requests`); scripted answers are used one per request, in order, then 202 again (or
whatever `default` is set to). ("hang", N) sleeps N seconds before answering 202, so a client
with a shorter timeout gives up.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import trustme

Mode = int | tuple[str, float]

_BODIES: dict[int, dict[str, Any]] = {
    400: {"status": "invalid event", "message": "Event object is invalid",
          "errors": ["'payload.severity' is invalid (must be one of the following: "
                     "'critical', 'warning', 'error' or 'info')"]},
    429: {"status": "throttle event", "message": "Requests for this service are arriving "
          "too quickly. Please retry later."},
    500: {"status": "internal error", "message": "Internal error"},
}  # fmt: skip


@dataclass(frozen=True)
class Received:
    """One request as the server saw it, and what it answered."""

    at: float  # time.monotonic()
    path: str
    body: dict[str, Any]
    answer: int | str  # a status, or "hang"


class EventsApiServer:
    """Started on construction; `close()` (or the context manager) stops it."""

    def __init__(self, directory: Path) -> None:
        ca = trustme.CA()
        self.ca_file = directory / "events-api-ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        self._lock = threading.Lock()
        self._script: deque[Mode] = deque()
        self.default: Mode = 202
        self._requests: list[Received] = []
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        server.daemon_threads = True
        server.block_on_close = False
        # A client that gives up or distrusts the certificate is not the test's failure.
        server.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
        # The handshake happens in the request's own thread (a stuck client blocks nobody else).
        server.socket = context.wrap_socket(
            server.socket, server_side=True, do_handshake_on_connect=False
        )
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        self.url = f"https://127.0.0.1:{server.server_address[1]}"

    def script(self, *modes: Mode) -> None:
        """Answer the next requests with these modes, in order (then the default again)."""
        with self._lock:
            self._script.extend(modes)

    def reset(self) -> None:
        with self._lock:
            self._script.clear()
            self._requests.clear()
            self.default = 202

    @property
    def requests(self) -> list[Received]:
        with self._lock:
            return list(self._requests)

    def accepted(self) -> list[dict[str, Any]]:
        """The events answered 202, in arrival order."""
        return [item.body for item in self.requests if item.answer == 202]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _next(self, path: str, body: dict[str, Any]) -> Mode:
        with self._lock:
            mode = self._script.popleft() if self._script else self.default
            answer = mode if isinstance(mode, int) else mode[0]
            self._requests.append(Received(time.monotonic(), path, body, answer))
            return mode


def _handler(api: EventsApiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw)
            except ValueError:
                body = {"unparsable": raw.decode(errors="replace")}
            if self.path != "/v2/enqueue":
                self._answer(404, {"status": "not found"})
                return
            mode = api._next(self.path, body)
            if isinstance(mode, tuple):
                time.sleep(mode[1])
                mode = 202
            if mode == 202:
                key = body.get("dedup_key") or "generated-key"
                self._answer(202, {"status": "success", "message": "Event processed",
                                   "dedup_key": key})  # fmt: skip
            else:
                self._answer(mode, _BODIES.get(mode, {"status": "error"}))

        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                pass  # the client gave up (a hang outlasting its timeout)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler
