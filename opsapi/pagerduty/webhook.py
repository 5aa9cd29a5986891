"""`POST /internal/ops/webhooks/pagerduty`: PagerDuty webhooks v3 → rollback.

Authenticated by the `X-PagerDuty-Signature` header (HMAC-SHA256 of the raw body with one of
the configured secrets), never by a JWT. The order is fixed: read the body (size-limited),
verify the signature, only then parse. An acting event (`incident.triggered`, and
`incident.reopened` / `incident.priority_updated` when the incident now qualifies) on a
PagerDuty service mapped in some opsapi service's policy rolls that service's open rollout back:
the rollback, its audit event and the event id (replays act once) commit in one transaction;
the weight is then applied through the router within a short budget, so PagerDuty gets its 2xx
well within its 5 s. Everything else answers 2xx and is audited `ignored` with the reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from opsapi.audit import service as audit
from opsapi.audit.models import Outcome, Source
from opsapi.canary import machine
from opsapi.canary import service as canary
from opsapi.canary.machine import Actor, Trigger
from opsapi.canary.models import RolloutRecord, ServiceRecord
from opsapi.canary.policy import PagerDutyPolicy
from opsapi.errors import BadRequest, Problem, Unauthorized
from opsapi.http.endpoint import problem_response, read_limited
from opsapi.http.runtime import Runtime
from opsapi.pagerduty.models import PagerDutyEvent
from opsapi.pagerduty.outbox import mapped_services

log = logging.getLogger("opsapi.pagerduty")

ACTOR = "pagerduty"
ACTION = "pagerduty.webhook"
PATH = "/webhooks/pagerduty"
SIGNATURE_HEADER = "x-pagerduty-signature"
ACTING_EVENTS = frozenset({"incident.triggered", "incident.reopened", "incident.priority_updated"})
# How long the answer may wait for the router to apply the rollback's 0 % (the rest goes on in
# the background; the reconcile pass re-applies if it fails).
APPLY_BUDGET_SECONDS = 2.0
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_OWN_ALERT = re.compile(r"^opsapi-rollout-\d+$")
_AS_ROLLBACK = Actor(Trigger.PAGERDUTY, ACTOR)
_background: set[asyncio.Task[Any]] = set()


def signature_matches(body: bytes, header: str | None, secrets: Sequence[str]) -> str | None:
    """None when some `v1=` signature in `header` is the HMAC of `body` with some secret;
    otherwise why not (for the audit log; never the values themselves)."""
    if not secrets:
        return "no webhook secret is configured"
    if not header:
        return "missing signature"
    offered = [
        part.strip()[3:].strip().lower().encode()
        for part in header.split(",")
        if part.strip().startswith("v1=")
    ]
    if not offered:
        return "no v1 signature"
    expected = [hmac.new(s.encode(), body, hashlib.sha256).hexdigest().encode() for s in secrets]
    matched = False
    for candidate in offered:
        for digest in expected:
            # Every pair is compared (no early exit): the time taken says nothing useful.
            matched |= hmac.compare_digest(candidate, digest)
    return None if matched else "signature mismatch"


@dataclass(frozen=True)
class Incident:
    """The parts of a webhook's incident that decide and explain a rollback."""

    id: str | None
    number: int | None
    title: str
    html_url: str | None
    urgency: str | None
    priority: str | None
    service_id: str | None
    incident_key: str | None

    @classmethod
    def of(cls, data: Any) -> Incident:
        data = data if isinstance(data, dict) else {}
        priority = data.get("priority")
        service = data.get("service")
        number = data.get("number")
        return cls(
            id=_text(data.get("id")),
            number=number if isinstance(number, int) else None,
            title=_text(data.get("title")) or "",
            html_url=_text(data.get("html_url")),
            urgency=_text(data.get("urgency")),
            priority=_text(priority.get("summary")) if isinstance(priority, dict) else None,
            service_id=_text(service.get("id")) if isinstance(service, dict) else None,
            incident_key=_text(data.get("incident_key")),
        )

    def details(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "number": self.number,
            "title": self.title[:500],
            "html_url": self.html_url,
            "urgency": self.urgency,
            "priority": self.priority,
            "service_id": self.service_id,
        }

    def rollback_reason(self) -> str:
        what = (
            f"PagerDuty incident #{self.number}"
            if self.number is not None
            else "PagerDuty incident"
        )
        qualifiers = ", ".join(
            part
            for part in (
                f"priority {self.priority}" if self.priority else "",
                f"urgency {self.urgency}" if self.urgency else "",
            )
            if part
        )
        reason = f'{what} "{self.title[:500]}"'
        if qualifiers:
            reason += f" ({qualifiers})"
        if self.html_url:
            reason += f": {self.html_url[:500]}"
        return reason[:2000]


