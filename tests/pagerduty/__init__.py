"""Helpers shared by the PagerDuty tests: documented payloads, real signatures, an app whose
gate values the test sets, and cleaning the PagerDuty tables (the shared `pg_url` fixture does
not know them)."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from asgi_lifespan import LifespanManager
from sqlmodel import col, select

from opsapi.auth.tokens import LocalSigner
from opsapi.gates.provider import Measurement
from opsapi.http.app import create_app
from opsapi.pagerduty.models import OutboxMessage
from tests.support.app import API, Harness, settings_for
from tests.support.clock import ManualClock

FIXTURES = Path(__file__).parent / "fixtures"
WEBHOOK = API + "/webhooks/pagerduty"
SECRET = "whsec-current-6f1c0d2b9a8e4f7d"
ROUTING_KEY = "R0UT1NGKEYcafe0123456789abcdef42"


def fixture(name: str) -> dict[str, Any]:
    """A webhook payload shaped exactly like PagerDuty's documented v3 examples."""
    return json.loads((FIXTURES / f"{name}.json").read_text())  # type: ignore[no-any-return]


def incident_event(
    name: str = "incident_triggered",
    *,
    event_id: str | None = None,
    service_id: str | None = None,
    priority: str | None = "keep",
    urgency: str | None = None,
    incident_key: str | None = None,
) -> dict[str, Any]:
    """A documented incident payload with some fields changed."""
    document = copy.deepcopy(fixture(name))
    event = document["event"]
    data = event["data"]
    if event_id is not None:
        event["id"] = event_id
    if service_id is not None:
        data["service"]["id"] = service_id
    if priority != "keep":
        data["priority"] = None if priority is None else {**data["priority"], "summary": priority}
    if urgency is not None:
        data["urgency"] = urgency
    if incident_key is not None:
        data["incident_key"] = incident_key
    return document


def body_of(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode()


def signature(body: bytes, *secrets: str) -> str:
    """`X-PagerDuty-Signature` as PagerDuty sends it: one `v1=` entry per secret."""
    return ",".join(
        "v1=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest() for secret in secrets
    )


async def deliver(
    api: Harness,
    document: dict[str, Any] | bytes,
    *secrets: str,
    header: str | None = None,
) -> httpx.Response:
    """POST a webhook the way PagerDuty does: raw JSON bytes, signed with `secrets`."""
    body = document if isinstance(document, bytes) else body_of(document)
    headers = {"Content-Type": "application/json"}
    value = header if header is not None else signature(body, *(secrets or (SECRET,)))
    if value:
        headers["X-PagerDuty-Signature"] = value
    return await api.client.post(WEBHOOK, content=body, headers=headers)


async def truncate_pagerduty_tables(database_url: str) -> None:
    dsn = database_url.replace("postgresql+asyncpg://", "postgresql://")
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute("TRUNCATE outbox, pagerduty_event RESTART IDENTITY")
    finally:
        await connection.close()


class FixedProvider:
    """A gate provider whose every query measures `value` (None: no data)."""

    def __init__(self, value: float | None = 0.0) -> None:
        self.value = value

    async def measure(self, query: str) -> Measurement:
        if self.value is None:
            return Measurement(None, "no data")
        return Measurement(self.value)


@contextlib.asynccontextmanager
async def pagerduty_app(
    database_url: str,
    key_file: Path,
    *,
    clock: ManualClock | None = None,
    provider: FixedProvider | None = None,
    **overrides: Any,
) -> AsyncIterator[Harness]:
    """The app on a manual clock (controller driven by `tick()`), gates measured by `provider`."""
    clock = clock or ManualClock()
    settings = settings_for(database_url, key_file, **overrides)
    app = create_app(settings, clock=clock, gate_provider=provider or FixedProvider())
    # Startup migrates a fresh database: a busy machine (two test workers) can take longer
    # than the library's default 5 s; a real hang still fails.
    async with LifespanManager(app, startup_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app, client=("198.51.100.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://opsapi") as client:
            yield Harness(app, client, clock, LocalSigner.load_or_create(key_file))


async def outbox_rows(api: Harness) -> list[OutboxMessage]:
    async with api.runtime.sessions() as session:
        query = select(OutboxMessage).order_by(col(OutboxMessage.id))
        return list((await session.exec(query)).all())


async def audit_text(api: Harness) -> str:
    """Every audit event, every column, as one string."""
    return json.dumps([event.model_dump(mode="json") for event in await api.audit_events()])


def policy(
    *,
    service_ids: list[str] | None = None,
    priorities: list[str] | None = None,
    urgencies: list[str] | None = None,
    routing_key: str | None = ROUTING_KEY,
    **extra: Any,
) -> dict[str, Any]:
    """A service policy with a PagerDuty section (1 h steps unless `extra` says otherwise)."""
    pagerduty: dict[str, Any] = {"service_ids": service_ids or []}
    if priorities is not None:
        pagerduty["priorities"] = priorities
    if urgencies is not None:
        pagerduty["urgencies"] = urgencies
    if routing_key is not None:
        pagerduty["routing_key"] = routing_key
    steps = [{"weight": 10, "wait": "1h"}, {"weight": 100, "wait": "1h"}]
    return {"steps": steps, "pagerduty": pagerduty, **extra}
