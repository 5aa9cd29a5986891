"""Notifications through the one outbox and its worker, on real PostgreSQL, to a local receiver
standing in for the channels: an apprise `json://` channel, a signed webhook channel and a Teams
Workflows channel (apprise's plugin, pointed at an HTTPS loopback receiver).

The worker is driven by `run_once()` on a manual clock (or runs in the background where a test
shows what a running process does).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from sqlmodel import col, select

from opsapi.audit.models import AuditEvent
from opsapi.config import Settings
from opsapi.metrics import Metrics
from opsapi.notifications import outbox
from opsapi.notifications.messages import Message
from opsapi.notifications.rules import NotifyRule
from opsapi.pagerduty.models import OutboxMessage
from opsapi.pagerduty.worker import DeliveryWorker
from opsapi.storage.db import SessionFactory, create_engine, session_factory
from tests.support.clock import ManualClock
from tests.support.notify_receiver import NotifyReceiver, SmtpReceiver, closed_port

PUBLIC_URL = "https://ops.example.com"
HOOK_SECRET = "hook-secret-0123456789abcdef"
DOWN_TOKEN = "D0WNt0ken-b7c9e1f2a3"
DOWN_PASSWORD = "pa55-d0wn-9f8e7d"
TEAMS_SIG = "TeamsSig0123456789abcdef"

MESSAGE = Message(
    event="rolled_back",
    service="checkout",
    rollout_id=42,
    state="rolled_back",
    canary_version="v2",
    stable_version="v1",
    canary_slot="green",
    stable_slot="blue",
    weight=0,
    triggered_by="user",
    actor="alice",
    reason="error budget burning in eu-west",
)


@pytest.fixture(scope="module")
def receiver() -> Iterator[NotifyReceiver]:
    with NotifyReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def tls_receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NotifyReceiver]:
    with NotifyReceiver(tls_dir=tmp_path_factory.mktemp("teams")) as running:
        yield running


@pytest.fixture(scope="module")
def smtp() -> Iterator[SmtpReceiver]:
    with SmtpReceiver() as running:
        yield running


@dataclass
class Outbox:
    """The database, the channels file and what builds workers on them."""

    url: str
    sessions: SessionFactory
    clock: ManualClock
    metrics: Metrics
    channels_file: Path

    def worker(self, sessions: SessionFactory | None = None, **overrides: Any) -> DeliveryWorker:
        fields: dict[str, Any] = {
            "notifications_file": self.channels_file,
            "public_url": PUBLIC_URL,
            "pagerduty_max_attempts": 4,
            "pagerduty_timeout_seconds": 0.5,
            **overrides,
        }
        settings = Settings(database_url=self.url, env="test", **fields)
        return DeliveryWorker.from_settings(
            settings, sessions or self.sessions, self.clock, self.metrics
        )

    async def enqueue(
        self, rules: list[NotifyRule], message: Message = MESSAGE, cause: str = "rollout:42:1"
    ) -> list[str]:
        async with self.sessions() as session, session.begin():
            return await outbox.enqueue(
                session, rules=rules, message=message, cause=cause, now=self.clock()
            )

    async def rows(self) -> list[OutboxMessage]:
        async with self.sessions() as session:
            query = select(OutboxMessage).order_by(col(OutboxMessage.id))
            return list((await session.exec(query)).all())

    async def deliveries(self, rollout_id: int = 42) -> list[dict[str, Any]]:
        async with self.sessions() as session:
            return await outbox.deliveries_for(session, rollout_id)

    async def audit(self, action: str) -> list[AuditEvent]:
        async with self.sessions() as session:
            query = select(AuditEvent).where(AuditEvent.action == action)
            return list((await session.exec(query.order_by(col(AuditEvent.id)))).all())

    def metric(self, channel: str, outcome: str) -> float:
        prefix = f'opsapi_notifications_total{{channel="{channel}",outcome="{outcome}"}} '
        for line in generate_latest(self.metrics.registry).decode().splitlines():
            if line.startswith(prefix):
                return float(line.split()[-1])
        return 0.0


def channels(
    receiver: NotifyReceiver, tls_receiver: NotifyReceiver, smtp: SmtpReceiver
) -> dict[str, Any]:
    down = closed_port()
    return {
        "mail": {"type": "email", "url": f"mailto://127.0.0.1:{smtp.port}"
                 "?from=opsapi@example.com&to=release@example.com"},
        "chat": {"type": "apprise", "url": f"json://127.0.0.1:{receiver.port}/chat"},
        "hook": {"type": "webhook", "url": f"{receiver.url}/hook?team=ops",
                 "secret": HOOK_SECRET},
        "teams": {"type": "teams",
                  "url": f"workflows://127.0.0.1:{tls_receiver.port}/wf1/{TEAMS_SIG}"},
        "chat-down": {"type": "apprise",
                      "url": f"json://ops:{DOWN_PASSWORD}@127.0.0.1:{down}/{DOWN_TOKEN}"},
        "hook-down": {"type": "webhook", "url": f"http://127.0.0.1:{down}/h?token={DOWN_TOKEN}",
                      "secret": HOOK_SECRET},
        "slow": {"type": "webhook", "url": f"{receiver.url}/slow", "secret": HOOK_SECRET,
                 "timeout": 0.3},
    }  # fmt: skip


@contextlib.asynccontextmanager
async def database(url: str) -> AsyncIterator[SessionFactory]:
    engine = create_engine(url)
    try:
        yield session_factory(engine)
    finally:
        await engine.dispose()


@pytest.fixture
async def box(
    pg_url: str,
    tmp_path: Path,
    receiver: NotifyReceiver,
    tls_receiver: NotifyReceiver,
    smtp: SmtpReceiver,
) -> AsyncIterator[Outbox]:
    receiver.reset()
    tls_receiver.reset()
    channels_file = tmp_path / "channels.json"
    channels_file.write_text(json.dumps(channels(receiver, tls_receiver, smtp)))
    async with database(pg_url) as sessions:
        yield Outbox(pg_url, sessions, ManualClock(), Metrics(), channels_file)


def rule(channel: str, *events: str) -> NotifyRule:
    return NotifyRule.model_validate({"channel": channel, "events": list(events) or None})


# --- delivered, once ----------------------------------------------------------------------------


async def test_a_committed_notification_reaches_each_channel_exactly_once(
    box: Outbox, receiver: NotifyReceiver
) -> None:
    # given a rollback whose policy tells "chat" everything and "hook" only rollbacks
    rules = [rule("chat"), rule("hook", "rolled_back"), rule("teams", "succeeded")]

    # when its notifications are enqueued in the transition's transaction, and the worker runs
    assert await box.enqueue(rules) == ["chat", "hook"]
    worker = box.worker()
    assert await worker.run_once() == 2
    assert await worker.run_once() == 0
    worker.close()

    # then each channel got exactly one request
    by_path = {r.path: r for r in receiver.requests}
    assert sorted(by_path) == ["/chat", "/hook?team=ops"]
    assert len(receiver.requests) == 2

    # the apprise channel: title and body saying what, who, why, with the link
    chat = by_path["/chat"].json
    assert chat["title"] == "checkout: canary v2 rolled back, traffic back to v1"
    assert chat["type"] == "failure"
    for fact in (
        "Service: checkout",
        "Canary: v2 in slot green, at 0% of traffic",
        "Stable: v1 in slot blue",
        "By: alice (user)",
        "Reason: error budget burning in eu-west",
        f"Rollout #42: {PUBLIC_URL}/internal/ops/canary/checkout",
    ):
        assert fact in chat["message"]  # fmt: skip

    # the webhook channel: opsapi's document, signed over timestamp and body
    hook = by_path["/hook?team=ops"]
    timestamp = hook.headers["X-Opsapi-Timestamp"]
    expected = hmac.new(HOOK_SECRET.encode(), timestamp.encode() + b"." + hook.raw, hashlib.sha256)
    assert hook.headers["X-Opsapi-Signature"] == "sha256=" + expected.hexdigest()
    document = hook.json
    assert {key: document[key] for key in (
        "event", "service", "rollout_id", "canary_version", "stable_version", "canary_slot",
        "stable_slot", "weight", "triggered_by", "actor", "reason", "link")} == {
        "event": "rolled_back", "service": "checkout", "rollout_id": 42,
        "canary_version": "v2", "stable_version": "v1", "canary_slot": "green",
        "stable_slot": "blue", "weight": 0, "triggered_by": "user", "actor": "alice",
        "reason": "error budget burning in eu-west",
        "link": f"{PUBLIC_URL}/internal/ops/canary/checkout",
    }  # fmt: skip
    assert hook.headers["X-Opsapi-Delivery"] == str(document["delivery_id"])

    # and the rollout's deliveries, the audit log and the metric say so
    deliveries = await box.deliveries()
    assert [(d["channel"], d["event"], d["state"], d["attempts"], d["last_error"])
            for d in deliveries] == [("chat", "rolled_back", "delivered", 1, None),
                                     ("hook", "rolled_back", "delivered", 1, None)]  # fmt: skip
    assert all(d["delivered_at"] for d in deliveries)
    delivered = await box.audit("notification.delivered")
    assert sorted(e.details["channel"] for e in delivered) == ["chat", "hook"]
    assert {(e.source, e.actor, e.outcome, e.service, e.rollout_id) for e in delivered} == {
        ("system", "outbox", "success", "checkout", 42)
    }
    assert box.metric("chat", "delivered") == box.metric("hook", "delivered") == 1

    # when the same transition is enqueued again (a replay), nothing more is added or sent
    assert await box.enqueue(rules) == []
    assert len(await box.rows()) == 2


async def test_a_rolled_back_transaction_enqueues_nothing(box: Outbox) -> None:
    created: list[str] = []

    async def transition_that_fails() -> None:
        async with box.sessions() as session, session.begin():
            created.extend(
                await outbox.enqueue(
                    session, rules=[rule("chat")], message=MESSAGE, cause="c:1", now=box.clock()
                )
            )
            raise RuntimeError("the transition failed after enqueueing")

    with pytest.raises(RuntimeError):
        await transition_that_fails()

    assert created == ["chat"]

    assert await box.rows() == []
    worker = box.worker()
    assert await worker.run_once() == 0
    worker.close()


async def test_teams_through_apprise_over_https(
    box: Outbox, tls_receiver: NotifyReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # requests (under apprise) trusts the receiver's test CA, as it would a proxy's CA bundle
    assert tls_receiver.ca_file is not None
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls_receiver.ca_file))
    succeeded = replace(MESSAGE, event="succeeded", state="succeeded", weight=100, reason=None)

    assert await box.enqueue([rule("teams", "succeeded")], succeeded) == ["teams"]
    worker = box.worker()
    assert await worker.run_once() == 1
    worker.close()

    [request] = tls_receiver.requests
    assert request.path.startswith("/workflows/wf1/triggers/manual/paths/invoke?")
    text = json.dumps(request.json)
    assert "checkout: canary v2 succeeded and is now stable" in text
    assert "/internal/ops/canary/checkout" in text
    [row] = await box.rows()
    assert (row.state, row.attempts) == ("delivered", 1)
    assert TEAMS_SIG not in json.dumps(await box.deliveries())


async def test_email_through_apprise_to_an_smtp_server(box: Outbox, smtp: SmtpReceiver) -> None:
    paused = replace(MESSAGE, event="paused", state="paused", weight=25, reason="holiday freeze")
    before = len(smtp.messages)

    assert await box.enqueue([rule("mail", "paused")], paused) == ["mail"]
    worker = box.worker()
    assert await worker.run_once() == 1
    worker.close()

    [mail] = smtp.messages[before:]
    text = mail.decode()
    assert "Subject: checkout: canary v2 paused at 25%" in text
    assert "To: release@example.com" in text
    for line in (
        "Canary: v2 in slot green, at 25% of traffic",
        "By: alice (user)",
        "Reason: holiday freeze",
        f"Rollout #42: {PUBLIC_URL}/internal/ops/canary/checkout",
    ):
        assert line in text.splitlines()  # fmt: skip


# --- failures -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channel", "error"),
    [("chat-down", "Connection error"), ("hook-down", "Connection refused")],
)
async def test_a_dead_channel_is_retried_with_backoff_then_failed_visibly(
    box: Outbox, channel: str, error: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    assert await box.enqueue([rule(channel)]) == [channel]
    worker = box.worker()

    # first attempt fails: next try in 1 s, not before
    assert await worker.run_once() == 1
    [row] = await box.rows()
    assert (row.state, row.attempts) == ("pending", 1)
    assert row.next_attempt_at == box.clock() + timedelta(seconds=1)
    box.clock.advance(seconds=0.9)
    assert await worker.run_once() == 0
    # then 1 s, 2 s, 4 s apart (back-off doubling), and failed after the 4th attempt
    for wait, attempts in ((0.1, 2), (2, 3), (4, 4)):
        box.clock.advance(seconds=wait - 0.01)
        assert await worker.run_once() == 0, "sent before its back-off was over"
        box.clock.advance(seconds=0.01)
        assert await worker.run_once() == 1
        [row] = await box.rows()
        assert row.attempts == attempts
    assert row.state == "failed"
    box.clock.advance(seconds=600)
    assert await worker.run_once() == 0
    worker.close()

    # visible: the rollout's deliveries, the metric, the audit log
    [delivery] = await box.deliveries()
    assert (delivery["channel"], delivery["state"], delivery["attempts"]) == (channel, "failed", 4)
    assert error in delivery["last_error"]
    assert box.metric(channel, "retry") == 3
    assert box.metric(channel, "failed") == 1
    [event] = await box.audit("notification.delivery_failed")
    assert (event.outcome, event.source, event.service, event.rollout_id) == (
        "error",
        "system",
        "checkout",
        42,
    )
    assert event.details["channel"] == channel
    assert event.details["event"] == "rolled_back"
    assert event.details["attempts"] == 4
    assert event.details["last_error"] == delivery["last_error"]
    # and no secret of the channel's URL anywhere: row, answer, audit, logs
    shown = json.dumps([delivery, event.details]) + caplog.text
    for secret in (DOWN_TOKEN, DOWN_PASSWORD, HOOK_SECRET):
        assert secret not in shown
    assert f"channel {channel}" in caplog.text


async def test_a_retry_that_succeeds_is_delivered(box: Outbox, receiver: NotifyReceiver) -> None:
    receiver.script(500, 503)
    await box.enqueue([rule("hook")])
    worker = box.worker()

    for _ in range(3):
        await worker.run_once()
        box.clock.advance(seconds=60)
    worker.close()

    [row] = await box.rows()
    assert (row.state, row.attempts, row.last_error) == ("delivered", 3, None)
    assert [r.answer for r in receiver.requests] == [500, 503, 200]
    # the receiver can fold the repeats: the same delivery id every time
    assert len({r.headers["X-Opsapi-Delivery"] for r in receiver.requests}) == 1


async def test_a_channel_no_longer_configured_fails_visibly(box: Outbox) -> None:
    assert await box.enqueue([rule("gone")]) == ["gone"]
    worker = box.worker(pagerduty_max_attempts=1)
    assert await worker.run_once() == 1
    worker.close()
    [delivery] = await box.deliveries()
    assert delivery["state"] == "failed"
    assert delivery["last_error"] == "channel 'gone' is not configured on this server"


async def test_a_hanging_channel_times_out_and_never_blocks_a_transition(
    box: Outbox, receiver: NotifyReceiver
) -> None:
    # given a channel that answers after 3 s (its timeout is 0.3 s) and the worker sending to it
    receiver.script(("hang", 3))
    await box.enqueue([rule("slow")], cause="first")
    worker = box.worker()
    sending = asyncio.create_task(worker.run_once())
    deadline = time.monotonic() + 5
    while not receiver.requests and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert receiver.requests, "the worker did not send"

    # when a transition enqueues another notification meanwhile, it commits at once
    started = time.monotonic()
    assert await box.enqueue([rule("slow")], cause="second") == ["slow"]
    assert time.monotonic() - started < 0.5

    # then the hanging send gives up at the channel's timeout, to be retried later
    assert await sending == 1
    assert await worker.run_once() == 1  # the second, at once; the first waits its back-off
    worker.close()
    first, second = await box.rows()
    assert (first.state, first.attempts) == ("pending", 1)
    assert "timeout" in (first.last_error or "")
    assert second.state == "delivered"


# --- crashes and replicas -----------------------------------------------------------------------


async def test_a_notification_committed_before_a_crash_is_delivered_by_a_fresh_worker(
    box: Outbox, receiver: NotifyReceiver
) -> None:
    # given a transition committed with its notification, and the process gone before delivery
    async with database(box.url) as sessions, sessions() as session, session.begin():
        await outbox.enqueue(
            session, rules=[rule("hook")], message=MESSAGE, cause="c:9", now=box.clock()
        )
    assert receiver.requests == []

    # when a new process starts on the same database, its worker running in the background
    async with database(box.url) as sessions:
        worker = box.worker(sessions, pagerduty_poll_seconds=0.05)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        deadline = time.monotonic() + 10
        while not receiver.accepted() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # a few more passes: nothing is sent twice
        stop.set()
        await running

    # then the notification was delivered, once
    [request] = receiver.requests
    assert request.json["event"] == "rolled_back"
    [row] = await box.rows()
    assert (row.state, row.attempts) == ("delivered", 1)


async def test_two_workers_on_one_database_deliver_each_notification_once(
    box: Outbox, receiver: NotifyReceiver
) -> None:
    # given 30 transitions' notifications
    for number in range(30):
        await box.enqueue([rule("hook")], replace(MESSAGE, rollout_id=number), f"c:{number}")

    # when two workers (two processes' engines) run passes at the same time until none is left
    async with database(box.url) as other:
        async with other() as session:  # both engines connected: the claims really overlap
            await session.exec(select(1))
        first, second = box.worker(), box.worker(other)
        first.batch_size = second.batch_size = 5
        sent = [0, 0]
        for _ in range(10):
            done = await asyncio.gather(first.run_once(), second.run_once())
            sent = [sent[0] + done[0], sent[1] + done[1]]
            if sum(done) == 0:
                break
        first.close()
        second.close()

    # then each was sent exactly once, and both workers took part
    ids = [r.json["delivery_id"] for r in receiver.requests]
    assert len(ids) == 30
    assert len(set(ids)) == 30
    assert sum(sent) == 30
    assert min(sent) > 0, sent
    rows = await box.rows()
    assert {(row.state, row.attempts) for row in rows} == {("delivered", 1)}
    assert box.metric("hook", "delivered") == 30


async def test_on_sqlite_too(sqlite_url: str, tmp_path: Path, receiver: NotifyReceiver) -> None:
    from opsapi.storage.migrate import upgrade

    receiver.reset()
    channels_file = tmp_path / "channels.json"
    channels_file.write_text(json.dumps({"hook": {"type": "webhook", "url": f"{receiver.url}/h",
                                                  "secret": HOOK_SECRET}}))  # fmt: skip
    engine = create_engine(sqlite_url)
    await upgrade(engine)
    try:
        box = Outbox(sqlite_url, session_factory(engine), ManualClock(), Metrics(), channels_file)
        assert await box.enqueue([rule("hook")]) == ["hook"]
        assert await box.enqueue([rule("hook")]) == []
        worker = box.worker()
        assert await worker.run_once() == 1
        worker.close()
        [delivery] = await box.deliveries()
        assert delivery["state"] == "delivered"
        assert len(receiver.requests) == 1
    finally:
        await engine.dispose()
