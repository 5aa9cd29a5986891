"""The SLO-gate test environment itself: a metrics app scraped every second by a real Prometheus."""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from opsapi.gates.prometheus import PrometheusProvider
from tests.support.metrics_app import MetricsApp
from tests.support.prometheus import (
    PrometheusError,
    PrometheusServer,
    between,
    near,
    running_prometheus,
)

SEL = 'service="checkout",version="v2"'
ERROR_RATIO = (
    f'sum(rate(http_requests_total{{{SEL},code=~"5.."}}[5s]))'
    f" / sum(rate(http_requests_total{{{SEL}}}[5s]))"
)
P95 = (
    "histogram_quantile(0.95, sum by (le) "
    f"(rate(http_request_duration_seconds_bucket{{{SEL}}}[5s])))"
)
WEBHOOK_OK_RATIO = (
    f'sum(rate(webhook_signature_verifications_total{{{SEL},result="ok"}}[5s]))'
    f" / sum(rate(webhook_signature_verifications_total{{{SEL}}}[5s]))"
)
DB_FAIL_RATIO = (
    f'sum(rate(db_connection_attempts_total{{{SEL},result="error"}}[5s]))'
    f" / sum(rate(db_connection_attempts_total{{{SEL}}}[5s]))"
)


@pytest.fixture(scope="module")
def app() -> Iterator[MetricsApp]:
    with MetricsApp() as metrics_app:
        # Traffic from the start, so that Prometheus's first scrapes already see it.
        metrics_app.set(
            "checkout",
            "v2",
            rps=20,
            error_ratio=0.25,
            latency_seconds=2.0,
            webhook_fail_ratio=0.1,
            db_fail_ratio=0.5,
        )
        metrics_app.set("cart", "v1", rps=20)
        yield metrics_app


@pytest.fixture(scope="module")
def prom(app: MetricsApp) -> Iterator[PrometheusServer]:
    with running_prometheus([app.target]) as server:
        yield server
    assert not server.running
    # Nothing of ours left behind (matched on our own temp dir, never a broad name).
    leftover = subprocess.run(["pgrep", "-f", str(server.dir)], capture_output=True, text=True)
    assert leftover.returncode == 1, f"prometheus still running: {leftover.stdout}"


def test_queries_reflect_the_traffic_profile(app: MetricsApp, prom: PrometheusServer) -> None:
    assert prom.wait_for(ERROR_RATIO, near(0.25, 0.1), timeout=6) is not None
    assert prom.wait_for(P95, between(1.0, 2.5), timeout=6) is not None
    assert prom.wait_for(WEBHOOK_OK_RATIO, near(0.9, 0.05), timeout=6) is not None
    assert prom.wait_for(DB_FAIL_RATIO, near(0.5, 0.1), timeout=6) is not None
    # The raw answer of the HTTP API: sample values are strings.
    [sample] = prom.query(ERROR_RATIO)
    assert sample["metric"] == {}
    assert isinstance(sample["value"][1], str)

    # A change shows within the rate window (5 s) plus a scrape or two.
    app.set("checkout", "v2", rps=20, error_ratio=0.0, latency_seconds=0.05)
    prom.wait_for(ERROR_RATIO, near(0.0, 0.01), timeout=8)
    # Observations of exactly 0.05 s land in the le="0.05" bucket.
    prom.wait_for(P95, between(0.025, 0.05), timeout=8)


def test_version_without_traffic_has_an_empty_result(prom: PrometheusServer) -> None:
    unknown = 'service="checkout",version="v9"'
    assert prom.query(ERROR_RATIO.replace(SEL, unknown)) == []
    assert prom.query(P95.replace(SEL, unknown)) == []
    assert prom.query(f"http_requests_total{{{unknown}}}") == []
    assert prom.value(ERROR_RATIO.replace(SEL, unknown)) is None


def test_stopped_traffic_is_nan_and_removed_series_are_empty(
    app: MetricsApp, prom: PrometheusServer
) -> None:
    sel = 'service="cart",version="v1"'
    # cart never fails, so it has no 5xx series: the documented `or vector(0)` makes that 0.
    ratio = (
        f'(sum(rate(http_requests_total{{{sel},code=~"5.."}}[3s])) or vector(0))'
        f" / sum(rate(http_requests_total{{{sel}}}[3s]))"
    )
    prom.wait_for(ratio, near(0.0, 0.001), timeout=6)

    app.stop_traffic("cart", "v1")
    # Series still exported but flat: 0/0 is NaN, a sample, not an empty result.
    prom.wait_for(ratio, lambda v: v is not None and math.isnan(v), timeout=6)
    [sample] = prom.query(ratio)
    assert sample["value"][1] == "NaN"

    app.remove("cart", "v1")
    # Gone from the exposition: Prometheus marks the series stale on its next scrape.
    prom.wait_for(f"count(http_requests_total{{{sel}}})", lambda v: v is None, timeout=4)
    # A range selector still holds the samples from before the staleness marker: rate() over
    # [3s] answers for up to 3 s more, then the result is empty too.
    prom.wait_for(ratio, lambda v: v is None, timeout=5)


async def test_prometheus_stopped_then_back(prom: PrometheusServer) -> None:
    provider = PrometheusProvider(prom.url, timeout_seconds=2, retries=0)
    counted = f'count_over_time(http_requests_total{{{SEL},code="200"}}[1m])'
    before = prom.value(counted)
    assert before is not None
    try:
        measured = await provider.measure(counted)
        assert measured.value is not None
        assert measured.value >= before

        prom.stop()
        assert not prom.running
        with pytest.raises(httpx.ConnectError):
            prom.query("up")
        # the gate provider's kept-alive connection is gone: no data, never an error
        stopped = await provider.measure(counted)
        assert stopped.value is None
        assert stopped.error == "prometheus unavailable: connection failed"

        prom.start()
        deadline = time.monotonic() + 10
        while True:
            try:
                result = prom.query(counted)
                break
            except (httpx.HTTPError, PrometheusError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        # Same data dir: what was scraped before the stop is still there.
        assert float(result[0]["value"][1]) >= before
        # the same provider reconnects by itself
        back = await provider.measure(counted)
        assert back.value is not None
        assert back.value >= before
    finally:
        await provider.aclose()
    # Scraping resumes (the first scrape after a start takes ~5 s).
    prom.wait_ready(timeout=15)
    prom.wait_for(ERROR_RATIO, lambda v: v is not None, timeout=6)
