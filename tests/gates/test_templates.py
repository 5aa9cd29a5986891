"""PromQL templates: exact placeholders only, label values escaped."""

from __future__ import annotations

import pytest

from opsapi.gates.templates import TemplateValues, escape_label_value, render

VALUES = TemplateValues("checkout", "v2", "v1")


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ('up{service="{service}"}', 'up{service="checkout"}'),
        (
            'rate(x{service="{service}",version="{canary_version}",code=~"5.."}[5m])',
            'rate(x{service="checkout",version="v2",code=~"5.."}[5m])',
        ),
        ('x{version="{stable_version}"}', 'x{version="v1"}'),
        ('sum by (le) (x{a="b"})', 'sum by (le) (x{a="b"})'),
        ('x{service="{Service}"} {other} {service }', 'x{service="{Service}"} {other} {service }'),
    ],
)
def test_render_substitutes_exact_placeholders_only(template: str, expected: str) -> None:
    assert render(template, VALUES) == expected


def test_label_values_are_escaped() -> None:
    hostile = TemplateValues("checkout", 'v2"} or vector(1) or x{a="', None)
    rendered = render('x{version="{canary_version}"}', hostile)
    assert rendered == 'x{version="v2\\"} or vector(1) or x{a=\\""}'
    assert escape_label_value("a\\b\nc") == "a\\\\b\\nc"


def test_missing_stable_version_matches_nothing() -> None:
    rendered = render('x{version="{stable_version}"}', TemplateValues("s", "v2", None))
    assert rendered == 'x{version="__none__"}'
