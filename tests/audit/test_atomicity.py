"""A state change and its audit event commit together or not at all."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from tests.support.app import Harness, running_app

# The fault is injected by the database itself: a trigger that aborts the transaction when the
# successful audit event is inserted, i.e. after the rollout row was changed and before commit.
FAULTS = {
    "postgresql": [
        """CREATE FUNCTION inject_fault() RETURNS trigger AS $$
           BEGIN RAISE EXCEPTION 'injected fault'; END $$ LANGUAGE plpgsql""",
        """CREATE TRIGGER inject_fault BEFORE INSERT ON audit_event FOR EACH ROW
           WHEN (NEW.action = 'canary.rollback' AND NEW.outcome = 'success')
           EXECUTE FUNCTION inject_fault()""",
    ],
    "sqlite": [
        """CREATE TRIGGER inject_fault BEFORE INSERT ON audit_event
           WHEN NEW.action = 'canary.rollback' AND NEW.outcome = 'success'
           BEGIN SELECT RAISE(ABORT, 'injected fault'); END""",
    ],
}
CLEANUP = {
    "postgresql": [
        "DROP TRIGGER IF EXISTS inject_fault ON audit_event",
        "DROP FUNCTION IF EXISTS inject_fault()",
    ],
    "sqlite": ["DROP TRIGGER IF EXISTS inject_fault"],
}


async def _execute(api: Harness, statements: list[str]) -> None:
    async with api.runtime.engine.begin() as connection:
        for statement in statements:
            await connection.execute(sa.text(statement))


async def test_failure_before_commit_leaves_neither_change_nor_audit(
    db_url: str, key_file: Path
) -> None:
    async with running_app(db_url, key_file) as api:
        dialect = api.runtime.engine.dialect.name
        # given an open rollout at 10 %, and a fault armed between the change and the commit
        await api.post("/canary/promote", {"service": "checkout", "version": "v2"})
        await _execute(api, FAULTS[dialect])
        try:
            # when an operator rolls back
            response = await api.post("/canary/rollback", {"service": "checkout", "reason": "x"})
        finally:
            await _execute(api, CLEANUP[dialect])

        # then the request failed cleanly, the rollout did not change and no success was logged
        assert response.status_code == 500
        assert response.headers["content-type"] == "application/problem+json"
        assert "injected" not in response.text
        assert "Traceback" not in response.text
        rollout = (await api.get("/canary/checkout")).json()
        assert rollout["state"] == "progressing"
        assert rollout["desired_weight"] == 10
        events = await api.audit_events(action="canary.rollback")
        assert [e.outcome for e in events] == ["error"]
        assert "injected" not in str(events[0].details)

        # and once the fault is gone the same rollback works
        retry = await api.post("/canary/rollback", {"service": "checkout", "reason": "x"})
        assert retry.status_code == 200
        assert retry.json()["desired_weight"] == 0
