"""deploy/prometheus/rules.yml's ratio expressions, evaluated by a real Prometheus.

A version that never failed exports no error series; its recorded error ratio must still be 0
(not missing), and a version that only fails must record a success ratio of 0.
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

import yaml

from tests.support.metrics_app import MetricsApp
from tests.support.prometheus import PrometheusServer

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules.yml"

# (recorded series, its value for a healthy version, for a version where everything fails)
EXPECTED = {
    "opsapi:error_ratio:rate5m": (0.0, 1.0),
    "opsapi:success_ratio:rate5m": (1.0, 0.0),
    "opsapi:webhook_signature_ok_ratio:rate5m": (1.0, 0.0),
    "opsapi:db_connection_failure_ratio:rate2m": (0.0, 1.0),
}
_names = itertools.count(1)


def recorded_expressions() -> dict[str, str]:
    document = yaml.safe_load(RULES.read_text())
    return {
        rule["record"]: rule["expr"]
        for group in document["groups"]
        for rule in group["rules"]
        if "record" in rule
    }


def values_by_service(prometheus: PrometheusServer, expr: str) -> dict[str, float]:
    return {
        sample["metric"]["service"]: float(sample["value"][1])
        for sample in prometheus.query(expr)
        if sample["metric"].get("version") == "v2"
    }


def test_ratios_are_recorded_for_versions_without_error_or_success_series(
    metrics_app: MetricsApp, prometheus: PrometheusServer
) -> None:
    # given a version that never fails and one whose every request, webhook and connection fails
    run = next(_names)
    healthy, failing = f"rules-healthy-{run}", f"rules-failing-{run}"
    metrics_app.set(healthy, "v2", rps=20)
    metrics_app.set(
        failing, "v2", rps=20, error_ratio=1.0, webhook_fail_ratio=1.0, db_fail_ratio=1.0
    )
    expressions = recorded_expressions()
    assert EXPECTED.keys() <= expressions.keys()
    try:
        # when Prometheus evaluates each recorded ratio
        seen: dict[str, dict[str, float]] = {}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            seen = {
                record: values_by_service(prometheus, expressions[record]) for record in EXPECTED
            }
            if all(healthy in by and failing in by for by in seen.values()):
                break
            time.sleep(0.25)

        # then both versions have every ratio, and the missing series counted as 0
        for record, (when_healthy, when_failing) in EXPECTED.items():
            assert healthy in seen[record], (record, seen[record])
            assert failing in seen[record], (record, seen[record])
            assert math.isclose(seen[record][healthy], when_healthy), (record, seen[record])
            assert math.isclose(seen[record][failing], when_failing), (record, seen[record])
    finally:
        metrics_app.remove(healthy, "v2")
        metrics_app.remove(failing, "v2")
