"""Real nginx and HAProxy for the router tests, on loopback ports with temp dirs, in front of two
tiny HTTP backends (threads) answering "stable" and "canary"; and a keep-alive load generator."""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.support.processes import free_ports

START_TIMEOUT = 10.0


def find_binary(name: str) -> str | None:
    """The path of `name` on PATH or in /usr/sbin (where Debian puts nginx and haproxy)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")


# --- backends -----------------------------------------------------------------------------


class _Answer(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as HAProxy uses towards servers
    # Headers and body in separate small writes would meet Nagle and delayed ACKs: 40 ms each.
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
class Backends:
    """Two running backends: `stable` and `canary` are their `127.0.0.1:port` addresses."""

    stable: str
    canary: str


@contextlib.contextmanager
def backends() -> Iterator[Backends]:
    """Start the stable and canary backends in threads; stop them on exit."""
    servers = []
    try:
        for answer in (b"stable", b"canary"):
            server = _Server(("127.0.0.1", 0), _Answer)
            server.answer = answer
            threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            ).start()
            servers.append(server)
        yield Backends(*(f"127.0.0.1:{s.server_address[1]}" for s in servers))
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


# --- processes ----------------------------------------------------------------------------


def _wait_listening(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}: {_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    _kill(process)
    raise RuntimeError(f"not listening on {port} after {START_TIMEOUT}s: {_tail(log)}")


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def nginx_main_conf(directory: Path, upstreams_dir: Path, port: int, probe_port: int,
                    upstream: str) -> str:  # fmt: skip
    """A main nginx.conf as the nginx router expects one (see opsapi/routers/nginx.py)."""
    temp = directory / "temp"
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}daemon off;
master_process on;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log notice;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_requests 100000;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;

    include {upstreams_dir}/*.conf;

    # Probe address: unknown services get 404, not another service's probe answer.
    server {{
        listen 127.0.0.1:{probe_port} default_server;
        return 404;
    }}

    # Traffic. The upstream through a variable: it exists only after the first apply.
    server {{
        listen 127.0.0.1:{port};
        location / {{
            set $opsapi_upstream {upstream};
            proxy_pass http://$opsapi_upstream;
        }}
    }}
}}
"""


@dataclass
class Nginx:
    """A running nginx: traffic on `port`, probe address `probe`, files under `directory`."""

    binary: str
    directory: Path
    upstreams_dir: Path
    conf: Path
    port: int
    probe: str
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.directory / "stderr.log"
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [self.binary, "-p", str(self.directory), "-c", str(self.conf), "-e", "stderr"],
                stdout=out,
                stderr=out,
            )
        _wait_listening(self.port, self.process, log)

    def reload(self) -> None:
        """`nginx -s reload` by hand (behind the router's back)."""
        subprocess.run(
            [self.binary, "-p", str(self.directory), "-c", str(self.conf), "-e", "stderr", "-s",
             "reload"],
            check=True, capture_output=True, timeout=10,
        )  # fmt: skip

    def stop(self) -> None:
        if self.process is not None:
            _kill(self.process)


@contextlib.contextmanager
def running_nginx(binary: str, directory: Path, upstream: str = "checkout") -> Iterator[Nginx]:
    """nginx in `directory` (conf, pid, logs, upstreams dir), stopped on exit."""
    upstreams_dir = directory / "upstreams"
    upstreams_dir.mkdir(parents=True)
    (directory / "temp").mkdir()
    port, probe_port = free_ports(2)
    conf = directory / "nginx.conf"
    conf.write_text(nginx_main_conf(directory, upstreams_dir, port, probe_port, upstream))
    nginx = Nginx(binary, directory, upstreams_dir, conf, port, f"127.0.0.1:{probe_port}")
    try:
        nginx.start()
        yield nginx
    finally:
        nginx.stop()


