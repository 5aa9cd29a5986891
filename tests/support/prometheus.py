"""A real Prometheus server for tests: started on loopback with a temp dir, scraping every 1 s.

    with MetricsApp() as app, running_prometheus([app.target]) as prom:
        app.set("checkout", "v2", rps=20, error_ratio=0.25)
        prom.wait_for(ERROR_RATIO, lambda v: v is not None and abs(v - 0.25) < 0.1)

`stop()` then `start()` restarts on the same data dir and port (the samples scraped before the stop
are still there). Every server started here is killed at interpreter exit if a test forgot to.
"""

from __future__ import annotations

import atexit
import math
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from tests.support.databases import unavailable
from tests.support.processes import free_port

PROMETHEUS_BINARY = os.environ.get("OPSAPI_TEST_PROMETHEUS", "/usr/bin/prometheus")
JOB = "app"

_running: set[PrometheusServer] = set()


def prometheus_binary() -> str | None:
    """Path of the Prometheus binary, or None when it is not installed."""
    if os.path.isfile(PROMETHEUS_BINARY) and os.access(PROMETHEUS_BINARY, os.X_OK):
        return PROMETHEUS_BINARY
    return shutil.which("prometheus")


def prometheus_available() -> bool:
    return prometheus_binary() is not None


def require_prometheus() -> str:
    """The binary's path; skips the test locally, fails it in CI, when Prometheus is missing."""
    binary = prometheus_binary()
    if binary is None:
        unavailable(f"Prometheus binary ({PROMETHEUS_BINARY})")
        raise AssertionError("unreachable")  # unavailable() always raises
    return binary


class PrometheusError(RuntimeError):
    """Prometheus answered, but with an error (bad PromQL, 503 while starting …)."""


def _config(targets: Sequence[str], rule_file: Path | None) -> str:
    lines = [
        "global:",
        "  scrape_interval: 1s",
        "  scrape_timeout: 1s",
        "  evaluation_interval: 1s",
    ]
    if rule_file is not None:
        lines += ["rule_files:", f"  - {rule_file}"]
    lines += [
        "scrape_configs:",
        f"  - job_name: {JOB}",
        "    static_configs:",
        f"      - targets: [{', '.join(repr(t) for t in targets)}]",
    ]
    return "\n".join(lines) + "\n"


