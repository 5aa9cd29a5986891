"""The OpenAPI 3.1 document, built from the same body models the handlers validate with."""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel

from opsapi import __version__
from opsapi.canary.freezes import FreezeSpec
from opsapi.canary.policy import Policy
from opsapi.canary.safety_views import LiftBody
from opsapi.canary.views import PauseBody, PromoteBody, RollbackBody
from opsapi.execute.views import ExecuteBody

# (method, path, role, summary, body model)
OPERATIONS: list[tuple[str, str, str, str, type[BaseModel] | None]] = [
    ("post", "/canary/promote", "operator (force, target_percent: admin)",
     "Start a rollout or advance it one step", PromoteBody),
    ("post", "/canary/rollback", "operator", "Roll back: 100 % to the stable slot now",
     RollbackBody),
    ("post", "/canary/revert", "operator", "After a success, make the previous version stable "
     "again (100 % to its slot)", RollbackBody),
    ("post", "/canary/pause", "operator", "Freeze the wait clock", PauseBody),
    ("post", "/canary/resume", "operator", "Unfreeze the wait clock", PauseBody),
    ("get", "/canary", "viewer", "Open rollouts", None),
    ("get", "/canary/{service}", "viewer", "The service's latest rollout", None),
    ("get", "/canary/{service}/history", "viewer", "The service's rollouts, newest first", None),
    ("get", "/canary/{service}/weight", "viewer", "The canary percentage to apply now", None),
    ("get", "/rollouts/{rollout_id}/evaluations", "viewer",
     "Gate evaluations of a rollout, newest first", None),
    ("post", "/execute", "per operation (health-check: viewer; gate-check, router-sync: "
     "operator; set-weight, pagerduty-test: admin)", "Run a named operation, or a dry run",
     ExecuteBody),
    ("get", "/services", "viewer", "Every service: stable version and slot, latest rollout "
     "(limit, cursor)", None),
    ("get", "/services/{service}", "viewer", "The service's policy", None),
    ("put", "/services/{service}", "admin", "Replace the service's policy", Policy),
    ("get", "/services/{service}/rejections", "viewer",
     "Versions rolled back by a breach or an incident (standing and lifted)", None),
    ("post", "/services/{service}/rejections/lift", "admin",
     "Lift a standing rejection, with a reason", LiftBody),
    ("get", "/freezes", "viewer", "Freeze windows (server and API) and open incidents", None),
    ("post", "/freezes", "admin", "Add a freeze window (absolute, or cron + duration + time zone)",
     FreezeSpec),
    ("delete", "/freezes/{freeze_id}", "admin", "End an API-set freeze window now", None),
    ("get", "/audit", "auditor", "Audit events newest first: filters actor, action, service, "
     "rollout_id, outcome, source, since, until; limit; cursor", None),
    ("get", "/audit/export", "auditor", "Stream matching audit events oldest first "
     "(format=csv|ndjson, same filters)", None),
    ("get", "/audit/verify", "auditor", "Verify the audit hash chain (optional since_id)", None),
    ("post", "/webhooks/pagerduty", "none: a valid X-PagerDuty-Signature (HMAC-SHA256)",
     "PagerDuty webhook v3: a qualifying incident rolls back the mapped service", None),
]  # fmt: skip

_PROBLEM = {"description": "Problem", "content": {"application/problem+json": {"schema": {
    "type": "object",
    "properties": {"type": {"type": "string"}, "title": {"type": "string"},
                   "status": {"type": "integer"}, "detail": {"type": "string"}},
}}}}  # fmt: skip


@cache
def openapi_document(prefix: str) -> dict[str, Any]:
    """The API description served at `{prefix}/openapi.json`."""
    paths: dict[str, dict[str, Any]] = {}
    for method, path, role, summary, body in OPERATIONS:
        operation: dict[str, Any] = {
            "summary": summary,
            "description": f"Role: {role}.",
            "security": [{"bearer": []}],
            "responses": {
                "200": {"description": "OK", "content": {"application/json": {}}},
                **{code: _PROBLEM for code in ("400", "401", "403", "404", "409", "422")},
            },
        }
        for name in ("service", "rollout_id", "freeze_id"):
            if "{" + name + "}" in path:
                operation["parameters"] = [
                    {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                ]
        if path.startswith("/webhooks/"):
            # Authenticated by the sender's signature, not a bearer token; no Idempotency-Key
            # (replays are recognised by event id).
            operation["security"] = []
            operation["parameters"] = [
                {"name": "X-PagerDuty-Signature", "in": "header", "required": True,
                 "schema": {"type": "string"}}
            ]  # fmt: skip
        elif method != "get":
            operation["parameters"] = [
                *operation.get("parameters", []),
                {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"}},
            ]
        if body is not None:
            schema = body.model_json_schema(by_alias=True)
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": schema}},
            }
        paths.setdefault(prefix + path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "opsapi", "version": __version__},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
