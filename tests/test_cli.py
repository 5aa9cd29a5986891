"""The `opsapi` command fails with one line that says what to fix: no traceback, no secret."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.processes import free_port

SECRET = "REAL-SECRET-0123456789"
PASSWORD = "hunter2-db-password"


def run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    clean = {name: value for name, value in os.environ.items() if not name.startswith("OPSAPI_")}
    return subprocess.run(
        [sys.executable, "-m", "opsapi", *args],
        env={**clean, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def unreachable_url() -> str:
    return f"postgresql+asyncpg://opsapi:{PASSWORD}@127.0.0.1:{free_port()}/opsapi"


CASES = [
    pytest.param(
        ["migrate"],
        {"OPSAPI_PAGERDUTY_WEBHOOK_SECRETS": SECRET, "OPSAPI_PAGERDUTY_EVENTS_URL": "http://x"},
        2,
        "OPSAPI_PAGERDUTY_EVENTS_URL must be an https:// URL",
        id="bad setting next to a webhook secret",
    ),
    pytest.param(
        ["serve"],
        {
            "OPSAPI_DATABASE_URL": f"postgresql+asyncpg://u:{PASSWORD}@db:5432/x",
            "OPSAPI_CONTROLLER_POLL_SECONDS": "soon",
        },
        2,
        "OPSAPI_CONTROLLER_POLL_SECONDS: Input should be a valid number",
        id="bad setting next to a database password",
    ),
    pytest.param(
        ["token", "--role", "admin", "--subject", "me", "--ttl", "365d"],
        {},
        2,
        "--ttl: '365d' is longer than 30 days",
        id="token lifetime too long",
    ),
    pytest.param(
        ["token", "--role", "admin", "--subject", "me", "--ttl", "soon"],
        {},
        2,
        "--ttl: 'soon' is not a duration",
        id="token lifetime not a duration",
    ),
    pytest.param(
        ["migrate"],
        {"OPSAPI_DATABASE_URL": f"postgresql://u:{PASSWORD}@127.0.0.1:5432/x"},
        2,
        "OPSAPI_DATABASE_URL must start with postgresql+asyncpg://",
        id="database URL without the asyncpg driver",
    ),
    pytest.param(
        ["serve"],
        {"OPSAPI_ENV": "production"},
        2,
        "OPSAPI_ENV=production requires OPSAPI_JWKS_URL",
        id="production without an identity provider",
    ),
    *(
        pytest.param(
            [command],
            {"OPSAPI_DATABASE_URL": "unreachable"},
            1,
            "cannot reach the database at 127.0.0.1:",
            id=f"{command} with the database down",
        )
        for command in ("migrate", "serve", "controller")
    ),
]


@pytest.mark.parametrize(("args", "env", "code", "message"), CASES)
def test_failures_are_one_line_naming_the_fix_without_secrets(
    args: list[str], env: dict[str, str], code: int, message: str, tmp_path: Path
) -> None:
    if env.get("OPSAPI_DATABASE_URL") == "unreachable":
        env = {**env, "OPSAPI_DATABASE_URL": unreachable_url()}
    # when the command runs with a wrong setting, argument or database
    result = run(args, {"OPSAPI_ENV": "test", **env}, tmp_path)
    # then it exits non-zero with one line on stderr saying what is wrong
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert lines[0].startswith("opsapi")
    # and no secret, no traceback, no validation dump
    for leaked in (SECRET, "0123456789", PASSWORD, "Traceback", "input_value", "psycopg"):
        assert leaked not in result.stderr + result.stdout