class PrometheusServer:
    """`/usr/bin/prometheus` as a child process, scraping `targets` every second.

    `data_dir` None: a temp dir, removed by `close()`. `rules`: YAML text of a rule file (recording
    or alerting rules, evaluated every second).
    """

    def __init__(
        self,
        targets: Sequence[str],
        *,
        data_dir: Path | None = None,
        port: int | None = None,
        rules: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.binary = require_prometheus()
        self.targets = list(targets)
        self._own_dir = data_dir is None
        self.dir = Path(tempfile.mkdtemp(prefix="opsapi-prom-")) if data_dir is None else data_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.config_file = self.dir / "prometheus.yml"
        self.log_file = self.dir / "prometheus.log"
        rule_file = None
        if rules is not None:
            rule_file = self.dir / "rules.yml"
            rule_file.write_text(rules)
        self.config_file.write_text(_config(self.targets, rule_file))
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None
        self._client = httpx.Client(timeout=5)

    # -- addresses ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the process (again: same data dir, same port). Does not wait: see wait_ready()."""
        if self.running:
            return
        command = [
            self.binary,
            f"--config.file={self.config_file}",
            f"--storage.tsdb.path={self.dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
            # Keep everything inside the temp dir (no /etc/prometheus consoles).
            f"--web.console.templates={self.dir}",
            f"--web.console.libraries={self.dir}",
            *self.extra_args,
        ]
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        _running.add(self)

    def wait_ready(self, timeout: float = 20) -> None:
        """Until /-/ready answers 200 and every target has been scraped successfully (`up`)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"prometheus is not running: {self.log_tail()}")
            try:
                if self._targets_up():
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                continue  # report the exit above
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus not ready after {timeout}s: {self.log_tail()}")
            time.sleep(0.1)

    def _targets_up(self) -> bool:
        if self._client.get(f"{self.url}/-/ready", timeout=1).status_code != 200:
            return False
        params = {"state": "active"}
        body = self._client.get(f"{self.url}/api/v1/targets", params=params, timeout=1).json()
        active = body["data"]["activeTargets"]
        up = {t["labels"]["instance"] for t in active if t["health"] == "up"}
        return set(self.targets) <= up

    def stop(self, timeout: float = 5) -> None:
        """SIGTERM, then SIGKILL after `timeout` s. Keeps the data dir for a later start()."""
        process = self.process
        if process is None:
            return
        try:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
        finally:
            _running.discard(self)

    def close(self) -> None:
        """Stop for good; remove the temp dir if this object created it."""
        try:
            self.stop()
        finally:
            self._client.close()
            if self._own_dir:
                shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # -- queries -----------------------------------------------------------------------------

    def query(self, promql: str, *, timeout: float = 5) -> list[dict[str, Any]]:
        """`/api/v1/query` now; the `data.result` list (values are strings, as in the API).

        Raises httpx.ConnectError when Prometheus is down, PrometheusError when it answers with
        an error. A scalar or string result is returned as a one-element vector-like list.
        """
        response = self._client.get(
            f"{self.url}/api/v1/query", params={"query": promql}, timeout=timeout
        )
        try:
            body = response.json()
        except ValueError:
            raise PrometheusError(f"{response.status_code}: {response.text[:500]}") from None
        if response.status_code != 200 or body.get("status") != "success":
            raise PrometheusError(f"{response.status_code}: {body.get('error', body)}")
        data = body["data"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def value(self, promql: str) -> float | None:
        """The single sample's value as a float (NaN possible), None for an empty result."""
        result = self.query(promql)
        if not result:
            return None
        if len(result) > 1:
            raise PrometheusError(f"{promql!r} returned {len(result)} series, expected one")
        return float(result[0]["value"][1])

    def wait_for(
        self,
        promql: str,
        predicate: Callable[[float | None], bool],
        *,
        timeout: float = 10,
        interval: float = 0.25,
    ) -> float | None:
        """Poll `value(promql)` until `predicate(value)`; AssertionError with the history if not."""
        deadline = time.monotonic() + timeout
        seen: list[float | None] = []
        while True:
            try:
                value = self.value(promql)
            except (httpx.HTTPError, PrometheusError) as error:
                seen.append(None)
                last_error: Exception | None = error
            else:
                last_error = None
                seen.append(value)
                if predicate(value):
                    return value
            if time.monotonic() > deadline:
                shown = ", ".join("None" if v is None else f"{v:.4g}" for v in seen[-20:])
                raise AssertionError(
                    f"{promql!r} did not satisfy the condition within {timeout}s; "
                    f"last values: [{shown}]; last error: {last_error!r}"
                )
            time.sleep(interval)


def near(expected: float, tolerance: float) -> Callable[[float | None], bool]:
    """Predicate for wait_for(): a number within ±tolerance of expected (not None, not NaN)."""
    return lambda v: v is not None and not math.isnan(v) and abs(v - expected) <= tolerance


def between(low: float, high: float) -> Callable[[float | None], bool]:
    """Predicate for wait_for(): low <= value <= high (not None, not NaN)."""
    return lambda v: v is not None and not math.isnan(v) and low <= v <= high


@contextmanager
def running_prometheus(
    targets: Sequence[str],
    data_dir: Path | None = None,
    *,
    ready_timeout: float = 20,
    rules: str | None = None,
) -> Iterator[PrometheusServer]:
    """Factory for fixtures: a started, ready Prometheus that is always stopped afterwards.

    Skips (locally) or fails (CI) when the binary is missing.
    """
    for attempt in range(3):
        server = PrometheusServer(targets, data_dir=data_dir, rules=rules)
        try:
            server.start()
            server.wait_ready(ready_timeout)
        except (RuntimeError, TimeoutError):
            # The free port was taken between choosing it and Prometheus binding it: retry.
            retry = attempt < 2 and "address already in use" in server.log_tail()
            server.close()
            if retry:
                continue
            raise
        except BaseException:
            server.close()
            raise
        break
    try:
        yield server
    finally:
        server.close()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_running):
        server.stop(timeout=2)
