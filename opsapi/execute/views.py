"""`POST /internal/ops/execute`: run a named operation with typed parameters, or a dry run."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from opsapi.auth.identity import Role
from opsapi.errors import NotFound, Unprocessable
from opsapi.execute.operations import OPERATIONS
from opsapi.http.endpoint import Call, endpoint, validation_errors


class ExecuteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    operation: str = Field(min_length=1, max_length=64)
    params: dict[str, Any] = Field(default_factory=dict)
    dry_run: bool = False


# The wrapper checks the least role (viewer); each operation then requires its own.
@endpoint(action="execute", role=Role.VIEWER, body=ExecuteBody, mutating=True)
async def execute(call: Call) -> Response:
    """Run one named operation."""
    body = call.body_as(ExecuteBody)
    operation = OPERATIONS.get(body.operation)
    if operation is None:
        known = ", ".join(sorted(OPERATIONS))
        raise NotFound(f"unknown operation {body.operation!r}; known: {known}")
    call.action = f"execute.{operation.name}"
    call.details.update(params=body.params, dry_run=body.dry_run)
    call.require(operation.role, f"operation {operation.name}")
    try:
        params = operation.params.model_validate(body.params)
    except ValidationError as error:
        errors = [{**e, "field": f"params.{e['field']}"} for e in validation_errors(error)]
        raise Unprocessable(f"invalid parameters for {operation.name}", errors=errors) from None
    result = await operation.run(call, params, body.dry_run)
    call.details["result"] = result
    return JSONResponse({"operation": operation.name, "dry_run": body.dry_run,
                         "changes": operation.changes, "result": result})  # fmt: skip


routes = [Route("/execute", execute, methods=["POST"])]
