"""The docs stay true to the code: every route of the OpenAPI document is in docs/api.md (and
its RBAC table agrees with the RBAC matrix the API is tested against), every `OPSAPI_*` setting
is in the README's settings table, and every `reason_code` the code can answer is explained in
docs/troubleshooting.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from opsapi.canary.machine import Refusal, RefusalCode
from opsapi.canary.service import Refused
from opsapi.config import Settings
from opsapi.http.openapi import openapi_document
from opsapi.http.problems import refusal_problem
from tests.http.test_rbac import CALLERS, NOT_JWT, RBAC, SERVICE

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "/internal/ops"
ROUTE = re.compile(r"`(GET|POST|PUT|PATCH|DELETE) (/[^`\s]*)`")
RBAC_HEADING = "## Who may call what"


def section(text: str, heading: str) -> str:
    """The text under `heading` up to the next heading of the same level."""
    level = heading.split(" ", 1)[0]
    start = text.index(heading)
    rest = text[start + len(heading) :]
    following = re.search(rf"^{level} ", rest, re.MULTILINE)
    return rest[: following.start()] if following else rest


def openapi_routes() -> set[tuple[str, str]]:
    paths = openapi_document(PREFIX)["paths"]
    return {
        (method.upper(), path.removeprefix(PREFIX))
        for path, operations in paths.items()
        for method in operations
    }


def rbac_rows() -> dict[tuple[str, str], list[str]]:
    """docs/api.md's RBAC table: (method, path) -> its cells after the route."""
    table = section((ROOT / "docs/api.md").read_text(), RBAC_HEADING)
    rows: dict[tuple[str, str], list[str]] = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        found = ROUTE.fullmatch(cells[0]) if cells else None
        if found:
            rows[(found.group(1), found.group(2))] = cells[1:]
    return rows


def test_every_route_of_the_openapi_document_is_in_the_api_docs() -> None:
    documented = set(ROUTE.findall((ROOT / "docs/api.md").read_text()))

    missing = openapi_routes() - documented

    assert not missing, f"routes missing from docs/api.md: {sorted(missing)}"


def test_the_rbac_table_lists_every_route_once() -> None:
    rows = rbac_rows()

    assert set(rows) >= openapi_routes(), sorted(openapi_routes() - set(rows))
    assert all(len(cells) == len(CALLERS) + 1 for cells in rows.values()), rows


def _matrix_route(path: str) -> str:
    """A path of the RBAC matrix as the OpenAPI document writes it."""
    path = path.partition("?")[0].replace(f"/{SERVICE}", "/{service}")
    return path.replace("/rollouts/1/", "/rollouts/{rollout_id}/").replace(
        "/freezes/1", "/freezes/{freeze_id}"
    )


# The table's columns after the route, in the matrix's order of callers, then a note.
COLUMNS = ("no token", "viewer", "operator", "admin", "auditor")


def test_the_rbac_table_says_what_the_tested_matrix_answers() -> None:
    rows = rbac_rows()
    header = section((ROOT / "docs/api.md").read_text(), RBAC_HEADING)
    assert all(f"| {name} |" in header for name in COLUMNS)

    for (method, path, _), statuses in RBAC.items():
        route = (method, _matrix_route(path))
        assert route in rows, f"{route} is in the RBAC matrix but not in the docs' table"
        for caller, status, cell in zip(CALLERS, statuses, rows[route], strict=False):
            allowed = 200 <= status < 300
            assert cell.startswith("yes" if allowed else "no"), (route, caller, status, cell)
    for method, path in NOT_JWT:
        cells = rows[(method, path)]
        assert all(cell.startswith("signature") for cell in cells[: len(CALLERS)]), cells


SETTINGS_TABLE_ROW = re.compile(r"^\| `(OPSAPI_[A-Z0-9_]+)` \|", re.MULTILINE)


def test_every_setting_is_in_the_readme_settings_table() -> None:
    table = section((ROOT / "README.md").read_text(), "## Settings")
    documented = set(SETTINGS_TABLE_ROW.findall(table))
    prefix = str(Settings.model_config.get("env_prefix", "")).upper()

    settings = {prefix + name.upper() for name in Settings.model_fields}

    assert prefix == "OPSAPI_"
    assert not settings - documented, f"missing from the README: {sorted(settings - documented)}"
    assert not documented - settings, f"not settings any more: {sorted(documented - settings)}"


# Where code answers a reason code of its own (outside the machine's RefusalCode enum).
REASON_CODE = re.compile(r"""reason_code["']?\s*[=:]\s*["']([a-z_]+)["']""")


def reason_codes() -> set[str]:
    found = {code.value for code in RefusalCode}
    for source in (ROOT / "opsapi").rglob("*.py"):
        found |= set(REASON_CODE.findall(source.read_text()))
    return found


def test_the_reason_code_scan_finds_the_codes_outside_the_enum() -> None:
    codes = reason_codes()

    assert {"no_open_rollout", "open_rollout", "not_ready", "frozen"} <= codes


@pytest.mark.parametrize("code", sorted(reason_codes()))
def test_every_reason_code_is_explained_in_troubleshooting(code: str) -> None:
    table = section((ROOT / "docs/troubleshooting.md").read_text(), "## Refused rollout")

    row = re.search(rf"^\| `{code}` \| (\d{{3}}) \| (.+?) \| (.+?) \|$", table, re.MULTILINE)

    assert row, f"reason_code {code} has no row in docs/troubleshooting.md"
    assert len(row.group(2)) > 20, "say what it means"
    assert len(row.group(3)) > 20, "say what to do"
    if code in {refusal.value for refusal in RefusalCode}:
        # the status the API answers for a refusal with this code
        problem = refusal_problem(Refused(Refusal(RefusalCode(code), "detail")))
        assert int(row.group(1)) == problem.status
