"""The Grafana dashboard: every query parses, and reads only series that exist — the product's
own metrics (opsapi/metrics.py), the conventions services expose (docs/metrics.md) and the
recording rules (deploy/prometheus/rules.yml) — with labels those series carry."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from opsapi.metrics import Metrics
from tests.deploy.support import ROOT, promtool, rule_groups

DASHBOARD = ROOT / "deploy/grafana/opsapi-dashboard.json"
# What Grafana puts in place of its variables before sending a query.
VARIABLES = {"service": "checkout", "version": "v1|v2", "datasource": "prometheus",
             "__rate_interval": "1m", "__interval": "15s", "__range": "6h"}  # fmt: skip
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def substitute(expr: str) -> str:
    """`expr` as Grafana sends it, with the variables' sample values."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in VARIABLES, f"undefined variable ${name}"
        return VARIABLES[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)


def queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    found = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            inner = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", text)
            assert inner, text
            found.append((f"variable {variable['name']}", inner.group(1)))
    return found


def known_series() -> dict[str, set[str] | None]:
    """Series names that exist, with their labels (None: the labels are not checked)."""
    series: dict[str, set[str] | None] = {}
    for family in Metrics().registry.collect():
        # The family's label names: a labelled metric exposes no sample until it is used.
        labels = set(family.samples[0].labels) if family.samples else None
        collector_labels = _declared_labels(family.name)
        suffixes = {"counter": ("_total", "_created"), "histogram": (*HISTOGRAM_SERIES, "_created")}
        for suffix in suffixes.get(family.type, ("",)):
            series[family.name + suffix] = collector_labels or labels
    table = (ROOT / "docs/metrics.md").read_text().split("## Default gates")[0]
    for name, kind, labels in re.findall(r"^\| `(\w+)` \| (\w+) \| ([^|]+) \|", table, re.M):
        label_set = set(re.findall(r"`(\w+)`", labels))
        series[name] = label_set
        if kind == "histogram":
            for suffix in HISTOGRAM_SERIES:
                series[name + suffix] = label_set | ({"le"} if suffix == "_bucket" else set())
    for group in rule_groups("rules.yml"):
        for rule in group["rules"]:
            if "record" in rule:
                series[rule["record"]] = None
    series["up"] = {"job", "instance"}
    return series


def _declared_labels(name: str) -> set[str] | None:
    metrics = Metrics()
    for collector in vars(metrics).values():
        if getattr(collector, "_name", None) in (name, name.removesuffix("_total")):
            labels = set(getattr(collector, "_labelnames", ()))
            if getattr(collector, "_type", "") == "histogram":
                labels |= {"le"}
            return labels
    return None


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, matched label names) of every vector selector in `expr`."""
    found: list[tuple[str, set[str]]] = []

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            labels = {m.name for m in node.matchers.matchers if m.name != "__name__"}
            found.append((node.name or "", labels))

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


@pytest.mark.parametrize(("where", "expr"), queries(), ids=[w for w, _ in queries()])
def test_every_query_parses_and_reads_existing_series_by_their_labels(
    where: str, expr: str
) -> None:
    series = known_series()
    used = selectors(substitute(expr))
    assert used, "no series"
    for name, labels in used:
        assert name in series, f"{name} is neither an opsapi metric, a convention nor a rule"
        known = series[name]
        if known is not None:
            # the scrape adds job and instance to every series
            assert labels <= known | {"job", "instance"}, f"{name}: {labels - known}"


def test_prometheus_itself_parses_every_panel_query(tmp_path: Path) -> None:
    rules = [
        {"record": f"dashboard:query_{i}", "expr": substitute(expr)}
        for i, (_, expr) in enumerate(queries())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_canary_panels_compare_versions_of_the_selected_service() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["service"]["multi"] is False
    assert variables["version"]["includeAll"] is True
    titles = set()
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            if not re.search(r"\bhttp_request", target["expr"]):
                continue
            titles.add(panel["title"])
            for name, labels in selectors(substitute(target["expr"])):
                assert {"service", "version"} <= labels, (panel["title"], name)
            assert "by (version" in target["expr"], panel["title"]
            assert target["legendFormat"] == "{{version}}"
    assert {"Error rate by version (5xx)", "p95 latency by version",
            "Success rate by version (2xx/3xx)"} <= titles  # fmt: skip


def test_panels_have_unique_ids_and_do_not_overlap() -> None:
    panels = dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}  # fmt: skip
        assert not cells & area, panel["title"]
        cells |= area


def test_a_query_for_a_metric_that_does_not_exist_is_caught() -> None:
    series = known_series()
    assert "opsapi_rollout_desired_weight" in series
    assert "http_request_duration_seconds_bucket" in series
    (name, _), *_ = selectors(substitute('rate(opsapi_rollouts_total{service="$service"}[1m])'))
    assert name not in series


RULES = [
    (f"{name}: {rule.get('alert') or rule.get('record')}", rule["expr"])
    for name in ("rules.yml", "alerts.yml")
    for group in rule_groups(name)
    for rule in group["rules"]
]


@pytest.mark.parametrize(("where", "expr"), RULES, ids=[w for w, _ in RULES])
def test_every_rule_and_alert_reads_existing_series_by_their_labels(where: str, expr: str) -> None:
    series = known_series()
    for name, labels in selectors(expr):
        assert name in series, f"{name} is neither an opsapi metric, a convention nor a rule"
        known = series[name]
        if known is not None:
            assert labels <= known | {"job", "instance"}, f"{name}: {labels - known}"
