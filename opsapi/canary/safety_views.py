"""HTTP handlers for change control (DESIGN §12): freeze windows, open incidents, rejected
versions. Rollback and revert are never held by any of them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import col, select
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from opsapi.auth.identity import Role
from opsapi.canary import service
from opsapi.canary.freezes import FreezeSpec, describe, sorted_windows
from opsapi.canary.models import FreezeRecord, Incident, RejectedVersion
from opsapi.canary.policy import SERVICE_NAME, VERSION, is_service_name
from opsapi.errors import NotFound, Unprocessable
from opsapi.http.endpoint import Call, endpoint
from opsapi.http.params import INT32_MAX, iso, path_id


def _incident_view(incident: Incident) -> dict[str, Any]:
    return {
        "id": incident.id,
        "service": incident.service,
        "number": incident.number,
        "title": incident.title,
        "html_url": incident.html_url,
        "status": incident.status,
        "opened_at": iso(incident.opened_at),
    }


@endpoint(action="freeze.list", role=Role.VIEWER)
async def list_freezes(call: Call) -> Response:
    """Every freeze window (the server's and the API's), active or not, and open incidents."""
    windows = sorted_windows([*call.effects.freezes, *await service.api_windows(call.session)])
    incidents = await call.session.exec(
        select(Incident)
        .where(col(Incident.resolved_at).is_(None))
        .order_by(col(Incident.service), col(Incident.opened_at))
    )
    return JSONResponse({
        "windows": [describe(window, call.now) for window in windows],
        "incidents": [_incident_view(incident) for incident in incidents],
    })  # fmt: skip


@endpoint(action="freeze.create", role=Role.ADMIN, body=FreezeSpec, mutating=True)
async def create_freeze(call: Call) -> Response:
    """Add a freeze window (absolute, or cron + duration in a time zone)."""
    spec = call.body_as(FreezeSpec)
    record = FreezeRecord(
        name=spec.name,
        services=list(spec.services),
        reason=spec.reason,
        starts_at=spec.starts_at,
        ends_at=spec.ends_at,
        cron=spec.cron,
        duration_seconds=spec.duration.total_seconds() if spec.duration else None,
        timezone=spec.timezone,
        created_by=call.identity.subject,
        created_at=call.now,
    )
    call.session.add(record)
    await call.session.flush()
    view = describe(service.window_of(record), call.now)
    call.details["window"] = view
    return JSONResponse(view, status_code=201)


@endpoint(action="freeze.delete", role=Role.ADMIN, mutating=True)
async def delete_freeze(call: Call) -> Response:
    """End an API-set freeze window now (server-configured windows live in the freezes file)."""
    freeze_id = path_id(call.request, "freeze_id", high=INT32_MAX)
    record = await call.session.get(FreezeRecord, freeze_id, with_for_update=True)
    if record is None or record.deleted_at is not None:
        raise NotFound(f"no freeze window {freeze_id}")
    record.deleted_at = call.now
    record.deleted_by = call.identity.subject
    call.session.add(record)
    call.details["window"] = {"id": freeze_id, "name": record.name}
    return JSONResponse({"id": freeze_id, "name": record.name, "deleted": True})


def _service(call: Call) -> str:
    name = str(call.request.path_params["service"])
    if not is_service_name(name):
        call.service = None
        message = f"service names match {SERVICE_NAME.pattern}"
        raise Unprocessable(message, errors=[{"field": "service", "message": message}])
    return name


def _rejection_view(row: RejectedVersion) -> dict[str, Any]:
    return {
        "version": row.version,
        "rollout_id": row.rollout_id,
        "reason": row.reason,
        "rejected_at": iso(row.rejected_at),
        "lifted_at": iso(row.lifted_at),
        "lifted_by": row.lifted_by,
        "lift_reason": row.lift_reason,
    }


@endpoint(action="rejection.list", role=Role.VIEWER)
async def list_rejections(call: Call) -> Response:
    """The service's rejected versions, standing and lifted, newest first."""
    name = _service(call)
    rows = await call.session.exec(
        select(RejectedVersion)
        .where(RejectedVersion.service == name)
        .order_by(col(RejectedVersion.id).desc())
        .limit(200)
    )
    return JSONResponse({"items": [_rejection_view(row) for row in rows]})


class LiftBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(pattern=VERSION)
    reason: str = Field(min_length=1, max_length=2000)


@endpoint(action="rejection.lift", role=Role.ADMIN, body=LiftBody, mutating=True)
async def lift_rejection(call: Call) -> Response:
    """Lift a standing rejection: the version may be started again."""
    name = _service(call)
    body = call.body_as(LiftBody)
    call.details.update(version=body.version, reason=body.reason)
    row = (
        await call.session.exec(
            select(RejectedVersion)
            .where(
                RejectedVersion.service == name,
                RejectedVersion.version == body.version,
                col(RejectedVersion.lifted_at).is_(None),
            )
            .with_for_update()
        )
    ).first()
    if row is None:
        raise NotFound(f"{body.version} of {name} is not rejected")
    row.lifted_at = call.now
    row.lifted_by = call.identity.subject
    row.lift_reason = body.reason
    call.session.add(row)
    return JSONResponse(_rejection_view(row))


async def freezes(request: Request) -> Response:
    """List or add freeze windows (one route, so that a 405 lists both methods)."""
    handler = create_freeze if request.method == "POST" else list_freezes
    return await handler(request)


routes = [
    Route("/freezes", freezes, methods=["GET", "POST"]),
    Route("/freezes/{freeze_id}", delete_freeze, methods=["DELETE"]),
    Route("/services/{service}/rejections", list_rejections, methods=["GET"]),
    Route("/services/{service}/rejections/lift", lift_rejection, methods=["POST"]),
]
