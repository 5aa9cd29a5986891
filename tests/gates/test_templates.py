"""PromQL templates: exact placeholders only, label values escaped, templates checked at PUT."""

from __future__ import annotations

import promql_parser
import pytest

from opsapi.gates.templates import (
    TemplateError,
    TemplateValues,
    check_template,
    escape_label_value,
    render,
    unknown_placeholders,
)

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


# --- checking a template when a policy is put ----------------------------------------------------

REQUESTS = 'http_requests_total{service="{service}",version="{canary_version}"'

# (template, the unknown placeholders it holds); PromQL's own braces are never reported.
PLACEHOLDER_CASES = [
    pytest.param(REQUESTS + "}", [], id="exact-placeholders"),
    pytest.param(REQUESTS + ',code=~"5.."}', [], id="promql-matcher-braces"),
    pytest.param("x{}", [], id="empty-matcher"),
    pytest.param('{__name__=~"http_.*"}', [], id="name-matcher-only"),
    pytest.param('{"quoted.metric"}', [], id="quoted-metric-name"),
    pytest.param('x{a=~"a{2,3}"}', [], id="regex-repetition"),
    pytest.param('x{version="{stable_version}"}', [], id="stable-version"),
    pytest.param('x{version="{canary}"}', ["{canary}"], id="canary"),
    pytest.param('x{version="{version}"}', ["{version}"], id="version"),
    pytest.param('x{service="{Service}"}', ["{Service}"], id="wrong-case"),
    pytest.param('x{service="{ service }"}', ["{ service }"], id="spaces-inside"),
    pytest.param('x{a="{service}",b="{svc}",c="{env}"}', ["{svc}", "{env}"], id="several"),
    pytest.param("x{foo}", ["{foo}"], id="bare-name-as-matcher"),
]


@pytest.mark.parametrize(("template", "unknown"), PLACEHOLDER_CASES)
def test_unknown_placeholders(template: str, unknown: list[str]) -> None:
    assert unknown_placeholders(template) == unknown


ERROR_RATE = f'(sum(rate({REQUESTS},code=~"5.."}}[5m])) or vector(0)) / sum(rate({REQUESTS}}}[5m]))'

VALID = [
    pytest.param(ERROR_RATE, id="ratio-with-or-vector"),
    pytest.param(f"{REQUESTS}}}", id="selector"),
    pytest.param("x{}", id="empty-matcher"),
    pytest.param("vector(1)", id="function"),
    pytest.param("1", id="scalar"),
    pytest.param(
        "histogram_quantile(0.99, sum by (le) (rate(h_bucket"
        '{service="{service}",version="{stable_version}"}[5m])))',
        id="baseline-p99",
    ),
    pytest.param("sum(increase(x[10s]))", id="increase"),
    pytest.param("holt_winters(x[5m], 0.5, 0.5)", id="prometheus-2-function"),
    pytest.param("(x)", id="parenthesised"),
]


@pytest.mark.parametrize("template", VALID)
def test_valid_templates_pass(template: str) -> None:
    check_template(template)


# (template, what the message must say, what it must not repeat)
INVALID = [
    pytest.param("sum(rate(x[5m])", "unclosed left parenthesis", None, id="unclosed-paren"),
    pytest.param("rate(x)", "not valid PromQL", None, id="rate-of-instant-vector"),
    pytest.param("nosuch_function(x)", "not valid PromQL", None, id="unknown-function"),
    pytest.param("sum(x) by", "not valid PromQL", None, id="dangling-by"),
    pytest.param("{}", "not valid PromQL", None, id="empty-selector-alone"),
    pytest.param("x[5m]", "range vector", None, id="range-vector"),
    pytest.param("(rate(x[5m])[5m:1m])", "range vector", None, id="subquery"),
    pytest.param('"text"', "string", None, id="string"),
    pytest.param(
        'sum(rate(x{service="{service}",version="{canary}"}[5m]))',
        "unknown placeholder {canary}",
        "sum(rate",
        id="unknown-placeholder",
    ),
    pytest.param(
        'x{version="{' + "v" * 300 + '}"}',
        "unknown placeholder {vvv",
        "v" * 41,
        id="long-placeholder-shortened",
    ),
]


@pytest.mark.parametrize(("template", "says", "not_repeated"), INVALID)
def test_invalid_templates_are_refused(template: str, says: str, not_repeated: str | None) -> None:
    with pytest.raises(TemplateError) as refused:
        check_template(template)
    message = str(refused.value)
    assert says in message
    assert len(message) <= 200
    if not_repeated is not None:
        assert not_repeated not in message


def test_placeholders_are_checked_before_parsing() -> None:
    # `{canary}` would also make the query fail to parse; the message names the placeholder.
    with pytest.raises(TemplateError, match=r"\{canary\}"):
        check_template("x{version={canary}}")


def test_every_substituted_value_renders_to_valid_promql() -> None:
    # What check_template accepts must still parse after render() with hostile real values.
    hostile = TemplateValues("checkout", 'v2"} or vector(1) or x{a="', "v1\\")
    rendered = render(ERROR_RATE, hostile)
    assert promql_parser.parse(rendered)
