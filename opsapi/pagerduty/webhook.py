"""`POST /internal/ops/webhooks/pagerduty`: PagerDuty webhooks v3 → rollback.

Authenticated by the `X-PagerDuty-Signature` header (HMAC-SHA256 of the raw body with one of
the configured secrets), never by a JWT. The order is fixed: read the body (size-limited),
verify the signature, only then parse. An acting event (`incident.triggered`, and
`incident.reopened` / `incident.priority_updated` when the incident now qualifies) on a
PagerDuty service mapped in some opsapi service's policy rolls that service's open rollout back:
the rollback, its audit event and the event id (replays act once) commit in one transaction;
the weight is then applied through the router within a short budget, so PagerDuty gets its 2xx
well within its 5 s. Everything else answers 2xx and is audited `ignored` with the reason.

Text: the body is read by the pipeline's strict JSON reader (depth, finite numbers; 400
otherwise), except that a NUL or an unpaired surrogate in a string — which a signed incident
title may carry, and which PostgreSQL cannot store — is replaced by U+FFFD rather than refused:
refusing would leave the rollback undone and PagerDuty retrying the same body in vain. The
event id and type are identifiers and must look like them (400 otherwise, audited).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import select
from starlette.responses import JSONResponse, Response

from opsapi.audit import service as audit
from opsapi.audit.models import Outcome, Source
from opsapi.auth.identity import Identity
from opsapi.canary import machine
from opsapi.canary.effects import Applied, Cause
from opsapi.canary.machine import Actor, Trigger
from opsapi.canary.models import Incident as IncidentRecord
from opsapi.canary.models import ServiceRecord
from opsapi.canary.policy import PagerDutyPolicy
from opsapi.canary.service import Refused
from opsapi.errors import BadRequest, Unauthorized
from opsapi.http.endpoint import Call, endpoint, read_json
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
_OWN_ALERT = re.compile(r"^opsapi-rollout-\d+$")
_EVENT_ID = re.compile(r"[\x21-\x7e]{1,128}")
_EVENT_TYPE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_AS_ROLLBACK = Actor(Trigger.PAGERDUTY, ACTOR)


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


async def verify_signature(pipeline: Any) -> Identity:
    """The webhook's authentication step: a valid `X-PagerDuty-Signature` over the raw body."""
    raw = await pipeline.read_body()
    refused = signature_matches(
        raw,
        pipeline.request.headers.get(SIGNATURE_HEADER),
        pipeline.runtime.settings.webhook_secrets,
    )
    if refused is not None:
        raise Unauthorized("a valid X-PagerDuty-Signature is required", reason=refused)
    return Identity(ACTOR)


@endpoint(
    action=ACTION,
    role=None,
    mutating=True,
    authenticate=verify_signature,
    source=Source.PAGERDUTY,
    unknown_actor=ACTOR,
    challenge='PagerDuty-Signature realm="opsapi"',
)
async def pagerduty_webhook(call: Call) -> Response:
    """Receive one PagerDuty v3 webhook event: a qualifying incident rolls back."""
    event_id, event_type, data = _parse(call.raw_body)
    base: dict[str, Any] = {"event_id": event_id, "event_type": event_type}
    call.details.update(base)
    if not await _first_delivery(call, event_id, event_type):
        return _ignored(call, "duplicate event")
    holds = await _track_incident(call, event_type, Incident.of(data), data)
    if holds:
        call.details["holds"] = holds
    if event_type not in ACTING_EVENTS:
        return _ignored(call, f"event type {event_type} does not act")
    incident = Incident.of(data)
    call.details["incident"] = incident.details()
    if incident.incident_key and _OWN_ALERT.fullmatch(incident.incident_key):
        return _ignored(call, f"the incident is opsapi's own alert {incident.incident_key}")
    if incident.service_id is None:
        return _ignored(call, "the event names no PagerDuty service")
    records = (await call.session.exec(select(ServiceRecord))).all()
    mapped = mapped_services(records, incident.service_id)
    if not mapped:
        return _ignored(
            call, f"PagerDuty service {incident.service_id} is not mapped to any service"
        )
    answer: list[dict[str, Any]] = []
    rolled_back: list[Applied] = []
    for name, policy in mapped:
        reason = _does_not_qualify(event_type, incident, policy)
        if reason is None:
            rollback = machine.Rollback(reason=incident.rollback_reason(), actor=_AS_ROLLBACK)
            cause = Cause(
                actor=ACTOR,
                source=Source.PAGERDUTY,
                request_id=call.request_id,
                client_address=call.client_address,
                details=dict(call.details),
                detected_at=call.now,
            )
            try:
                applied = await call.effects.run(
                    name, rollback, now=call.now, cause=cause, session=call.session
                )
            except Refused:
                reason = "no open rollout"
            else:
                rolled_back.append(applied)
                answer.append({"service": name, "rollout_id": applied.record.id,
                               "outcome": "rolled_back", "reason": rollback.reason})  # fmt: skip
                continue
        await _audit_ignored(call, reason, name)
        answer.append({"service": name, "rollout_id": None, "outcome": "ignored",
                       "reason": reason})  # fmt: skip
    call.audited = True
    stored = await call.session.get(PagerDutyEvent, event_id)
    assert stored is not None
    stored.outcome = (Outcome.SUCCESS if rolled_back else Outcome.IGNORED).value
    call.session.add(stored)
    outcome = "rolled_back" if rolled_back else "ignored"
    body: dict[str, Any] = {**base, "outcome": outcome, "services": answer}
    if not rolled_back:
        body["reason"] = answer[0]["reason"]
    call.after_commit.append(lambda: _answer(call, rolled_back, body))
    return call.pending()


