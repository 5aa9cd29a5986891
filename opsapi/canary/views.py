"""HTTP handlers for rollouts and service policies (DESIGN §4, §9)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from opsapi.auth.identity import Role
from opsapi.canary import machine, service
from opsapi.canary.dataplane import Poll, WeightDocument
from opsapi.canary.document import (
    RolloutView,
    VersionInSlot,
    rollout_document,
    slot_split,
    targets_of,
)
from opsapi.canary.effects import Applied
from opsapi.canary.machine import OPEN_STATES, Actor, Trigger
from opsapi.canary.models import RolloutRecord, ServiceRecord
from opsapi.canary.policy import (
    SERVICE_NAME,
    VERSION,
    Policy,
    effective_policy,
    is_service_name,
)
from opsapi.durations import parse_duration
from opsapi.errors import Conflict, NotFound, Unprocessable
from opsapi.http.endpoint import (
    Call,
    document_response,
    endpoint,
    header,
    validation_errors,
)
from opsapi.http.params import INT32_MAX, id_param, int_param
from opsapi.notifications import outbox as notifications
from opsapi.notifications.rules import check_rules
from opsapi.pagerduty import outbox as pagerduty_outbox
from opsapi.pagerduty.models import OutboxKind, OutboxMessage
from opsapi.routers.registry import check_router

ServiceName = Field(pattern=SERVICE_NAME.pattern, description="the service's name")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromoteBody(_Body):
    service: str = ServiceName
    version: str | None = Field(default=None, pattern=VERSION)
    # The version running before opsapi knew the service (its first rollout's baseline).
    stable_version: str | None = Field(default=None, pattern=VERSION)
    reason: str | None = Field(default=None, max_length=2000)
    force: bool = False
    target_percent: int | None = Field(default=None, ge=1, le=100)
    from_percent: int | None = Field(default=None, ge=0, le=100)
    # Admin only, with a reason: act despite an open incident or a freeze window (break glass),
    # or start a version that a breach or an incident rejected.
    break_glass: bool = False
    override_rejection: bool = False


class PolicyDocument(RootModel[dict[str, Any]]):
    """A PUT body: a policy document (checked by `effective_policy`). `status`, as GET answers
    it, is read-only and ignored, so that a policy read can be edited and put back."""


class RollbackBody(_Body):
    service: str = ServiceName
    reason: str = Field(min_length=1, max_length=2000)


class PauseBody(_Body):
    service: str = ServiceName
    reason: str | None = Field(default=None, max_length=2000)


def _actor(call: Call) -> Actor:
    return Actor(Trigger.USER, call.identity.subject)


async def _transition(
    call: Call,
    name: str,
    event: machine.Event,
    *,
    locked: service.Locked | None = None,
    policy: Policy | None = None,
) -> Response:
    """Run `event` through the one interpreter; answer once the router has applied it."""
    if locked is None:
        locked = await call.effects.lock(name, now=call.now, session=call.session, outbox=True)
    # Answered after the commit: the pipeline's own writes (an Idempotency-Key record as
    # such an answer leaves it) travel with the transition's.
    applied = await call.effects.apply(
        locked, event, now=call.now, cause=call.cause(), session=call.session,
        policy=policy, read_outbox=True, alongside=call.take_writes(),
    )  # fmt: skip
    call.rollout_id = applied.record.id
    call.after_commit.append(lambda: _answer(call, applied))
    return call.pending()


def _outbound(messages: list[OutboxMessage]) -> dict[str, Any]:
    """The rollout's PagerDuty alerts and notifications, with their delivery state."""
    outbound: dict[str, Any] = {"alerts": [], "notifications": []}
    for row in messages:
        if row.kind == OutboxKind.NOTIFICATION.value:
            outbound["notifications"].append(notifications.delivery_view(row))
        elif row.kind in pagerduty_outbox.PAGES:
            outbound["alerts"].append(pagerduty_outbox.alert_view(row))
    return outbound


async def _answer(call: Call, applied: Applied) -> Response:
    await call.effects.finish(applied)
    document = rollout_document(
        applied.record, applied.service, call.now, **_outbound(applied.messages or []),
        rollout=applied.transition.rollout,
    )  # fmt: skip
    return document_response(document, RolloutView)


