"""HTTP handler for a rollout's gate evaluation history."""

from __future__ import annotations

from sqlmodel import col, select
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from opsapi.auth.identity import Role
from opsapi.canary.models import RolloutRecord
from opsapi.errors import NotFound
from opsapi.gates.models import GateEvaluation
from opsapi.http.endpoint import Call, endpoint
from opsapi.http.params import (
    INT32_MAX,
    INT64_MAX,
    id_param,
    int_param,
    iso,
    path_id,
    text_param,
)


@endpoint(action="rollout.evaluations", role=Role.VIEWER)
async def evaluations(call: Call) -> Response:
    """Gate evaluations of one rollout, newest first; `gate`, `limit` (≤ 1000), `cursor`."""
    rollout_id = path_id(call.request, "rollout_id", high=INT32_MAX)
    limit = int_param(call.request, "limit", default=100, low=1, high=1000)
    gate = text_param(call.request, "gate", max_length=63)
    cursor = id_param(call.request, "cursor", high=INT64_MAX)
    rollout = await call.session.get(RolloutRecord, rollout_id)
    if rollout is None:
        raise NotFound(f"there is no rollout {rollout_id}")
    call.rollout_id = rollout.id
    call.service = rollout.service
    query = select(GateEvaluation).where(GateEvaluation.rollout_id == rollout.id)
    if gate is not None:
        query = query.where(GateEvaluation.gate == gate)
    if cursor is not None:
        query = query.where(col(GateEvaluation.id) < cursor)
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