async def _answer(call: Call, rolled_back: list[Applied], body: dict[str, Any]) -> Response:
    """Apply the rollbacks' weights within the budget (PagerDuty wants 2xx within ~5 s); the
    applies go on after the answer and the reconcile pass finishes any that fail."""
    finished = await asyncio.gather(
        *(call.effects.finish(applied, budget=APPLY_BUDGET_SECONDS) for applied in rolled_back)
    )
    at_zero = {applied.record.id: applied.record.applied_weight == 0 for applied in finished}
    for item in body["services"]:
        if item["rollout_id"] in at_zero:
            item["traffic_at_zero"] = at_zero[item["rollout_id"]]
    return JSONResponse(body)


async def _track_incident(
    call: Call, event_type: str, incident: Incident, data: Any
) -> list[dict[str, str]]:
    """Keep the mapped services' open incidents (and their dependants') up to date: while one
    is open, starts and promotions of the service are held. Returns what changed."""
    status = data.get("status") if isinstance(data, dict) else None
    if not event_type.startswith("incident.") or incident.id is None:
        return []
    if incident.service_id is None or not isinstance(status, str):
        return []
    records = (await call.session.exec(select(ServiceRecord))).all()
    names: dict[str, str] = {}
    for name, policy in mapped_services(records, incident.service_id):
        names.setdefault(name, name)
        for dependant in policy.dependants:
            names.setdefault(dependant, name)
    changes = []
    for name, via in sorted(names.items()):
        row = await call.session.get(IncidentRecord, (incident.id, name))
        title = incident.title[:500] if via == name else f"{incident.title[:400]} (on {via})"
        if status == "resolved":
            if row is None or row.resolved_at is not None:
                continue
            row.status, row.resolved_at, row.updated_at = status, call.now, call.now
            changes.append({"service": name, "hold": "lifted"})
        elif row is None:
            row = IncidentRecord(id=incident.id, service=name, number=incident.number,
                                 title=title, html_url=incident.html_url, status=status[:32],
                                 opened_at=call.now, updated_at=call.now)  # fmt: skip
            changes.append({"service": name, "hold": "incident_open"})
        elif row.resolved_at is not None:  # reopened
            row.status, row.resolved_at, row.opened_at = status[:32], None, call.now
            row.updated_at = call.now
            changes.append({"service": name, "hold": "incident_open"})
        else:
            row.status, row.updated_at = status[:32], call.now
        call.session.add(row)
    return changes


async def _first_delivery(call: Call, event_id: str, event_type: str) -> bool:
    """Remember the event id in this transaction; False when it was already handled."""
    if await call.session.get(PagerDutyEvent, event_id) is not None:
        return False
    try:
        # A concurrent delivery of the same event waits here for the first, then conflicts.
        async with call.session.begin_nested():
            call.session.add(PagerDutyEvent(id=event_id, event_type=event_type,
                                            received_at=call.now, outcome="pending"))  # fmt: skip
    except IntegrityError:
        return False
    return True


def _ignored(call: Call, reason: str) -> Response:
    call.outcome = Outcome.IGNORED
    call.details["reason"] = reason
    return JSONResponse({**_base(call), "outcome": "ignored", "reason": reason})


def _base(call: Call) -> dict[str, Any]:
    return {"event_id": call.details["event_id"], "event_type": call.details["event_type"]}


async def _audit_ignored(call: Call, reason: str, service: str) -> None:
    await audit.record(
        session=call.session,
        at=call.now,
        actor=ACTOR,
        source=Source.PAGERDUTY,
        action=ACTION,
        outcome=Outcome.IGNORED,
        service=service,
        request_id=call.request_id,
        client_address=call.client_address,
        details={**call.details, "reason": reason},
    )


def _does_not_qualify(event_type: str, incident: Incident, policy: PagerDutyPolicy) -> str | None:
    if qualifies(event_type, incident, policy):
        return None
    return (
        f"priority {incident.priority} / urgency {incident.urgency} does not qualify "
        f"(policy: priorities {policy.priorities}, urgencies {policy.urgencies}"
        + (", priority changes act by priority only)"
           if event_type == "incident.priority_updated" else ")")
    )  # fmt: skip


def _parse(raw: bytes) -> tuple[str, str, Any]:
    """(event id, event type, data) of a v3 webhook body; BadRequest if it is not one."""
    document = read_json(raw, odd_text="replace")
    event = document.get("event") if isinstance(document, dict) else None
    if not isinstance(event, dict):
        raise BadRequest("not a PagerDuty webhook v3 event (no event object)")
    event_id, event_type = event.get("id"), event.get("event_type")
    if not (isinstance(event_id, str) and _EVENT_ID.fullmatch(event_id)):
        raise BadRequest("not a PagerDuty webhook v3 event (no event id: 1-128 visible ASCII "
                         "characters)")  # fmt: skip
    if not (isinstance(event_type, str) and _EVENT_TYPE.fullmatch(event_type)):
        raise BadRequest("not a PagerDuty webhook v3 event (no event type)")
    return event_id, event_type, event.get("data")