def haproxy_cfg(unix_socket: Path, admin_port: int, port: int, stable: str, canary: str) -> str:
    """HAProxy configuration: runtime API on a unix socket and a TCP port, backend `checkout`
    (roundrobin, servers `stable` weight 100 and `canary` weight 0), and `fixed` (static-rr)."""
    return f"""global
    # A port another listener holds fails the start instead of being shared with it.
    noreuseport
    stats socket {unix_socket} level admin mode 600
    stats socket ipv4@127.0.0.1:{admin_port} level admin
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
    server stable {stable} weight 100
    server canary {canary} weight 0

backend fixed
    balance static-rr
    server stable {stable}
    server canary {canary}
"""


@dataclass
class Haproxy:
    """A running HAProxy: traffic on `port`, runtime API at `socket` and `tcp_socket`."""

    binary: str
    directory: Path
    cfg: Path
    port: int
    socket: str
    tcp_socket: str
    process: subprocess.Popen[bytes] | None = field(default=None)

    def start(self) -> None:
        log = self.directory / "haproxy.log"
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [self.binary, "-db", "-f", str(self.cfg)], stdout=out, stderr=out
            )
        _wait_listening(self.port, self.process, log)
        deadline = time.monotonic() + START_TIMEOUT
        while not Path(self.socket).exists() and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            _kill(self.process)


@contextlib.contextmanager
def running_haproxy(binary: str, stable: str, canary: str) -> Iterator[Haproxy]:
    """HAProxy in a short temp dir (unix socket paths are limited to ~100 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="opsapi-hap-"))
    unix_socket = directory / "admin.sock"
    port, admin_port = free_ports(2)
    cfg = directory / "haproxy.cfg"
    cfg.write_text(haproxy_cfg(unix_socket, admin_port, port, stable, canary))
    haproxy = Haproxy(binary, directory, cfg, port, str(unix_socket), f"127.0.0.1:{admin_port}")
    try:
        haproxy.start()
        yield haproxy
    finally:
        haproxy.stop()
        shutil.rmtree(directory, ignore_errors=True)


# --- traffic ------------------------------------------------------------------------------


def _get(connection: http.client.HTTPConnection) -> str:
    """One GET; the body ("stable"/"canary") or `status NNN`. A keep-alive connection the
    proxy closed (a reload retires old nginx workers) is reopened once, as clients do."""
    for attempt in (1, 2):
        try:
            connection.request("GET", "/")
            response = connection.getresponse()
            body = response.read().decode()
            return body if response.status == 200 else f"status {response.status}"
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            connection.close()
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def split(port: int, requests: int) -> Counter[str]:
    """Send `requests` GETs over one keep-alive connection; count the answers."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        return Counter(_get(connection) for _ in range(requests))
    finally:
        connection.close()


def canary_percent(counts: Counter[str]) -> float:
    """The canary's share of the answers, in percent (every answer must be a 200)."""
    total = sum(counts.values())
    assert counts["stable"] + counts["canary"] == total, f"errors among answers: {counts}"
    return 100 * counts["canary"] / total


class Background:
    """Steady keep-alive traffic from a thread; answers to requests sent after `mark()` are
    counted apart, in `after`."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.before: Counter[str] = Counter()
        self.after: Counter[str] = Counter()
        self.error: BaseException | None = None
        self._marked = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Background:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def mark(self) -> None:
        self._marked.set()

    def wait_before(self, count: int, timeout: float = 15) -> None:
        self._wait(self.before, count, timeout)

    def wait_after(self, count: int, timeout: float = 15) -> None:
        self._wait(self.after, count, timeout)

    def _wait(self, counts: Counter[str], count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while sum(counts.values()) < count:
            if self.error is not None:
                raise self.error
            assert time.monotonic() < deadline, f"traffic stalled: {counts}"
            time.sleep(0.01)

    def _run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            while not self._stop.is_set():
                counts = self.after if self._marked.is_set() else self.before
                counts[_get(connection)] += 1
        except BaseException as error:
            self.error = error
        finally:
            connection.close()
