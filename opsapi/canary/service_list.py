"""`GET /services`: every service opsapi knows, with its stable version and latest rollout."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlmodel import col, select
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from opsapi.auth.identity import Role
from opsapi.canary import service
from opsapi.canary.models import RolloutRecord, ServiceRecord
from opsapi.canary.policy import SERVICE_NAME, is_service_name
from opsapi.errors import Unprocessable
from opsapi.http.endpoint import Call, endpoint
from opsapi.http.params import int_param, text_param
from opsapi.routers.base import slot_names

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


def _cursor(call: Call) -> str | None:
    """The last name of the previous page (names are ordered, so the name is the cursor)."""
    raw = text_param(call.request, "cursor", max_length=63)
    if raw is not None and not is_service_name(raw):
        message = f"cursor is a service name matching {SERVICE_NAME.pattern}"
        raise Unprocessable(message, errors=[{"field": "cursor", "message": message}])
    return raw


def _item(row: ServiceRecord, latest: RolloutRecord | None, call: Call) -> dict[str, Any]:
    policy = service.policy_of(row, call.runtime.default_policy)
    router = policy.router.model_dump(mode="json")
    return {
        "name": row.name,
        # A row made only to hold lifecycle state stores no policy: the default applies.
        "configured": bool(row.policy),
        "router": router.get("name"),
        "stable_version": row.stable_version,
        "stable_slot": row.stable_slot or slot_names(router)[0],
        "latest_rollout": None
        if latest is None
        else {
            "id": latest.id,
            "state": latest.state.value,
            "canary_version": latest.canary_version,
            "desired_weight": latest.desired_weight,
            "applied_weight": latest.applied_weight,
        },
    }


@endpoint(action="service.list", role=Role.VIEWER)
async def list_services(call: Call) -> Response:
    """Every service, by name: `limit` (≤ 1000) and `cursor` (the last name of a page)."""
    limit = int_param(call.request, "limit", default=DEFAULT_LIMIT, low=1, high=MAX_LIMIT)
    after = _cursor(call)
    latest = (
        select(RolloutRecord.service, sa.func.max(RolloutRecord.id).label("latest_id"))
        .group_by(col(RolloutRecord.service))
        .subquery()
    )
    query = (
        select(ServiceRecord, RolloutRecord)
        .outerjoin(latest, latest.c.service == ServiceRecord.name)
        .outerjoin(RolloutRecord, col(RolloutRecord.id) == latest.c.latest_id)
        .order_by(col(ServiceRecord.name))
        .limit(limit)
    )
    if after is not None:
        query = query.where(col(ServiceRecord.name) > after)
    rows = (await call.session.exec(query)).all()
    items = [_item(row, rollout, call) for row, rollout in rows]
    next_cursor = items[-1]["name"] if len(items) == limit else None
    return JSONResponse({"items": items, "next_cursor": next_cursor})


routes = [Route("/services", list_services, methods=["GET"])]