@endpoint(action="canary.promote", role=Role.OPERATOR, body=PromoteBody, mutating=True)
async def promote(call: Call) -> Response:
    """Start a rollout (with a version) or advance the open one by a step."""
    body = call.body_as(PromoteBody)
    if body.force:
        call.action = "canary.promote.force"
        call.require(Role.ADMIN, "force")
    if body.target_percent is not None:
        call.action = "canary.promote.target"
        call.require(Role.ADMIN, "target_percent")
    override = _override(call, body)
    call.details.update(body.model_dump(exclude_none=True, exclude={"service"}))
    # Decide start or promote on the rows as locked (the service, then its latest rollout);
    # with a version it may be a start, whose id the lock draws.
    locked = await call.effects.lock(
        body.service, now=call.now, session=call.session, outbox=True, safety=True,
        new_rollout=body.version is not None,
    )  # fmt: skip
    row, record = locked.row, locked.record
    if record is None or record.state not in OPEN_STATES:
        if body.version is None:
            raise Conflict(
                f"{body.service} has no open rollout; give a version to start one",
                reason_code="no_open_rollout",
            )
        policy = service.policy_of(row, call.runtime.default_policy)
        start = machine.Start(
            service=body.service,
            canary_version=body.version,
            stable_version=body.stable_version,
            steps=policy.machine_steps(),
            actor=_actor(call),
            auto_promote=policy.auto_promote,
            gate_names=tuple(gate.name for gate in policy.gates),
            target_percent=body.target_percent,
            reason=body.reason,
            override=override,
            lease=policy.effective_lease(),
        )
        return await _transition(call, body.service, start, locked=locked, policy=policy)
    call.rollout_id = record.id
    if body.version is not None and body.version != record.canary_version:
        raise Conflict(
            f"{body.service} already has an open rollout of {record.canary_version}; "
            "finish or roll it back first",
            reason_code="open_rollout",
            rollout_id=record.id,
        )
    event = machine.Promote(
        actor=_actor(call),
        force=body.force,
        target_percent=body.target_percent,
        from_percent=body.from_percent,
        reason=body.reason,
        override=override,
    )
    return await _transition(call, body.service, event, locked=locked)


def _override(call: Call, body: PromoteBody) -> machine.Override | None:
    """An admin's break-glass or rejection override, which must say why."""
    if not (body.break_glass or body.override_rejection):
        return None
    call.action = "canary.promote.override"
    call.require(Role.ADMIN, "break_glass and override_rejection")
    if not body.reason or not body.reason.strip():
        message = "an override needs a reason"
        raise Unprocessable(message, errors=[{"field": "reason", "message": message}])
    return machine.Override(
        reason=body.reason, holds=body.break_glass, rejection=body.override_rejection
    )


@endpoint(action="canary.rollback", role=Role.OPERATOR, body=RollbackBody, mutating=True)
async def rollback(call: Call) -> Response:
    """Roll the service's open rollout back: 100 % to the stable slot, now."""
    body = call.body_as(RollbackBody)
    call.details["reason"] = body.reason
    event = machine.Rollback(reason=body.reason, actor=_actor(call))
    return await _transition(call, body.service, event)


@endpoint(action="canary.revert", role=Role.OPERATOR, body=RollbackBody, mutating=True)
async def revert(call: Call) -> Response:
    """After a success, send 100 % back to the previous version's slot and make it stable."""
    body = call.body_as(RollbackBody)
    call.details["reason"] = body.reason
    event = machine.Revert(reason=body.reason, actor=_actor(call))
    return await _transition(call, body.service, event)


@endpoint(action="canary.pause", role=Role.OPERATOR, body=PauseBody, mutating=True)
async def pause(call: Call) -> Response:
    """Freeze the wait clock of the open rollout (gates keep running)."""
    body = call.body_as(PauseBody)
    return await _transition(call, body.service, machine.Pause(_actor(call), body.reason))


@endpoint(action="canary.resume", role=Role.OPERATOR, body=PauseBody, mutating=True)
async def resume(call: Call) -> Response:
    """Unfreeze the wait clock of a paused rollout."""
    body = call.body_as(PauseBody)
    return await _transition(call, body.service, machine.Resume(_actor(call), body.reason))


async def _views(
    session: AsyncSession, records: list[RolloutRecord], call: Call
) -> list[dict[str, Any]]:
    services: dict[str, ServiceRecord | None] = {}
    for record in records:
        if record.service not in services:
            services[record.service] = await service.service_row(record.service, session=session)
    return [rollout_document(record, services[record.service], call.now) for record in records]


@endpoint(action="canary.list", role=Role.VIEWER)
async def list_rollouts(call: Call) -> Response:
    """Every open rollout."""
    records = list(await service.list_open(session=call.session))
    return JSONResponse({"items": await _views(call.session, records, call)})


def _service_param(call: Call) -> str:
    name = str(call.request.path_params["service"])
    if not is_service_name(name):
        call.service = None
        message = f"service names match {SERVICE_NAME.pattern}"
        raise Unprocessable(message, errors=[{"field": "service", "message": message}])
    return name


