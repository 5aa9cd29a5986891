"""A small app that exposes the product's documented metric conventions for SLO-gate tests.

`MetricsApp` serves its own `CollectorRegistry` on 127.0.0.1 (a free port) and runs a "traffic"
thread that, every `tick` seconds, records simulated requests for each configured
(service, version) according to a profile the test can change at any time with `set()`.

Recording is deterministic: request counts, error counts, webhook and database failures are all
accumulated with a float carry, so `rps=20, error_ratio=0.25` gives 20 requests/s of which exactly
one in four is a 500, and every request's latency is observed as exactly `latency_seconds`
(no jitter: a value on a bucket boundary such as 0.05 lands in that bucket, `le` is inclusive).

Per simulated request the app records one `http_requests_total` increment, one
`http_request_duration_seconds` observation, one `webhook_signature_verifications_total` and one
`db_connection_attempts_total` increment.

Series lifecycle, as Prometheus sees it (the same as a real app instrumented with
`prometheus_client` that calls `.labels(...)` when it records something):
- a series appears when it is first incremented: a healthy (service, version) has a `code="200"`
  series and **no** `code="500"` series, an app whose webhooks all verify has no `result="fail"`
  series. Gates must read a missing error series as 0 (`… or vector(0)`, see docs/metrics.md).
  The first increment of a new series is not seen by `rate()` (Prometheus has no earlier sample
  to compare it with), exactly as with a real app's first error;
- `stop_traffic()` keeps the series but stops increments: rates go to 0 and a ratio of rates is
  `0/0 = NaN` (a result with value "NaN", not an empty result);
- `remove()` deletes the series: Prometheus marks them stale on the next scrape and queries return
  an empty result (as for a version that never had traffic).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass
class Profile:
    rps: float
    error_ratio: float = 0.0
    latency_seconds: float = 0.05
    webhook_fail_ratio: float = 0.0
    db_fail_ratio: float = 0.0


@dataclass
class _Carry:
    requests: float = 0.0
    errors: float = 0.0
    webhook_fails: float = 0.0
    db_fails: float = 0.0


def _ratio(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be within [0, 1], got {value}")
    return float(value)


class MetricsApp:
    """Serves simulated request metrics over HTTP; started on construction, stopped by close()."""

    def __init__(self, *, tick: float = 0.05, host: str = "127.0.0.1") -> None:
        self.tick = tick
        self.host = host
        self.registry = CollectorRegistry()
        labels = ("service", "version")
        self.requests = Counter(
            "http_requests_total",
            "HTTP requests",
            (*labels, "code"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "HTTP request duration",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.webhook = Counter(
            "webhook_signature_verifications_total",
            "Webhook signature verifications",
            (*labels, "result"),
            registry=self.registry,
        )
        self.db = Counter(
            "db_connection_attempts_total",
            "Database connection attempts",
            (*labels, "result"),
            registry=self.registry,
        )
        self._lock = threading.Lock()
        self._profiles: dict[tuple[str, str], Profile] = {}
        self._carries: dict[tuple[str, str], _Carry] = {}
        self._stop = threading.Event()
        # Port 0: the OS picks a free port, no race with other tests.
        self._server, self._server_thread = start_http_server(0, host, registry=self.registry)
        self.port: int = self._server.server_port
        self._traffic = threading.Thread(target=self._run, name="metrics-app-traffic", daemon=True)
        self._traffic.start()
        self._closed = False

    # -- addresses ---------------------------------------------------------------------------

    @property
    def target(self) -> str:
        """`host:port` for a Prometheus static_configs target."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.target}/metrics"

    # -- profile control ---------------------------------------------------------------------

    def set(
        self,
        service: str,
        version: str,
        *,
        rps: float,
        error_ratio: float = 0.0,
        latency_seconds: float = 0.05,
        webhook_fail_ratio: float = 0.0,
        db_fail_ratio: float = 0.0,
    ) -> None:
        """Start or change the simulated traffic of (service, version); takes effect next tick."""
        if rps < 0:
            raise ValueError(f"rps must be >= 0, got {rps}")
        if latency_seconds < 0:
            raise ValueError(f"latency_seconds must be >= 0, got {latency_seconds}")
        profile = Profile(
            rps=float(rps),
            error_ratio=_ratio("error_ratio", error_ratio),
            latency_seconds=float(latency_seconds),
            webhook_fail_ratio=_ratio("webhook_fail_ratio", webhook_fail_ratio),
            db_fail_ratio=_ratio("db_fail_ratio", db_fail_ratio),
        )
        key = (service, version)
        with self._lock:
            self._carries.setdefault(key, _Carry())
            self._profiles[key] = profile

    def stop_traffic(self, service: str, version: str) -> None:
        """No more requests for (service, version); its series stay exported (rates fall to 0)."""
        with self._lock:
            self._profiles.pop((service, version), None)

    def remove(self, service: str, version: str) -> None:
        """Stop traffic and delete the series: Prometheus marks them stale on its next scrape."""
        with self._lock:
            self._profiles.pop((service, version), None)
            if self._carries.pop((service, version), None) is None:
                return
            # Only the series that were ever recorded exist; older clients raise on the others.
            for metric, labels in (
                (self.requests, ("200", "500")),
                (self.webhook, ("ok", "fail")),
                (self.db, ("ok", "error")),
            ):
                for label in labels:
                    with contextlib.suppress(KeyError):
                        metric.remove(service, version, label)
            with contextlib.suppress(KeyError):
                self.latency.remove(service, version)

    def profile(self, service: str, version: str) -> Profile | None:
        with self._lock:
            return self._profiles.get((service, version))

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the traffic thread and the HTTP server (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._traffic.join(timeout=5)
        self._server.shutdown()
        self._server.server_close()
        self._server_thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.tick):
            now = time.monotonic()
            elapsed, last = now - last, now
            with self._lock:
                for key, profile in self._profiles.items():
                    self._record(key, profile, self._carries[key], elapsed)

    def _record(
        self, key: tuple[str, str], profile: Profile, carry: _Carry, elapsed: float
    ) -> None:
        service, version = key
        carry.requests += profile.rps * elapsed
        count = int(carry.requests)
        if count == 0:
            return
        carry.requests -= count

        carry.errors += count * profile.error_ratio
        errors = min(count, int(carry.errors))
        carry.errors -= errors
        carry.webhook_fails += count * profile.webhook_fail_ratio
        webhook_fails = min(count, int(carry.webhook_fails))
        carry.webhook_fails -= webhook_fails
        carry.db_fails += count * profile.db_fail_ratio
        db_fails = min(count, int(carry.db_fails))
        carry.db_fails -= db_fails

        # `.labels()` creates a series at 0: call it only for what happened, like a real app.
        for metric, label, amount in (
            (self.requests, "200", count - errors),
            (self.requests, "500", errors),
            (self.webhook, "ok", count - webhook_fails),
            (self.webhook, "fail", webhook_fails),
            (self.db, "ok", count - db_fails),
            (self.db, "error", db_fails),
        ):
            if amount:
                metric.labels(service, version, label).inc(amount)
        histogram = self.latency.labels(service, version)
        for _ in range(count):
            histogram.observe(profile.latency_seconds)


def start_metrics_app(*, tick: float = 0.05) -> MetricsApp:
    """Factory for fixtures: `app = start_metrics_app(); yield app; app.close()`."""
    return MetricsApp(tick=tick)
