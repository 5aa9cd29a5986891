"""A local HTTP(S) receiver standing in for Slack, Teams and webhook channels in tests.

    with NotifyReceiver() as receiver:                 # plain HTTP (json://, webhook channels)
    with NotifyReceiver(tls_dir=tmp_path) as receiver: # HTTPS with a `trustme` CA (Teams)
        receiver.script(500, ("hang", 3))  # then 200 for every later request
        ...
        receiver.accepted()  # the requests answered 2xx, in order

Every POST is recorded (path with query, headers, raw body, parsed JSON) with the answer it got.
Scripted answers are used one per request, in order, then `default` (200). ("hang", N) sleeps N
seconds before answering 200, so a client with a shorter timeout gives up.
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


@dataclass(frozen=True)
class Received:
    """One request as the receiver saw it, and what it answered."""

    at: float  # time.monotonic()
    path: str
    headers: dict[str, str]
    raw: bytes
    answer: int | str  # a status, or "hang"

    @property
    def json(self) -> Any:
        return json.loads(self.raw)


class NotifyReceiver:
    """Started on construction; `close()` (or the context manager) stops it."""

    def __init__(self, tls_dir: Path | None = None) -> None:
        self._lock = threading.Lock()
        self._script: deque[Mode] = deque()
        self.default: Mode = 200
        self._requests: list[Received] = []
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        server.daemon_threads = True
        server.block_on_close = False
        # A client that gives up is not the test's failure.
        server.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
        self.ca_file: Path | None = None
        scheme = "http"
        if tls_dir is not None:
            ca = trustme.CA()
            self.ca_file = tls_dir / "receiver-ca.pem"
            ca.cert_pem.write_to_path(str(self.ca_file))
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
            server.socket = context.wrap_socket(
                server.socket, server_side=True, do_handshake_on_connect=False
            )
            scheme = "https"
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        self.port = server.server_address[1]
        self.url = f"{scheme}://127.0.0.1:{self.port}"

    def script(self, *modes: Mode) -> None:
        """Answer the next requests with these modes, in order (then the default again)."""
        with self._lock:
            self._script.extend(modes)

    def reset(self) -> None:
        with self._lock:
            self._script.clear()
            self._requests.clear()
            self.default = 200

    @property
    def requests(self) -> list[Received]:
        with self._lock:
            return list(self._requests)

    def accepted(self) -> list[Received]:
        """The requests answered 2xx, in arrival order."""
        return [r for r in self.requests if isinstance(r.answer, int) and 200 <= r.answer < 300]

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

    def _next(self, path: str, headers: dict[str, str], raw: bytes) -> Mode:
        with self._lock:
            mode = self._script.popleft() if self._script else self.default
            answer = mode if isinstance(mode, int) else mode[0]
            self._requests.append(Received(time.monotonic(), path, headers, raw, answer))
            return mode


def _handler(receiver: NotifyReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            mode = receiver._next(self.path, dict(self.headers.items()), raw)
            if isinstance(mode, tuple):
                time.sleep(mode[1])
                mode = 200
            self._answer(mode)

        def _answer(self, status: int) -> None:
            data = b'{"ok": true}' if 200 <= status < 300 else b'{"error": "scripted failure"}'
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


def closed_port() -> int:
    """A loopback port nobody listens on (connections are refused)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class SmtpReceiver:
    """A minimal plain SMTP server on loopback keeping each message it accepts (no TLS, no
    AUTH): enough for apprise's `mailto://127.0.0.1:PORT?from=…&to=…`."""

    def __init__(self) -> None:
        import socketserver

        self._lock = threading.Lock()
        self._messages: list[bytes] = []
        receiver = self

        class Session(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                self._say(b"220 localhost test SMTP")
                data: list[bytes] | None = None
                for line in self.rfile:
                    if data is not None:
                        if line in (b".\r\n", b".\n"):
                            receiver._keep(b"".join(data))
                            data = None
                            self._say(b"250 OK: queued")
                        else:
                            data.append(line[1:] if line.startswith(b"..") else line)
                        continue
                    verb = line[:4].upper()
                    if verb == b"EHLO":
                        self._say(b"250-localhost\r\n250 8BITMIME")
                    elif verb == b"DATA":
                        data = []
                        self._say(b"354 end with <CRLF>.<CRLF>")
                    elif verb == b"QUIT":
                        self._say(b"221 bye")
                        return
                    else:  # HELO, MAIL, RCPT, RSET, NOOP
                        self._say(b"250 OK")

            def _say(self, text: bytes) -> None:
                self.wfile.write(text + b"\r\n")

        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Session)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        self.port = server.server_address[1]

    def _keep(self, message: bytes) -> None:
        with self._lock:
            self._messages.append(message)

    @property
    def messages(self) -> list[bytes]:
        """The raw messages accepted, in order."""
        with self._lock:
            return list(self._messages)

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
