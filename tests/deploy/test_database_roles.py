"""The migration Job's steps, run as written against real PostgreSQL: the roles of the compose
stack, `opsapi migrate` as the schema owner, the grants container's own command, then the
servers as the application role."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import yaml

from tests.deploy.support import ROOT
from tests.support.app import running_app
from tests.support.databases import PG_ADMIN_DSN, unavailable

pytestmark = pytest.mark.postgres

GRANTS_MOUNT = "/etc/opsapi-grants"


def job() -> dict[str, object]:
    return yaml.safe_load((ROOT / "deploy/kubernetes/migrate/job.yaml").read_text())  # type: ignore[no-any-return]


def dsn(user: str, database: str) -> str:
    base = urlsplit(PG_ADMIN_DSN)
    netloc = f"{user}:unused@{base.hostname}:{base.port or 5432}"
    return urlunsplit((base.scheme, netloc, f"/{database}", "", ""))


def statements(sql: str, names: dict[str, str]) -> list[str]:
    for placeholder, name in names.items():
        sql = re.sub(rf"\b{placeholder}\b", name, sql)
    lines = [line.split("--")[0] for line in sql.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def run_job(migrator_url: str, app_role: str, grants_dir: Path) -> None:
    """The Job's two containers in order, with their own arguments and commands."""
    spec = job()["spec"]["template"]["spec"]  # type: ignore[index]
    (migrate,) = spec["initContainers"]
    (grants,) = spec["containers"]
    env = {**os.environ, "OPSAPI_DATABASE_URL": migrator_url}
    result = subprocess.run(
        [sys.executable, "-m", "opsapi", *migrate["args"]],
        env=env, capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "database is up to date"
    command = [part.replace(GRANTS_MOUNT, str(grants_dir)) for part in grants["command"]]
    values = {e["name"]: e.get("value") for e in grants["env"]}
    assert values["APP_ROLE"] == "opsapi_app"  # the role init.sql creates (renamed here)
    result = subprocess.run(
        command,
        env={**env, "APP_ROLE": app_role},
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


async def test_the_job_leaves_an_application_role_that_serves_but_cannot_change_history(
    tmp_path: Path, key_file: Path
) -> None:
    if shutil.which("psql") is None:
        unavailable("psql (Debian package postgresql-client)")
    try:
        admin = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as error:
        unavailable(f"PostgreSQL ({error.__class__.__name__})")
        raise
    suffix = uuid.uuid4().hex[:8]
    names = {
        "opsapi_migrator": f"opsapi_mig_{suffix}",
        "opsapi_app": f"opsapi_app_{suffix}",
        "opsapi": f"opsapi_roles_{suffix}",
    }
    configmap = yaml.safe_load((ROOT / "deploy/kubernetes/migrate/grants.yaml").read_text())
    (tmp_path / "grants.sql").write_text(configmap["data"]["grants.sql"])
    migrator_url = dsn(names["opsapi_migrator"], names["opsapi"]).replace(
        "postgresql://", "postgresql+asyncpg://"
    )
    try:
        # given the roles and database the compose stack's PostgreSQL creates
        for statement in statements((ROOT / "deploy/compose/postgres/init.sql").read_text(), names):
            await admin.execute(statement)

        # when the Job runs, twice (every release runs it; the second finds nothing to migrate)
        run_job(migrator_url, names["opsapi_app"], tmp_path)
        run_job(migrator_url, names["opsapi_app"], tmp_path)

        # then the application role may append to the audit log and nothing else there
        app = await asyncpg.connect(dsn(names["opsapi_app"], names["opsapi"]))
        try:
            for statement, refusal in [
                ("UPDATE audit_event SET actor = 'x'", "permission denied"),
                ("DELETE FROM audit_event", "permission denied"),
                ("TRUNCATE audit_event", "permission denied"),
                ("SELECT setval('audit_event_id_seq', 1)", "permission denied"),
                ("DROP TABLE audit_event", "owner"),
                ("CREATE TABLE smuggled (id int)", "permission denied"),
                ("DELETE FROM alembic_version", "permission denied"),
            ]:
                with pytest.raises(asyncpg.PostgresError, match=refusal):
                    await app.execute(statement)
        finally:
            await app.close()

        # and the servers run as it without migrating, answering their probes
        deployment = yaml.safe_load((ROOT / "deploy/kubernetes/deployment.yaml").read_text())
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        app_url = dsn(names["opsapi_app"], names["opsapi"]).replace(
            "postgresql://", "postgresql+asyncpg://"
        )
        async with running_app(app_url, key_file, migrate_on_start=False) as api:
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                answer = await api.client.get(container[probe]["httpGet"]["path"])
                assert answer.status_code == 200, (probe, answer.text)
            started = await api.post("/canary/promote", {"service": "checkout", "version": "v2"})
            assert started.status_code == 200, started.text
            assert (await api.client.get("/metrics")).status_code == 200
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{names["opsapi"]}" WITH (FORCE)')
        for role in ("opsapi_app", "opsapi_migrator"):
            await admin.execute(f'DROP ROLE IF EXISTS "{names[role]}"')
        await admin.close()
