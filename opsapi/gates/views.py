"""HTTP handler for a rollout's gate evaluation history."""

from __future__ import annotations

from sqlmodel import col, select
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from opsapi.auth.identity import Role
from opsapi.canary.models import RolloutRecord
from opsapi.errors import NotFound, Unprocessable
from opsapi.gates.models import GateEvaluation
from opsapi.http.endpoint import Call, endpoint
from opsapi.http.params import int_param, iso


@endpoint(action="rollout.evaluations", role=Role.VIEWER)
async def evaluations(call: Call) -> Response:
    """Gate evaluations of one rollout, newest first; `gate`, `limit` (≤ 1000), `cursor`."""
    raw_id = str(call.request.path_params["rollout_id"])
    if not raw_id.isdigit() or len(raw_id) > 12:
        raise Unprocessable("rollout ids are whole numbers")
    rollout = await call.session.get(RolloutRecord, int(raw_id))
    if rollout is None:
        raise NotFound(f"there is no rollout {raw_id}")
    call.rollout_id = rollout.id
    call.service = rollout.service
    limit = int_param(call.request, "limit", default=100, low=1, high=1000)
    query = select(GateEvaluation).where(GateEvaluation.rollout_id == rollout.id)
    gate = call.request.query_params.get("gate")
    if gate:
        query = query.where(GateEvaluation.gate == gate[:63])
    cursor = call.request.query_params.get("cursor")
    if cursor:
        if not cursor.isdigit():
            raise Unprocessable("cursor is not one this API returned")
        query = query.where(col(GateEvaluation.id) < int(cursor))
    rows = (
        await call.session.exec(query.order_by(col(GateEvaluation.id).desc()).limit(limit))
    ).all()
    items = [
        {
            "id": row.id,
            "at": iso(row.at),
            "gate": row.gate,
            "step_index": row.step_index,
            "weight": row.weight,
            "phase": row.phase,
            "value": row.value,
            "threshold": row.threshold,
            "breached": row.breached,
            "detail": row.detail,
        }
        for row in rows
    ]
    next_cursor = str(rows[-1].id) if len(rows) == limit else None
    return JSONResponse({"rollout_id": rollout.id, "items": items, "next_cursor": next_cursor})


routes = [Route("/rollouts/{rollout_id}/evaluations", evaluations, methods=["GET"])]