@endpoint(action="canary.get", role=Role.VIEWER)
async def get_rollout(call: Call) -> Response:
    """The service's latest rollout, open or finished."""
    name = _service_param(call)
    status = await service.status_of(
        name, now=call.now, windows=call.effects.freezes, session=call.session
    )
    record = status.record
    if record is None:
        raise NotFound(f"{name} has no rollout")
    call.rollout_id = record.id
    outbound = _outbound(status.messages)
    document = rollout_document(record, status.row, call.now, **outbound, holds=status.holds)
    # Watching a rollout (`opsctl status --watch`, the console) reads it every few seconds:
    # each caller's first read of a service in a minute is audited on its own, the repeats in
    # that minute are counted into one event (DESIGN §11).
    call.audited = call.runtime.repeats.repeat(_poll(call, name, record.id))
    return document_response(document, RolloutView)


@endpoint(action="canary.history", role=Role.VIEWER)
async def rollout_history(call: Call) -> Response:
    """The service's rollouts, newest first; `limit` (≤ 100) and an opaque `cursor`."""
    name = _service_param(call)
    limit = int_param(call.request, "limit", default=20, low=1, high=100)
    before_id = id_param(call.request, "cursor", high=INT32_MAX)
    records = await service.history(name, limit=limit, before_id=before_id, session=call.session)
    next_cursor = str(records[-1].id) if len(records) == limit else None
    items = await _views(call.session, list(records), call)
    return JSONResponse({"items": items, "next_cursor": next_cursor})


@endpoint(action="canary.weight", role=Role.VIEWER)
async def rollout_weight(call: Call) -> Response:
    """The canary percentage to apply now, with versions, slots and the lease (the pull
    router's answer; the data plane): served from a copy kept fresh across replicas, with an
    `ETag`; `If-None-Match` → 304, and `?wait=30s` holds a 304 until the weight changes."""
    name = _service_param(call)
    wait = _wait_param(call)
    cache = call.runtime.weights

    async def load(service_name: str) -> WeightDocument:
        async with call.runtime.sessions() as session:
            return await weight_document(service_name, session)

    document = await cache.get(name, load)
    etag = header(call.request, b"if-none-match")
    if etag == document.etag and wait > 0:
        await cache.wait_change(name, etag, wait, load)
        document = await cache.get(name, load)
    call.rollout_id = document.rollout_id
    caller = call.identity.subject

    async def record_fetch(rollout_id: int, generation: int) -> bool:
        return await call.runtime.traffic.fetched(rollout_id, generation, caller=caller)

    # A 200, or a 304 for the current tag: either way this client now holds the document.
    cache.fetched(name, document, record_fetch)
    # Polls are audited as one event per caller, service and minute (DESIGN §11).
    call.audited = True
    call.runtime.polls.count(_poll(call, name, document.rollout_id))
    headers = {"ETag": document.etag, "Cache-Control": "no-cache"}
    if etag == document.etag:
        return Response(status_code=304, headers=headers)
    return Response(document.body, media_type="application/json", headers=headers)


def _poll(call: Call, service_name: str, rollout_id: int | None) -> Poll:
    return Poll(call.identity.subject, sorted(call.identity.roles), service_name, rollout_id,
                call.client_address, call.now)  # fmt: skip


def _wait_param(call: Call) -> float:
    if not call.request.scope["query_string"]:
        return 0.0  # most polls: no query to parse
    raw = call.request.query_params.get("wait")
    if raw is None:
        return 0.0
    try:
        seconds = parse_duration(raw).total_seconds()
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= MAX_WAIT:
        message = f"wait is a duration such as 30s, at most {MAX_WAIT:g}s"
        raise Unprocessable(message, errors=[{"field": "wait", "message": message}])
    return seconds


MAX_WAIT = 60.0


async def weight_document(name: str, session: AsyncSession) -> WeightDocument:
    """What the data plane answers for `name` now (read from the database)."""
    record = await service.latest_rollout(name, session=session)
    if record is None:
        row = await service.service_row(name, session=session)
        stable = row.stable_version if row else None
        body: dict[str, Any] = {"service": name, "weight": 0, "rollout_id": None,
                                "stable_version": stable}  # fmt: skip
        return WeightDocument.of(body, generation=None, pull=False)
    weights = slot_split(record)
    body = {
        "service": name,
        "weight": record.desired_weight,
        "rollout_id": record.id,
        "state": record.state.value,
        "canary_version": record.canary_version,
        "stable_version": record.stable_version,
        "canary_slot": record.canary_slot,
        "stable_slot": record.stable_slot,
        "weights": weights,
        "generation": record.generation,
        # A client that cannot reach the API for this long falls back to the stable slot.
        "lease_seconds": record.lease_seconds if record.state in OPEN_STATES else None,
    }
    pull = record.router.get("name", "pull") == "pull"
    return WeightDocument.of(body, generation=record.generation, pull=pull)


