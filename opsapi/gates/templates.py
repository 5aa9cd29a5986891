"""PromQL templates: only `{service}`, `{canary_version}`, `{stable_version}` are substituted."""

from __future__ import annotations

import re
from dataclasses import dataclass

_PLACEHOLDER = re.compile(r"\{(service|canary_version|stable_version)\}")


@dataclass(frozen=True)
class TemplateValues:
    service: str
    canary_version: str
    stable_version: str | None


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
