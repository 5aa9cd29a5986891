"""HTTP handlers for rollouts and service policies (DESIGN §4)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from opsapi.auth.identity import Role
from opsapi.canary import machine, service
from opsapi.canary.machine import Actor, Trigger
from opsapi.canary.models import RolloutRecord
from opsapi.canary.policy import SERVICE_NAME, VERSION, Policy, is_service_name
from opsapi.errors import Conflict, NotFound, Unprocessable
from opsapi.http.endpoint import Call, endpoint
from opsapi.http.params import int_param
from opsapi.pagerduty import outbox as pagerduty_outbox
from opsapi.routers.registry import check_router

ServiceName = Field(pattern=SERVICE_NAME.pattern, description="the service's name")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromoteBody(_Body):
    service: str = ServiceName
    version: str | None = Field(default=None, pattern=VERSION)
    reason: str | None = Field(default=None, max_length=2000)
    force: bool = False
    target_percent: int | None = Field(default=None, ge=1, le=100)
    from_percent: int | None = Field(default=None, ge=0, le=100)


class RollbackBody(_Body):
    service: str = ServiceName
    reason: str = Field(min_length=1, max_length=2000)


class PauseBody(_Body):
    service: str = ServiceName
    reason: str | None = Field(default=None, max_length=2000)


def _actor(call: Call) -> Actor:
    return Actor(Trigger.USER, call.identity.subject)


async def _rollout_response(call: Call, applied: service.Applied) -> JSONResponse:
    record = applied.record
    call.rollout_id = record.id
    call.details.update(applied.audit_details, triggered_by=record.triggered_by)
    for effect in applied.transition.effects:
        if isinstance(effect, machine.Audit):
            call.runtime.metrics.transitions.labels(effect.action, record.triggered_by).inc()
    moved = any(isinstance(effect, machine.SetWeight) for effect in applied.transition.effects)
    if moved and record.applied_weight != record.desired_weight:
        call.after_commit.append(lambda: _apply_now(call, record.id, record.service))
    return JSONResponse(await _view(call, record))


async def _view(
    call: Call, record: RolloutRecord, session: AsyncSession | None = None
) -> dict[str, Any]:
    view = service.rollout_view(record, call.now)
    # Whether no request can reach the canary any more (the answer a rollback waits for).
    view["traffic_at_zero"] = record.applied_weight == 0
    view["alerts"] = await pagerduty_outbox.alerts_for(session or call.session, record.id)
    return view


async def _apply_now(call: Call, rollout_id: int | None, name: str) -> Response:
    """Apply the committed weight through the router inside the request, answer what is live."""
    assert rollout_id is not None
    await call.runtime.traffic.apply(rollout_id, name, reason=call.action)
    async with call.runtime.sessions() as session:
        record = await session.get(RolloutRecord, rollout_id)
        assert record is not None
        return JSONResponse(await _view(call, record, session))


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
    call.details.update(body.model_dump(exclude_none=True, exclude={"service"}))
    record = await service.open_rollout(body.service, session=call.session, lock=True)
    if record is None:
        if body.version is None:
            raise Conflict(
                f"{body.service} has no open rollout; give a version to start one",
                reason_code="no_open_rollout",
            )
        applied = await service.start_rollout(
            body.service,
            body.version,
            actor=_actor(call),
            now=call.now,
            default=call.runtime.default_policy,
            session=call.session,
            target_percent=body.target_percent,
            reason=body.reason,
        )
        return await _rollout_response(call, applied)
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
    )
    applied = await service.apply_event(record, event, now=call.now, session=call.session)
    return await _rollout_response(call, applied)


@endpoint(action="canary.rollback", role=Role.OPERATOR, body=RollbackBody, mutating=True)
async def rollback(call: Call) -> Response:
    """Roll the service's open rollout back to 0 % now."""
    body = call.body_as(RollbackBody)
    call.details["reason"] = body.reason
    record = await service.lock_open_rollout(body.service, session=call.session)
    call.rollout_id = record.id
    event = machine.Rollback(reason=body.reason, actor=_actor(call))
    applied = await service.apply_event(record, event, now=call.now, session=call.session)
    return await _rollout_response(call, applied)


