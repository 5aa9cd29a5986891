"""What the one effect interpreter guarantees callers: transitions are counted once committed,
and audit events carry the true before and after of every step a transition took."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.support.app import Harness, running_app
from tests.support.statements import logged_statements

SERVICE = "checkout"


async def transitions_counted(api: Harness, action: str) -> float:
    text = (await api.client.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        if family.name == "opsapi_rollout_transitions":
            samples = [s for s in family.samples if s.name.endswith("_total")]
            return sum(s.value for s in samples if s.labels["transition"] == action)
    return 0.0


async def test_only_committed_transitions_are_counted(api: Harness) -> None:
    # given a ready step
    await api.post("/canary/promote", {"service": SERVICE, "version": "v2"})
    api.clock.advance(minutes=30)

    # when 30 operators promote at once (one wins; 29 are refused, nothing of theirs commits)
    answers = await asyncio.gather(
        *(api.post("/canary/promote", {"service": SERVICE}, subject=f"op-{i}") for i in range(30))
    )

    # then the metric counts the one promotion, as the audit log does
    assert sorted(a.status_code for a in answers) == [200] + [409] * 29
    assert await transitions_counted(api, "rollout.promoted") == 1
    assert await transitions_counted(api, "rollout.started") == 1
    promoted = [e for e in await api.audit_events(action="canary.promote", outcome="success")
                if e.details.get("transition") == "rollout.promoted"]  # fmt: skip
    assert len(promoted) == 1


async def test_a_resume_that_lands_ready_is_audited_with_its_true_before_and_after(
    api: Harness,
) -> None:
    # given a rollout paused once its step was ready
    await api.post("/canary/promote", {"service": SERVICE, "version": "v2"})
    api.clock.advance(minutes=30)
    await api.tick()
    assert (await api.post("/canary/pause", {"service": SERVICE})).json()["state"] == "paused"

    # when it is resumed
    resumed = await api.post("/canary/resume", {"service": SERVICE})

    # then it is awaiting promotion, and the one audit event says paused -> awaiting_promotion,
    # listing both steps the transition took
    assert resumed.json()["state"] == "awaiting_promotion"
    [event] = await api.audit_events(action="canary.resume")
    assert (event.details["from_state"], event.details["to_state"]) == (
        "paused", "awaiting_promotion",
    )  # fmt: skip
    assert [step["action"] for step in event.details["transitions"]] == [
        "rollout.resumed", "rollout.ready",
    ]  # fmt: skip
    assert [(s["from_state"], s["to_state"]) for s in event.details["transitions"]] == [
        ("paused", "progressing"), ("progressing", "awaiting_promotion"),
    ]  # fmt: skip


async def test_a_start_writes_its_rollout_in_the_statement_of_its_audit_event(
    api: Harness,
) -> None:
    """The lock draws the started rollout's id, so the rollout's INSERT travels with the
    audit append (one round trip fewer per start), and the event names the rollout stored;
    the caller's Idempotency-Key record travels with them, and all with the COMMIT."""
    # given a service whose first rollout was rolled back
    await api.post("/canary/promote", {"service": SERVICE, "version": "v2"})
    await api.post("/canary/rollback", {"service": SERVICE, "reason": "bad"})
    body = {"service": SERVICE, "version": "v3"}
    # when a second rollout is started by a call with an Idempotency-Key
    async with logged_statements(api) as statements:
        started = await api.post("/canary/promote", body, **{"Idempotency-Key": "start-v3"})

    # then its row and the key's record were inserted by the statement that appended its
    # audit event
    assert started.status_code == 200
    inserts = [sql for sql in statements if "INSERT INTO rollout " in sql]
    assert len(inserts) == 1
    assert "audit_append" in inserts[0]
    assert "INSERT INTO idempotency_key " in inserts[0]
    # and that statement went with the COMMIT, in one message (`rows.execute_last`)
    assert inserts[0].endswith(";\nCOMMIT")
    assert "COMMIT;" not in statements
    assert [sql for sql in statements if "INSERT INTO idempotency_key " in sql] == inserts
    # and the event names the rollout as stored, whose id the lock drew after the first's
    first, second = await api.rollouts(SERVICE)
    assert started.json()["id"] == second.id > first.id
    events = await api.audit_events(action="canary.promote", rollout_id=second.id)
    [start] = [e for e in events if e.details.get("transition") == "rollout.started"]
    assert start.details["version"] == "v3"
    # and a retry with the key answers exactly what the first call answered
    again = await api.post("/canary/promote", body, **{"Idempotency-Key": "start-v3"})
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == started.json()


async def test_a_transitions_notifications_are_written_with_its_audit_event_and_answered(
    db_url: str, key_file: Path, tmp_path: Path
) -> None:
    """A transition's notification rows travel with its audit append (no round trip of their
    own, on PostgreSQL), and its answer shows them as the status read right after it does."""
    channels = tmp_path / "channels.json"
    hook = {"type": "webhook", "url": "http://127.0.0.1:9/hook", "secret": "n" * 32}
    channels.write_text(json.dumps({"ops": hook, "release-room": hook}))
    async with running_app(
        db_url, key_file, notifications_file=channels, pagerduty_worker_enabled=False
    ) as api:
        await _notified_life(api, postgresql=db_url.startswith("postgresql"))


async def _notified_life(api: Harness, *, postgresql: bool) -> None:
    # given a service whose policy notifies two channels of every transition
    policy = {"steps": [{"weight": w, "wait": "1m"} for w in (10, 50, 100)],
              "notify": [{"channel": "ops"}, {"channel": "release-room"}]}  # fmt: skip
    assert (await api.put(f"/services/{SERVICE}", policy)).status_code == 200
    calls = [("/canary/promote", {"service": SERVICE, "version": "v2"}),
             ("/canary/promote", {"service": SERVICE}),
             ("/canary/rollback", {"service": SERVICE, "reason": "bad"}),
             ("/canary/promote", {"service": SERVICE, "version": "v3"})]  # fmt: skip
    for path, body in calls:
        api.clock.advance(minutes=2)
        await api.tick()  # the step ready to promote: also a notified transition
        # when a write transitions the rollout
        if postgresql:
            async with logged_statements(api) as statements:
                answer = await api.post(path, body)
            # then its notification rows were inserted by the statement of its audit event only
            inserts = [sql for sql in statements if "INSERT INTO outbox " in sql]
            assert len(inserts) == 1
            assert "audit_append" in inserts[0]
        else:
            answer = await api.post(path, body)
        assert answer.status_code == 200, answer.text
        # and its answer shows every notification of the rollout as a status read does
        status = (await api.get(f"/canary/{SERVICE}")).json()
        assert answer.json()["notifications"] == status["notifications"]
        assert status["notifications"][-2:] == [
            {**status["notifications"][-2], "channel": channel, "state": "pending"}
            for channel in ("ops", "release-room")
        ]
    # and every transition's audit event names the channels notified, once each
    transitions = [
        e for e in await api.audit_events(outcome="success") if "transition" in e.details
    ]
    assert len(transitions) >= len(calls)
    assert [e.details.get("notified") for e in transitions] == [["ops", "release-room"]] * len(
        transitions
    )
