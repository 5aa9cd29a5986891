"""PromQL templates: only `{service}`, `{canary_version}`, `{stable_version}` are substituted.

One definition of a placeholder serves both `render` (the controller, every evaluation) and
`check_template` (the API, when a policy is put), so what is accepted is what gets substituted.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import promql_parser

PLACEHOLDERS = ("service", "canary_version", "stable_version")
_PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")
# What an author can only have meant as a placeholder: a bare name in braces. PromQL's own
# braces always hold matchers (`code=~"5.."`), a quoted metric name, or nothing (`{}`).
_PLACEHOLDER_LIKE = re.compile(r"\{\s*[A-Za-z_][A-Za-z0-9_]*\s*\}")
_SHOWN = 40  # characters of a bad placeholder an error message repeats
_PARSER_MESSAGE = 120  # characters of the PromQL parser's own message kept in an error


@dataclass(frozen=True)
class TemplateValues:
    service: str
    canary_version: str
    stable_version: str | None


# Substituted before parsing a template: plain values, valid wherever the real ones would be.
SAMPLE_VALUES = TemplateValues("sample-service", "sample-canary", "sample-stable")


def escape_label_value(value: str) -> str:
    """A string made safe inside a double-quoted PromQL label matcher."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(template: str, values: TemplateValues) -> str:
    """Substitute the exact placeholders; PromQL's own braces (`{code=~"5.."}`) stay untouched."""
    replacements = {
        "service": values.service,
        "canary_version": values.canary_version,
        # No stable version yet (a service's first rollout): match nothing rather than anything.
        "stable_version": values.stable_version or "__none__",
    }
    return _PLACEHOLDER.sub(
        lambda match: escape_label_value(replacements[match.group(1)]), template
    )


def unknown_placeholders(template: str) -> list[str]:
    """Brace-enclosed names in `template` that look like placeholders but are not exact ones."""
    return [
        match.group(0)
        for match in _PLACEHOLDER_LIKE.finditer(template)
        if not _PLACEHOLDER.fullmatch(match.group(0))
    ]


class TemplateError(ValueError):
    """A gate query template that would not work; the message names only what is wrong."""


def check_template(template: str) -> None:
    """Raise TemplateError unless `template` uses only exact placeholders and renders to PromQL
    whose value is a number per series (an instant vector or a scalar)."""
    unknown = unknown_placeholders(template)
    if unknown:
        shown = unknown[0] if len(unknown[0]) <= _SHOWN else unknown[0][: _SHOWN - 1] + "…"
        raise TemplateError(
            f"unknown placeholder {shown}: the placeholders are "
            + ", ".join("{" + name + "}" for name in PLACEHOLDERS)
        )
    try:
        expression = promql_parser.parse(render(template, SAMPLE_VALUES))
    except ValueError as error:
        raise TemplateError(f"not valid PromQL: {str(error)[:_PARSER_MESSAGE]}") from None
    while isinstance(expression, promql_parser.ParenExpr):
        expression = expression.expr
    if isinstance(expression, promql_parser.MatrixSelector | promql_parser.SubqueryExpr):
        raise TemplateError("a range vector is not a value: wrap it in a function such as rate()")
    if isinstance(expression, promql_parser.StringLiteral):
        raise TemplateError("a string is not a value: the query must give a number")


def _accept_prometheus_2_functions() -> None:
    # The parser follows Prometheus 3, which renamed holt_winters; 2.x servers still answer it.
    value_type = promql_parser.ValueType
    holt_winters = promql_parser.Function(
        "holt_winters", [value_type.Matrix, value_type.Scalar, value_type.Scalar], value_type.Vector
    )
    # ValueError: already known (a parser release that has it built in).
    with contextlib.suppress(ValueError):
        promql_parser.register_extra_functions([holt_winters])


_accept_prometheus_2_functions()