@endpoint(action="canary.pause", role=Role.OPERATOR, body=PauseBody, mutating=True)
async def pause(call: Call) -> Response:
    """Freeze the wait clock of the open rollout (gates keep running)."""
    body = call.body_as(PauseBody)
    record = await service.lock_open_rollout(body.service, session=call.session)
    call.rollout_id = record.id
    event = machine.Pause(actor=_actor(call), reason=body.reason)
    applied = await service.apply_event(record, event, now=call.now, session=call.session)
    return await _rollout_response(call, applied)


@endpoint(action="canary.resume", role=Role.OPERATOR, body=PauseBody, mutating=True)
async def resume(call: Call) -> Response:
    """Unfreeze the wait clock of a paused rollout."""
    body = call.body_as(PauseBody)
    record = await service.lock_open_rollout(body.service, session=call.session)
    call.rollout_id = record.id
    event = machine.Resume(actor=_actor(call), reason=body.reason)
    applied = await service.apply_event(record, event, now=call.now, session=call.session)
    return await _rollout_response(call, applied)


@endpoint(action="canary.list", role=Role.VIEWER)
async def list_rollouts(call: Call) -> Response:
    """Every open rollout."""
    records = await service.list_open(session=call.session)
    return JSONResponse({"items": [service.rollout_view(r, call.now) for r in records]})


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
    record = await service.latest_rollout(name, session=call.session)
    if record is None:
        raise NotFound(f"{name} has no rollout")
    call.rollout_id = record.id
    view = service.rollout_view(record, call.now)
    view["alerts"] = await pagerduty_outbox.alerts_for(call.session, record.id)
    return JSONResponse(view)


@endpoint(action="canary.history", role=Role.VIEWER)
async def rollout_history(call: Call) -> Response:
    """The service's rollouts, newest first; `limit` (≤ 100) and an opaque `cursor`."""
    name = _service_param(call)
    limit = int_param(call.request, "limit", default=20, low=1, high=100)
    cursor = call.request.query_params.get("cursor")
    before_id = None
    if cursor:
        if not cursor.isdigit():
            raise Unprocessable("cursor is not one this API returned")
        before_id = int(cursor)
    records = await service.history(name, limit=limit, before_id=before_id, session=call.session)
    next_cursor = str(records[-1].id) if len(records) == limit else None
    return JSONResponse(
        {
            "items": [service.rollout_view(r, call.now) for r in records],
            "next_cursor": next_cursor,
        }
    )


@endpoint(action="canary.weight", role=Role.VIEWER)
async def rollout_weight(call: Call) -> Response:
    """The canary percentage the `pull` router's clients should apply now."""
    name = _service_param(call)
    record = await service.latest_rollout(name, session=call.session)
    body: dict[str, Any] = {"service": name, "weight": 0, "rollout_id": None}
    if record is not None:
        call.rollout_id = record.id
        body.update(
            weight=record.desired_weight,
            rollout_id=record.id,
            state=record.state,
            canary_version=record.canary_version,
            stable_version=record.stable_version,
        )
    return JSONResponse(body)


@endpoint(action="service.get", role=Role.VIEWER)
async def get_policy(call: Call) -> Response:
    """The service's policy (the default policy for a service never configured)."""
    name = _service_param(call)
    policy = await service.load_policy(
        name, default=call.runtime.default_policy, session=call.session
    )
    return JSONResponse(pagerduty_outbox.redact_policy_document(policy.document()))


@endpoint(action="service.put", role=Role.ADMIN, body=Policy, mutating=True)
async def put_policy(call: Call) -> Response:
    """Replace the service's policy; the audit event keeps before and after."""
    name = _service_param(call)
    policy = call.body_as(Policy)
    check_router(policy.router, call.runtime.traffic.routers)
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
    return JSONResponse(pagerduty_outbox.redact_policy_document(after))


routes = [
    Route("/canary/promote", promote, methods=["POST"]),
    Route("/canary/rollback", rollback, methods=["POST"]),
    Route("/canary/pause", pause, methods=["POST"]),
    Route("/canary/resume", resume, methods=["POST"]),
    Route("/canary", list_rollouts, methods=["GET"]),
    Route("/canary/{service}", get_rollout, methods=["GET"]),
    Route("/canary/{service}/history", rollout_history, methods=["GET"]),
    Route("/canary/{service}/weight", rollout_weight, methods=["GET"]),
    Route("/services/{service}", get_policy, methods=["GET"]),
    Route("/services/{service}", put_policy, methods=["PUT"]),
]
