"""The Prometheus provider never raises: every failure, empty answer or NaN is no data."""

from __future__ import annotations

import pytest

from opsapi.gates.prometheus import PrometheusProvider
from tests.support.metrics_app import MetricsApp
from tests.support.prometheus import PrometheusServer

CASES = [
    pytest.param("vector(0.25)", 0.25, None, id="one-series"),
    pytest.param("scalar(vector(2))", 2.0, None, id="scalar"),
    pytest.param('up{job="nonexistent"}', None, "no series", id="empty"),
    pytest.param("vector(0) / vector(0)", None, "NaN", id="nan"),
    pytest.param("vector(1) / vector(0)", None, "infinity", id="inf"),
    pytest.param(
        'label_replace(vector(1), "a", "x", "", "") or label_replace(vector(2), "a", "y", "", "")',
        None,
        "2 series",
        id="two-series",
    ),
    pytest.param("sum(rate(", None, "rejected the query", id="bad-promql"),
]


@pytest.mark.parametrize(("query", "value", "error"), CASES)
async def test_measure(
    prometheus: PrometheusServer, query: str, value: float | None, error: str | None
) -> None:
    provider = PrometheusProvider(prometheus.url, timeout_seconds=2)
    try:
        measurement = await provider.measure(query)
    finally:
        provider.close()
    assert measurement.value == value
    if error is not None:
        assert error in (measurement.error or "")


async def test_unreachable_prometheus_is_no_data(metrics_app: MetricsApp) -> None:
    provider = PrometheusProvider("http://127.0.0.1:9", timeout_seconds=0.5, retries=0)
    try:
        measurement = await provider.measure("vector(1)")
    finally:
        provider.close()
    assert measurement.value is None
    assert measurement.error == "prometheus unavailable: connection failed"
