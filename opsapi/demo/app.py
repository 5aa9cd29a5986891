"""The demo service: a tiny HTTP server that answers what runs in it and exports the metric
conventions of docs/metrics.md, so that opsapi's default gates work on it.

    python -m opsapi.demo.app serve --slot blue --port 8081 --control blue.json
    python -m opsapi.demo.app load --url http://127.0.0.1:8090/ --rps 20

`serve` answers every path but `/metrics` and `/healthz` with `<slot> <version>` (or
`<service> <version>` without `--slot`): 200, or 500 for a share `error_ratio` of requests,
after `latency_seconds`. With nothing deployed (no version) it answers 503 and records nothing.

What runs is set at start (`--version`, `--error-ratio`, `--latency`, or the environment
variables `DEMO_SERVICE`, `DEMO_VERSION`, `DEMO_PORT`, `DEMO_ERROR_RATE`, `DEMO_LATENCY`,
`DEMO_HOST`) and, with `--control FILE`, changed while it runs: the JSON object in FILE
(`{"version": "v3", "error_ratio": 0.3, "latency_seconds": 0.005}`, each key optional) is read
again whenever the file changes. Writing a new `version` there is a deploy: like a restarted
process, the app then exports no series until it records requests again.

Metrics (`/metrics`): `http_requests_total{service,version,code}` and
`http_request_duration_seconds{service,version}`; like a real app instrumented with
`prometheus_client`, a series exists only once something was recorded in it (a version that
never failed has no `code="500"` series).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Histogram,
    generate_latest,
)
from prometheus_client import Counter as MetricCounter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass(frozen=True)
class Behaviour:
    """What the app runs now: the deployed version (None: nothing) and its faults."""

    version: str | None = None
    error_ratio: float = 0.0
    latency_seconds: float = 0.0


def parse_behaviour(document: Any, base: Behaviour) -> Behaviour:
    """`base` with the fields a control document sets; ValueError naming a bad field."""
    if not isinstance(document, dict):
        raise ValueError("the control file must hold a JSON object")
    unknown = set(document) - {"version", "error_ratio", "latency_seconds"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}")
    behaviour = base
    if "version" in document:
        version = document["version"]
        if version is not None and (not isinstance(version, str) or not 0 < len(version) <= 128):
            raise ValueError("version must be a non-empty string or null")
        behaviour = replace(behaviour, version=version)
    if "error_ratio" in document:
        behaviour = replace(behaviour, error_ratio=_number(document, "error_ratio", 1.0))
    if "latency_seconds" in document:
        behaviour = replace(behaviour, latency_seconds=_number(document, "latency_seconds", 30.0))
    return behaviour


def _number(document: dict[str, Any], key: str, most: float) -> float:
    value = document[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number")
    if not (math.isfinite(value) and 0 <= value <= most):
        raise ValueError(f"{key} must be within [0, {most:g}]")
    return float(value)


def write_control(path: Path, **fields: Any) -> None:
    """Replace the control file atomically (the app sees the old document or the new one)."""
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(fields) + "\n")
    os.replace(temp, path)


class DemoApp:
    """The service's state and metrics; `answer()` serves one request."""

    def __init__(
        self,
        service: str,
        behaviour: Behaviour,
        *,
        slot: str | None = None,
        control: Path | None = None,
    ) -> None:
        self.service = service
        self.slot = slot
        self.control = control
        self.registry = CollectorRegistry()
        self.requests = MetricCounter(
            "http_requests_total",
            "HTTP requests served",
            ("service", "version", "code"),
            registry=self.registry,
        )
        self.duration = Histogram(
            "http_request_duration_seconds",
            "HTTP request duration",
            ("service", "version"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._base = behaviour
        self._behaviour = behaviour
        self._seen: tuple[int, int, int] | None = None
        self._lock = threading.Lock()
        self.refresh()

    @property
    def behaviour(self) -> Behaviour:
        """What runs now (after reading a changed control file)."""
        self.refresh()
        return self._behaviour

    def refresh(self) -> None:
        """Read the control file again if it changed; a bad file keeps the last good state."""
        if self.control is None:
            return
        try:
            stat = self.control.stat()
        except FileNotFoundError:
            return
        with self._lock:
            # The inode too: write_control replaces the file, and mtimes may be coarse.
            seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if self._seen == seen:
                return
            self._seen = seen
            try:
                document = json.loads(self.control.read_text())
                behaviour = parse_behaviour(document, self._base)
            except (OSError, ValueError) as error:
                print(f"demo app: ignoring {self.control}: {error}", file=sys.stderr, flush=True)
                return
            if behaviour.version != self._behaviour.version:
                # A deploy: the new version's process would start with no series at all.
                self.requests.clear()
                self.duration.clear()
            self._behaviour = behaviour

    def answer(self) -> tuple[int, bytes]:
        """One request: (status, body), recorded in the metrics when a version runs."""
        behaviour = self.behaviour
        who = self.slot or self.service
        if behaviour.version is None:
            return 503, f"{who} nothing deployed\n".encode()
        started = time.perf_counter()
        if behaviour.latency_seconds > 0:
            time.sleep(behaviour.latency_seconds)
        failed = random.random() < behaviour.error_ratio  # noqa: S311 - fault injection
        code = 500 if failed else 200
        body = f"{who} {behaviour.version}{' failed' if failed else ''}\n".encode()
        self.requests.labels(self.service, behaviour.version, str(code)).inc()
        self.duration.labels(self.service, behaviour.version).observe(time.perf_counter() - started)
        return code, body

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        self.refresh()
        return generate_latest(self.registry)


def make_server(app: DemoApp, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP/1.1 keep-alive server for `app` (not started)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as nginx uses towards its upstreams
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, app.exposition(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._send(200, b"ok\n", "text/plain; charset=utf-8")
            else:
                code, body = app.answer()
                self._send(code, body, "text/plain; charset=utf-8")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            reason = self.responses.get(code, ("",))[0]
            head = (
                f"HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            # One write for head and body: separate small writes meet delayed ACKs.
            self.wfile.write(head.encode() + body)

        def log_message(self, format: str, *args: object) -> None:
            """No access log: the metrics say it all."""

    class Server(ThreadingHTTPServer):
        daemon_threads = True

    return Server((host, port), Handler)


def serve(app: DemoApp, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    import signal

    server = make_server(app, host, port)

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(
        f"demo app {app.slot or app.service} serving on {host}:{port}", file=sys.stderr, flush=True
    )
    server.serve_forever(poll_interval=0.1)
    server.server_close()


class Requester:
    """GETs over one keep-alive connection, reopened when the proxy closes it."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"{url!r} is not an http:// URL")
        self.host, self.port = parts.hostname, parts.port or 80
        self.path = parts.path or "/"
        self.timeout = timeout
        self._connection: http.client.HTTPConnection | None = None

    def get(self) -> str:
        """One GET: the answer's body (first line), `HTTP <status>` with no body, or the
        connection error's name."""
        for attempt in (1, 2):
            if self._connection is None:
                self._connection = http.client.HTTPConnection(self.host, self.port, self.timeout)
            try:
                self._connection.request("GET", self.path)
                response = self._connection.getresponse()
                text = response.read().decode("utf-8", "replace").strip().splitlines()
                return text[0] if text else f"HTTP {response.status}"
            except (http.client.HTTPException, OSError) as error:
                # A reload retires nginx's old workers, which close kept-alive connections.
                self.close()
                if attempt == 2:
                    return type(error).__name__
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the connection (the next GET opens a new one)."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def sample(url: str, requests: int) -> Counter[str]:
    """Send `requests` GETs one after another; count the answers."""
    requester = Requester(url)
    try:
        return Counter(requester.get() for _ in range(requests))
    finally:
        requester.close()


def load(
    url: str,
    rps: float,
    seconds: float | None = None,
    stop: threading.Event | None = None,
    *,
    report: bool = False,
) -> None:
    """GET `url` about `rps` times a second (for `seconds`, or until `stop`); with `report`, a
    line of answer counts on stdout every 10 s."""
    stop = stop or threading.Event()
    requester = Requester(url)
    deadline = None if seconds is None else time.monotonic() + seconds
    counts: Counter[str] = Counter()
    report_at = time.monotonic() + 10
    interval = 1 / rps
    next_at = time.monotonic()
    try:
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            counts[requester.get()] += 1
            if report and time.monotonic() >= report_at:
                print(" ".join(f"{k!r}={v}" for k, v in sorted(counts.items())), flush=True)
                counts, report_at = Counter(), time.monotonic() + 10
            next_at = max(next_at + interval, time.monotonic() - 1)
            stop.wait(max(0.0, next_at - time.monotonic()))
    finally:
        requester.close()


def main(argv: list[str] | None = None) -> int:
    """`serve` or `load`."""
    parser = argparse.ArgumentParser(
        prog="python -m opsapi.demo.app", description=(__doc__ or "").splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="serve the demo service")
    env = os.environ.get
    run.add_argument("--service", default=env("DEMO_SERVICE", "checkout"))
    run.add_argument("--slot", help="the slot this instance runs in (answers '<slot> <version>')")
    run.add_argument(
        "--version",
        default=env("DEMO_VERSION") or None,
        help="the version running at start (none: nothing deployed)",
    )
    run.add_argument("--error-ratio", type=float, default=float(env("DEMO_ERROR_RATE") or 0))
    run.add_argument(
        "--latency",
        type=float,
        default=float(env("DEMO_LATENCY") or 0),
        help="seconds before each answer",
    )
    run.add_argument("--host", default=env("DEMO_HOST", "127.0.0.1"))
    run.add_argument("--port", type=int, default=int(env("DEMO_PORT") or 8000))
    run.add_argument("--control", type=Path, help="JSON file read again whenever it changes")
    traffic = commands.add_parser("load", help="send steady traffic")
    traffic.add_argument("--url", required=True)
    traffic.add_argument("--rps", type=float, default=20)
    traffic.add_argument("--seconds", type=float)
    args = parser.parse_args(argv)
    if args.command == "serve":
        try:
            behaviour = parse_behaviour(
                {
                    "version": args.version,
                    "error_ratio": args.error_ratio,
                    "latency_seconds": args.latency,
                },
                Behaviour(),
            )
        except ValueError as error:
            parser.error(str(error))
        serve(
            DemoApp(args.service, behaviour, slot=args.slot, control=args.control),
            args.host,
            args.port,
        )
        return 0
    if args.rps <= 0:
        parser.error("--rps must be above 0")
    try:
        load(args.url, args.rps, args.seconds, report=True)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