def _text(value: Any) -> str | None:
    return value[:1000] if isinstance(value, str) and value else None


def qualifies(event_type: str, incident: Incident, policy: PagerDutyPolicy) -> bool:
    """Whether the incident asks for a rollback under the service's policy.

    A new or reopened incident qualifies by priority or urgency; a priority change only by the
    new priority (its urgency was already there, and judged, when it triggered).
    """
    by_priority = incident.priority is not None and incident.priority in policy.priorities
    if event_type == "incident.priority_updated":
        return by_priority
    by_urgency = incident.urgency is not None and incident.urgency in policy.urgencies
    return by_priority or by_urgency


@dataclass
class _Outcome:
    """What one delivery did, per opsapi service, for the audit log and the answer."""

    audits: list[dict[str, Any]] = field(default_factory=list)
    rolled_back: list[RolloutRecord] = field(default_factory=list)
    answer: list[dict[str, Any]] = field(default_factory=list)


async def pagerduty_webhook(request: Request) -> Response:
    """Receive one PagerDuty v3 webhook event."""
    runtime: Runtime = request.app.state.runtime
    started = time.perf_counter()
    hook = _Webhook(runtime, request)
    response = await hook.serve()
    response.headers["X-Request-Id"] = hook.request_id
    runtime.metrics.requests.labels(ACTION, "POST", response.status_code).inc()
    runtime.metrics.request_seconds.labels(ACTION, "POST").observe(time.perf_counter() - started)
    return response


