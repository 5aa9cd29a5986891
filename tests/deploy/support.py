"""Shared by the deployment tests: paths, promtool, the rule files."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from tests.support.databases import unavailable

ROOT = Path(__file__).resolve().parents[2]


def promtool() -> str:
    """promtool's path (a failure in CI, a skip elsewhere, when it is not installed)."""
    found = shutil.which("promtool")
    if found is None:
        unavailable("promtool (Debian package prometheus)")
        raise AssertionError("unreachable")
    return found


def rule_groups(name: str) -> list[dict[str, Any]]:
    """The groups of deploy/prometheus/`name`."""
    groups: list[dict[str, Any]] = yaml.safe_load((ROOT / "deploy/prometheus" / name).read_text())[
        "groups"
    ]
    return groups