class ServiceStatus(BaseModel):
    """A service's place in its release lifecycle (read-only; ignored in a PUT)."""

    stable_version: str | None
    stable_slot: str
    targets: dict[str, str | None]
    previous: VersionInSlot | None
    latest_rollout: dict[str, Any] | None


async def _status(call: Call, name: str, policy: Policy) -> ServiceStatus:
    row = await service.service_row(name, session=call.session)
    latest = await service.latest_rollout(name, session=call.session)
    router = policy.router.model_dump(mode="json")
    targets = targets_of(router)
    previous = None
    if row is not None and row.previous_version and row.previous_slot:
        previous = VersionInSlot(version=row.previous_version, slot=row.previous_slot)
    return ServiceStatus(
        stable_version=row.stable_version if row else None,
        stable_slot=(row.stable_slot if row and row.stable_slot else next(iter(targets))),
        targets=targets,
        previous=previous,
        latest_rollout=(
            {"id": latest.id, "state": latest.state, "canary_version": latest.canary_version}
            if latest
            else None
        ),
    )


@endpoint(action="service.get", role=Role.VIEWER)
async def get_policy(call: Call) -> Response:
    """The service's policy (the default policy for a service never configured) and status."""
    name = _service_param(call)
    policy = await service.load_policy(
        name, default=call.runtime.default_policy, session=call.session
    )
    document = pagerduty_outbox.redact_policy_document(policy.document())
    status = await _status(call, name, policy)
    return JSONResponse({**document, "status": status.model_dump(mode="json")})


@endpoint(action="service.put", role=Role.ADMIN, body=PolicyDocument, mutating=True)
async def put_policy(call: Call) -> Response:
    """Replace the service's policy: omitted fields take the server's defaults; the answer is
    the effective policy; the audit event keeps before and after."""
    name = _service_param(call)
    document = {k: v for k, v in call.body_as(PolicyDocument).root.items() if k != "status"}
    try:
        policy = effective_policy(document, call.runtime.default_policy)
    except ValidationError as error:
        raise Unprocessable(
            "the request body is invalid", errors=validation_errors(error)
        ) from None
    check_router(policy.router, call.runtime.traffic.routers)
    unknown = check_rules(policy.notify, call.runtime.delivery.notifier.channels)
    if unknown:
        raise Unprocessable("the policy names notification channels this server lacks",
                            errors=unknown)  # fmt: skip
    # A routing key sent back as answered ("…abcd") keeps the stored one.
    stored = await service.load_policy(
        name, default=call.runtime.default_policy, session=call.session
    )
    policy = pagerduty_outbox.keep_stored_routing_key(policy, stored)
    before, after = await service.save_policy(
        name,
        policy,
        default=call.runtime.default_policy,
        actor=call.identity.subject,
        now=call.now,
        session=call.session,
    )
    call.details.update(before=before, after=after)
    document = pagerduty_outbox.redact_policy_document(after)
    status = await _status(call, name, policy)
    return JSONResponse({**document, "status": status.model_dump(mode="json")})


async def service_policy(request: Request) -> Response:
    """GET or PUT a service's policy (one route, so that a 405 lists both methods)."""
    handler = put_policy if request.method == "PUT" else get_policy
    return await handler(request)


routes = [
    # The data plane's route first (a router tries routes in order): no other route matches
    # its paths, so no answer changes (a 405's Allow names the first route the path matches).
    Route("/canary/{service}/weight", rollout_weight, methods=["GET"]),
    Route("/canary/promote", promote, methods=["POST"]),
    Route("/canary/rollback", rollback, methods=["POST"]),
    Route("/canary/revert", revert, methods=["POST"]),
    Route("/canary/pause", pause, methods=["POST"]),
    Route("/canary/resume", resume, methods=["POST"]),
    Route("/canary", list_rollouts, methods=["GET"]),
    Route("/canary/{service}", get_rollout, methods=["GET"]),
    Route("/canary/{service}/history", rollout_history, methods=["GET"]),
    Route("/services/{service}", service_policy, methods=["GET", "PUT"]),
]

__all__ = ["PauseBody", "PromoteBody", "RollbackBody", "RolloutView", "routes"]
