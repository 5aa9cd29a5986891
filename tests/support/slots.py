"""Slot backends for the router tests: one real HTTP server per slot, answering `<slot>
<version>`; deploying a version into a slot changes its answer, as a release into that slot would.
And a HAProxy whose backend has one server per slot."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.support.processes import free_port
from tests.support.proxies import Haproxy


class _Answer(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as nginx and HAProxy use towards servers
    # One write for headers and body: separate small writes meet Nagle and delayed ACKs.
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        body: bytes = self.server.answer  # type: ignore[attr-defined]
        self.wfile.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    answer = b""


@dataclass
class SlotBackend:
    """The backend running in one slot: `address` is its `127.0.0.1:port`."""

    slot: str
    address: str
    server: _Server

    def deploy(self, version: str) -> None:
        """Run `version` in this slot from the next request on."""
        self.server.answer = f"{self.slot} {version}".encode()


@contextlib.contextmanager
def slot_backends(**versions: str) -> Iterator[dict[str, SlotBackend]]:
    """One backend per slot (`blue="v1", green="v2"`), each answering `<slot> <version>`."""
    running: dict[str, SlotBackend] = {}
    try:
        for slot, version in versions.items():
            server = _Server(("127.0.0.1", 0), _Answer)
            threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            ).start()
            running[slot] = SlotBackend(slot, f"127.0.0.1:{server.server_address[1]}", server)
            running[slot].deploy(version)
        yield running
    finally:
        for backend in running.values():
            backend.server.shutdown()
            backend.server.server_close()


def slot_shares(counts: Counter[str]) -> dict[str, float]:
    """Each answering slot's share of the answers, in percent; every answer must come from a
    slot backend (`<slot> <version>`), none may be an error."""
    total = sum(counts.values())
    shares: Counter[str] = Counter()
    for answer, count in counts.items():
        slot, _, version = answer.partition(" ")
        assert slot != "status", f"errors among answers: {counts}"
        assert version, f"not a slot backend's answer: {answer!r}"
        shares[slot] += count
    return {slot: 100 * count / total for slot, count in shares.items()}


def slot_haproxy_cfg(unix_socket: Path, port: int, servers: dict[str, str]) -> str:
    """Backend `checkout` (roundrobin) with one server per slot (`srv_<slot>`): the first slot
    at weight 100, the others at 0, as a service starts before its first rollout."""
    lines = [
        f"    server srv_{slot} {address} weight {100 if index == 0 else 0}"
        for index, (slot, address) in enumerate(servers.items())
    ]
    return f"""global
    # A port another listener holds fails the start instead of being shared with it.
    noreuseport
    stats socket {unix_socket} level admin mode 600
    stats timeout 10s

defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s

frontend traffic
    bind 127.0.0.1:{port}
    default_backend checkout

backend checkout
    balance roundrobin
{chr(10).join(lines)}
"""


@contextlib.contextmanager
def running_slot_haproxy(binary: str, servers: dict[str, str]) -> Iterator[Haproxy]:
    """HAProxy in front of the slot backends `servers` (slot → address), stopped on exit."""
    directory = Path(tempfile.mkdtemp(prefix="opsapi-slots-"))  # short: unix socket path limit
    unix_socket = directory / "admin.sock"
    port = free_port()
    cfg = directory / "haproxy.cfg"
    cfg.write_text(slot_haproxy_cfg(unix_socket, port, servers))
    haproxy = Haproxy(binary, directory, cfg, port, str(unix_socket), str(unix_socket))
    try:
        haproxy.start()
        yield haproxy
    finally:
        haproxy.stop()
        shutil.rmtree(directory, ignore_errors=True)