class _Webhook:
    def __init__(self, runtime: Runtime, request: Request) -> None:
        self.runtime = runtime
        self.request = request
        supplied = request.headers.get("x-request-id", "")
        self.request_id = supplied if _REQUEST_ID.fullmatch(supplied) else uuid.uuid4().hex
        self.client_address = request.client.host if request.client else None

    async def serve(self) -> Response:
        now = self.runtime.clock()
        try:
            raw = await read_limited(self.request, self.runtime.settings.max_body_bytes)
            refused = signature_matches(
                raw,
                self.request.headers.get(SIGNATURE_HEADER),
                self.runtime.settings.webhook_secrets,
            )
            if refused is not None:
                raise Unauthorized("a valid X-PagerDuty-Signature is required", reason=refused)
            event_id, event_type, data = _parse(raw)
        except Problem as problem:
            return await self._refuse(problem, now)
        try:
            return await self._handle(event_id, event_type, Incident.of(data), now)
        except Exception:
            log.exception("PagerDuty webhook %s failed", event_id)
            return await self._refuse(
                Problem("an internal error occurred; nothing was changed"),
                now,
                {"event_id": event_id, "event_type": event_type},
            )

    async def _handle(
        self, event_id: str, event_type: str, incident: Incident, now: datetime
    ) -> Response:
        base = {"event_id": event_id, "event_type": event_type}
        # The session is closed before auditing: on SQLite it holds the database lock.
        async with self.runtime.sessions() as session:
            seen = await session.get(PagerDutyEvent, event_id) is not None
        if seen:
            return await self._duplicate(base, now)
        outcome = _Outcome()
        try:
            async with self.runtime.sessions() as session, session.begin():
                session.add(
                    PagerDutyEvent(id=event_id, event_type=event_type, received_at=now,
                                   outcome="pending")
                )  # fmt: skip
                # A concurrent delivery of the same event waits here for ours, then conflicts.
                await session.flush()
                await self._decide(session, event_type, incident, now, base, outcome)
                record = await session.get(PagerDutyEvent, event_id)
                assert record is not None
                record.outcome = (Outcome.SUCCESS if outcome.rolled_back else Outcome.IGNORED).value
                session.add(record)
                for row in outcome.audits:
                    await audit.record(session=session, **row)
        except IntegrityError:
            async with self.runtime.sessions() as session:
                if await session.get(PagerDutyEvent, event_id) is None:
                    raise
            return await self._duplicate(base, now)
        if outcome.rolled_back:
            self.runtime.metrics.transitions.labels(
                "rollout.rolled_back", Trigger.PAGERDUTY.value
            ).inc(len(outcome.rolled_back))
        applied = await self._apply(outcome.rolled_back)
        for item in outcome.answer:
            if item["rollout_id"] in applied:
                item["traffic_at_zero"] = applied[item["rollout_id"]]
        status = "rolled_back" if outcome.rolled_back else "ignored"
        body = {**base, "outcome": status, "services": outcome.answer}
        if not outcome.rolled_back:
            body["reason"] = outcome.audits[0]["details"]["reason"]
        return JSONResponse(body)

    async def _decide(
        self,
        session: AsyncSession,
        event_type: str,
        incident: Incident,
        now: datetime,
        base: dict[str, Any],
        outcome: _Outcome,
    ) -> None:
        """Roll back what the event asks for; note an audit event per service (or one)."""

        def ignore(reason: str, service: str | None = None, rollout_id: int | None = None) -> None:
            outcome.audits.append(self._row(now, ACTION, Outcome.IGNORED, service, rollout_id,
                                            {**base, "reason": reason}))  # fmt: skip
            if service is not None:
                outcome.answer.append({"service": service, "rollout_id": rollout_id,
                                       "outcome": "ignored", "reason": reason})  # fmt: skip

        if event_type not in ACTING_EVENTS:
            return ignore(f"event type {event_type} does not act")
        base["incident"] = incident.details()
        if incident.incident_key and _OWN_ALERT.fullmatch(incident.incident_key):
            return ignore(f"the incident is opsapi's own alert {incident.incident_key}")
        if incident.service_id is None:
            return ignore("the event names no PagerDuty service")
        records = (await session.exec(select(ServiceRecord))).all()
        mapped = mapped_services(records, incident.service_id)
        if not mapped:
            return ignore(f"PagerDuty service {incident.service_id} is not mapped to any service")
        for name, policy in mapped:
            if not qualifies(event_type, incident, policy):
                ignore(
                    f"priority {incident.priority} / urgency {incident.urgency} does not qualify "
                    f"(policy: priorities {policy.priorities}, urgencies {policy.urgencies}"
                    + (", priority changes act by priority only)"
                       if event_type == "incident.priority_updated" else ")"),
                    name,
                )  # fmt: skip
                continue
            record = await canary.open_rollout(name, session=session, lock=True)
            if record is None:
                ignore("no open rollout", name)
                continue
            reason = incident.rollback_reason()
            event = machine.Rollback(reason=reason, actor=_AS_ROLLBACK)
            applied = await canary.apply_event(record, event, now=now, session=session)
            outcome.rolled_back.append(applied.record)
            outcome.audits.append(
                self._row(now, "rollout.rolled_back", Outcome.SUCCESS, name, record.id,
                          {**base, **applied.audit_details, "triggered_by": record.triggered_by})
            )  # fmt: skip
            outcome.answer.append({"service": name, "rollout_id": record.id,
                                   "outcome": "rolled_back", "reason": reason,
                                   "traffic_at_zero": record.applied_weight == 0})  # fmt: skip
        return None

    async def _apply(self, records: list[RolloutRecord]) -> dict[int, bool]:
        """Apply the rollbacks' 0 % now, waiting at most the budget; the rest goes on alone."""
        tasks: dict[int, asyncio.Task[Any]] = {}
        for record in records:
            if record.id is None or record.applied_weight == record.desired_weight:
                continue
            task = asyncio.create_task(
                self.runtime.traffic.apply(record.id, record.service, reason="rollout.rolled_back")
            )
            _background.add(task)
            task.add_done_callback(_finished)
            tasks[record.id] = task
        if not tasks:
            return {}
        done, _ = await asyncio.wait(tasks.values(), timeout=APPLY_BUDGET_SECONDS)
        at_zero = {}
        for rollout_id, task in tasks.items():
            outcome = task.result() if task in done and not task.exception() else None
            at_zero[rollout_id] = outcome is not None and outcome.applied_weight == 0
        return at_zero

    async def _duplicate(self, base: dict[str, Any], now: datetime) -> Response:
        row = self._row(now, ACTION, Outcome.IGNORED, None, None,
                        {**base, "reason": "duplicate event"})  # fmt: skip
        try:
            await self.runtime.audit_writer.write(audit.event_row(**row))
        except Exception:
            return _audit_unavailable()
        return JSONResponse({**base, "outcome": "ignored", "reason": "duplicate event"})

    async def _refuse(
        self, problem: Problem, now: datetime, details: dict[str, Any] | None = None
    ) -> Response:
        """Answer `problem`; its audit event is committed first."""
        headers = (
            {"WWW-Authenticate": 'PagerDuty-Signature realm="opsapi"'}
            if problem.status == 401
            else None
        )
        outcome = Outcome.DENIED if problem.status == 401 else Outcome.ERROR
        row = self._row(now, ACTION, outcome, None, None,
                        {**(details or {}), "status": problem.status, "detail": problem.detail,
                         **problem.extra})  # fmt: skip
        try:
            await self.runtime.audit_writer.write(audit.event_row(**row))
        except Exception:
            log.exception("could not write the audit event of a refused PagerDuty webhook")
            return _audit_unavailable()
        return problem_response(problem, headers)

    def _row(
        self,
        now: datetime,
        action: str,
        outcome: Outcome,
        service: str | None,
        rollout_id: int | None,
        details: dict[str, Any],
    ) -> dict[str, Any]:
        return {
            "at": now,
            "actor": ACTOR,
            "source": Source.PAGERDUTY,
            "action": action,
            "outcome": outcome,
            "service": service,
            "rollout_id": rollout_id,
            "request_id": self.request_id,
            "client_address": self.client_address,
            "details": details,
        }


