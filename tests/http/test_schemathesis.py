"""Schemathesis over the whole API, against a real `opsapi serve` on PostgreSQL (item 21).

Every documented operation, every check (no server error; documented status codes, content
types, headers and response schemas; schema-violating requests refused; schema-valid ones not
refused as malformed; unsupported methods; auth), in the examples, coverage, fuzzing and
stateful phases, with an admin token (an auditor token for the audit routes) and the PagerDuty
webhook signed by tests/http/schemathesis_hooks.py. It must find nothing. This is the regression
test for the hardening items 5-10: nested, non-finite and odd-text bodies, out-of-range
parameters and bad headers are what it generates.

Bounded for CI (about two minutes on two cores): SCHEMATHESIS_MAX_EXAMPLES (default 20) cases
per operation and phase, a fixed seed (SCHEMATHESIS_SEED to explore another), no example
database.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from opsapi.auth.tokens import LocalSigner
from tests.support.databases import create_pg_database, drop_pg_database
from tests.support.processes import free_port, start_server, stop

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[2]
WEBHOOK_SECRET = "whsec-schemathesis-3c1f0e"
MAX_EXAMPLES = os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "20")
SEED = os.environ.get("SCHEMATHESIS_SEED", "20261130")
# JSON Schema cannot say everything the server checks: that `since` is not after `until`, that
# a cursor is one this API issued, that an Idempotency-Key was not used for another body, a
# cron expression, a PromQL query, ascending steps, a rollout id that exists. The server answers
# those 422 naming the problem, so 422 is an acceptable answer to schema-valid data (400, a
# malformed request, is not).
ACCEPTED_FOR_VALID_DATA = ["2xx", "3xx", "401", "403", "404", "409", "422", "429"]


@dataclass
class Served:
    url: str
    admin: str
    auditor: str
    log: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """`opsapi serve` on a fresh, migrated PostgreSQL database."""
    workdir = tmp_path_factory.mktemp("schemathesis")
    name, url = asyncio.run(create_pg_database())
    key_file = workdir / "signing-key.json"
    signer = LocalSigner.load_or_create(key_file)
    port = free_port()
    env = {
        "OPSAPI_DATABASE_URL": url,
        "OPSAPI_LOCAL_KEY_FILE": str(key_file),
        "OPSAPI_DATA_DIR": str(workdir),
        "OPSAPI_ENV": "test",
        "OPSAPI_CONTROLLER_ENABLED": "false",
        "OPSAPI_PAGERDUTY_WORKER_ENABLED": "false",
        "OPSAPI_PAGERDUTY_WEBHOOK_SECRETS": WEBHOOK_SECRET,
    }
    log = workdir / "server.log"
    process = start_server(port, env, log)
    try:
        yield Served(
            url=f"http://127.0.0.1:{port}/internal/ops/openapi.json",
            admin=signer.mint(subject="schemathesis-admin", roles=["admin"]),
            auditor=signer.mint(subject="schemathesis-auditor", roles=["auditor"]),
            log=log,
        )
    finally:
        stop(process)
        asyncio.run(drop_pg_database(name))


def config(served: Served) -> str:
    """schemathesis.toml: the tokens, and what the checks accept (every check is enabled by
    default; one named on the command line could not be turned off for one operation)."""
    lines = [
        f'headers = {{ Authorization = "Bearer {served.admin}" }}',
        "",
        "[checks.positive_data_acceptance]",
        f"expected-statuses = {ACCEPTED_FOR_VALID_DATA!r}".replace("'", '"'),
        "",
        "[[operations]]",
        'include-path-regex = "^/internal/ops/audit"',
        f'headers = {{ Authorization = "Bearer {served.auditor}" }}',
    ]
    return "\n".join(lines) + "\n"


def test_schemathesis_finds_no_failure(served: Served, tmp_path: Path) -> None:
    # given the served OpenAPI document, the tokens and the signing hook
    (tmp_path / "schemathesis.toml").write_text(config(served))
    command = [
        sys.executable, "-m", "schemathesis.cli",
        "--config-file", str(tmp_path / "schemathesis.toml"),
        "run", served.url,
        "--phases", "examples,coverage,fuzzing,stateful",
        "--max-examples", MAX_EXAMPLES,
        "--seed", SEED,
        "--generation-database", "none",
        "--workers", "1",
        "--request-timeout", "15",
        "--no-color",
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SCHEMATHESIS_HOOKS": "tests.http.schemathesis_hooks",
        "OPSAPI_TEST_WEBHOOK_SECRET": WEBHOOK_SECRET,
    }
    # when schemathesis runs every phase over every operation
    run = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    report = run.stdout[-12000:] + run.stderr[-3000:]
    print(run.stdout[-1500:])  # the summary: phases, operations, cases generated
    # then it finds no failure and no error, every operation tested
    assert run.returncode == 0, report
    assert "No issues found" in run.stdout or " passed" in run.stdout, report
    # and the server logged no unhandled error
    assert "unhandled error" not in served.log.read_text(), served.log.read_text()[-5000:]