def _parse(raw: bytes) -> tuple[str, str, Any]:
    """(event id, event type, data) of a v3 webhook body; BadRequest if it is not one."""
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the request body is not valid JSON") from None
    event = document.get("event") if isinstance(document, dict) else None
    if not isinstance(event, dict):
        raise BadRequest("not a PagerDuty webhook v3 event (no event object)")
    event_id, event_type = event.get("id"), event.get("event_type")
    if not (isinstance(event_id, str) and 0 < len(event_id) <= 128):
        raise BadRequest("not a PagerDuty webhook v3 event (no event id)")
    if not (isinstance(event_type, str) and 0 < len(event_type) <= 64):
        raise BadRequest("not a PagerDuty webhook v3 event (no event type)")
    return event_id, event_type, event.get("data")


def _finished(task: asyncio.Task[Any]) -> None:
    _background.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("applying a PagerDuty rollback failed: %r", task.exception())


async def drain(seconds: float = 10.0) -> None:
    """Let router applies still running after their answer finish (at shutdown)."""
    if _background:
        await asyncio.wait(set(_background), timeout=seconds)


class _Unavailable(Problem):
    status = 503
    title = "Service Unavailable"


def _audit_unavailable() -> Response:
    return problem_response(_Unavailable("the audit log could not be written; nothing was done"))
