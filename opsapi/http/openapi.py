"""The OpenAPI 3.1 document, built from the same models the handlers validate and answer with.

It is a contract a machine can check (openapi-spec-validator, schemathesis): every `$ref`
resolves inside the document (pydantic's `$defs` become `components/schemas`), every parameter
is declared with the range the server accepts, durations are described as they are written
("30s", "15m"), and every answer — problems included — has a schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, JsonSchemaValue
from pydantic_core import core_schema

from opsapi import __version__
from opsapi.audit.models import Outcome, Source
from opsapi.canary.document import RolloutView
from opsapi.canary.freezes import FreezeSpec
from opsapi.canary.policy import GATE_NAME, SERVICE_NAME, Policy
from opsapi.canary.safety_views import LiftBody
from opsapi.canary.views import PauseBody, PromoteBody, RollbackBody, ServiceStatus
from opsapi.durations import format_duration
from opsapi.execute.views import ExecuteBody
from opsapi.http.params import INT32_MAX, INT64_MAX

REF = "#/components/schemas/{model}"
DURATION: dict[str, Any] = {
    "type": "string",
    "pattern": r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+$",
    "maxLength": 32,
    "description": 'A duration such as "30s", "15m", "2h" or "1h30m" (at most 30 days).',
    "examples": ["30s", "15m", "2h"],
}
_PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "RFC 9457 problem details; refusals may add fields (errors, reason_code, ...).",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
}
_WHY = {
    "400": "The request is malformed (JSON, a header)",
    "401": "No valid credentials",
    "403": "The caller's role or address may not do this",
    "404": "No such service, rollout or operation",
    "409": "The rollout's state refuses it (the problem says why)",
    "413": "The request body is too large",
    "415": "The request body is not JSON",
    "422": "A parameter or the body is invalid (the problem names it)",
    "503": "The database or the audit log cannot do the work now: nothing was done; retry "
    "after Retry-After seconds",
}
_READ_PROBLEMS: tuple[str, ...] = ("401", "403", "404", "422", "503")
_WRITE_PROBLEMS: tuple[str, ...] = ("400", "401", "403", "404", "409", "413", "415", "422", "503")
_WEBHOOK_PROBLEMS: tuple[str, ...] = ("400", "401", "403", "413", "415", "422", "503")

_SERVICE_PATH = {
    "name": "service",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": SERVICE_NAME.pattern},
}
_FREEZE_PATH = {
    "name": "freeze_id",
    "in": "path",
    "required": True,
    "schema": {"type": "integer", "minimum": 0, "maximum": 999_999_999},
}
_ROLLOUT_PATH = {
    "name": "rollout_id",
    "in": "path",
    "required": True,
    "schema": {"type": "integer", "minimum": 1, "maximum": INT32_MAX},
}


def _query(name: str, schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    parameter: dict[str, Any] = {"name": name, "in": "query", "schema": schema}
    if description:
        parameter["description"] = description
    return parameter


def _limit(high: int, default: int) -> dict[str, Any]:
    schema = {"type": "integer", "minimum": 1, "maximum": high, "default": default}
    return _query("limit", schema, "Items per page.")


def _text(max_length: int) -> dict[str, Any]:
    # What the one parameter parser accepts: 1..max characters, no control characters.
    return {"type": "string", "minLength": 1, "maxLength": max_length,
            "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"}  # fmt: skip


_AUDIT_FILTERS = [
    _query("actor", _text(255)),
    _query("action", _text(64)),
    _query("service", _text(63)),
    _query("rollout_id", {"type": "integer", "minimum": 0, "maximum": INT32_MAX}),
    _query("outcome", {"type": "string", "enum": [o.value for o in Outcome]}),
    _query("source", {"type": "string", "enum": [s.value for s in Source]}),
    _query("since", {"type": "string", "format": "date-time"}, "Inclusive (RFC 3339)."),
    _query("until", {"type": "string", "format": "date-time"}, "Exclusive (RFC 3339)."),
]
_CURSOR_TEXT = {"type": "string", "minLength": 1, "maxLength": 64}


def _object(required: list[str], properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": REF.format(model=name)}


_PAGE_CURSOR = _nullable({"type": "string"})
_ANSWERS: dict[str, dict[str, Any]] = {
    "Rollout": _ref("RolloutView"),
    "Rollouts": _object(["items"], {"items": {"type": "array", "items": _ref("RolloutView")}}),
    "History": _object(
        ["items", "next_cursor"],
        {"items": {"type": "array", "items": _ref("RolloutView")}, "next_cursor": _PAGE_CURSOR},
    ),
    "Weight": _object(
        ["service", "weight", "rollout_id"],
        {
            "generation": _nullable({"type": "integer"}),
            "service": {"type": "string"},
            "weight": {"type": "integer", "minimum": 0, "maximum": 100},
            "rollout_id": _nullable({"type": "integer"}),
            "state": {"type": "string"},
            "canary_version": {"type": "string"},
            "stable_version": _nullable({"type": "string"}),
            "canary_slot": {"type": "string"},
            "stable_slot": {"type": "string"},
            "weights": {"type": "object", "additionalProperties": {"type": "integer"}},
        },
    ),
    "Evaluations": _object(
        ["rollout_id", "items", "next_cursor"],
        {
            "rollout_id": {"type": "integer"},
            "items": {
                "type": "array",
                "items": _object(
                    ["id", "at", "gate", "phase"],
                    {
                        "id": {"type": "integer"},
                        "at": {"type": "string"},
                        "gate": {"type": "string"},
                        "step_index": {"type": "integer"},
                        "weight": {"type": "integer"},
                        "phase": {"type": "string"},
                        "value": _nullable({"type": "number"}),
                        "threshold": _nullable({"type": "number"}),
                        "breached": {"type": "boolean"},
                        "detail": _nullable({"type": "string"}),
                    },
                ),
            },
            "next_cursor": _PAGE_CURSOR,
        },
    ),
    "Services": _object(
        ["items", "next_cursor"],
        {
            "items": {
                "type": "array",
                "items": _object(["name"], {"name": {"type": "string"}}),
            },
            "next_cursor": _PAGE_CURSOR,
        },
    ),
    "Rejection": _object(
        ["version", "rollout_id", "reason", "rejected_at"],
        {
            "version": {"type": "string"},
            "rollout_id": _nullable({"type": "integer"}),
            "reason": _nullable({"type": "string"}),
            "rejected_at": _nullable({"type": "string"}),
            "lifted_at": _nullable({"type": "string"}),
            "lifted_by": _nullable({"type": "string"}),
            "lift_reason": _nullable({"type": "string"}),
        },
    ),
    "Rejections": _object(["items"], {"items": {"type": "array", "items": _ref("Rejection")}}),
    "FreezeWindow": _object(
        ["name", "source", "services", "reason", "active"],
        {
            "id": _nullable({"type": "integer"}),
            "name": {"type": "string"},
            "source": {"type": "string"},
            "services": {"type": "array", "items": {"type": "string"}},
            "reason": {"type": "string"},
            "starts_at": _nullable({"type": "string"}),
            "ends_at": _nullable({"type": "string"}),
            "cron": _nullable({"type": "string"}),
            "duration": _nullable({"type": "string"}),
            "timezone": {"type": "string"},
            "active": {"type": "boolean"},
            "active_until": _nullable({"type": "string"}),
            "next_start": _nullable({"type": "string"}),
        },
    ),
    "Freezes": _object(
        ["windows", "incidents"],
        {
            "windows": {"type": "array", "items": _ref("FreezeWindow")},
            "incidents": {"type": "array", "items": {"type": "object"}},
        },
    ),
    "FreezeDeleted": _object(
        ["id", "name", "deleted"],
        {"id": {"type": "integer"}, "name": {"type": "string"}, "deleted": {"type": "boolean"}},
    ),
    "Execution": _object(
        ["operation", "dry_run", "result"],
        {
            "operation": {"type": "string"},
            "dry_run": {"type": "boolean"},
            "changes": {"type": "boolean"},
            "result": {},
        },
    ),
    "ServicePolicy": {
        "allOf": [
            _ref("Policy"),
            _object(["status"], {"status": _ref("ServiceStatus")}),
        ]
    },
    "AuditPage": _object(
        ["items", "next_cursor"],
        {"items": {"type": "array", "items": _ref("AuditEvent")}, "next_cursor": _PAGE_CURSOR},
    ),
    "AuditEvent": _object(
        ["id", "at", "actor", "source", "action", "outcome", "hash"],
        {
            "id": {"type": "integer"},
            "at": {"type": "string"},
            "actor": {"type": "string"},
            "roles": {"type": "array", "items": {"type": "string"}},
            "source": {"type": "string"},
            "action": {"type": "string"},
            "service": _nullable({"type": "string"}),
            "rollout_id": _nullable({"type": "integer"}),
            "outcome": {"type": "string"},
            "request_id": _nullable({"type": "string"}),
            "client_address": _nullable({"type": "string"}),
            "details": {"type": "object"},
            "prev_hash": {"type": "string"},
            "hash": {"type": "string"},
        },
    ),
    "Verification": _object(
        ["intact", "head"],
        {"intact": {"type": "boolean"}, "head": _nullable({"type": "object"})},
    ),
    "WebhookAnswer": _object(
        ["event_id", "event_type", "outcome"],
        {
            "event_id": {"type": "string"},
            "event_type": {"type": "string"},
            "outcome": {"type": "string", "enum": ["rolled_back", "ignored"]},
            "reason": {"type": "string"},
            "services": {"type": "array", "items": {"type": "object"}},
        },
    ),
    "WebhookEvent": {
        "type": "object",
        "description": "A PagerDuty webhook v3 payload (authenticated by its signature).",
        "required": ["event"],
        "properties": {
            "event": _object(
                ["id", "event_type"],
                {
                    "id": {"type": "string", "pattern": "^[\\u0021-\\u007e]{1,128}$"},
                    "event_type": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"},
                    "data": {"description": "What the event is about (an incident)."},
                },
            ),
        },
    },
    "Problem": _PROBLEM_SCHEMA,
}


@dataclass(frozen=True)
class Operation:
    """One documented route: who may call it, what it reads and what it answers."""

    method: str
    path: str
    role: str
    summary: str
    answer: str  # a name in components/schemas; "export" for the CSV/NDJSON stream
    body: type[BaseModel] | str | None = None
    parameters: tuple[dict[str, Any], ...] = ()
    status: str = "200"  # the success status ("201" for a creation)


OPERATIONS: list[Operation] = [
    Operation("post", "/canary/promote", "operator (force, target_percent: admin)",
              "Start a rollout or advance it one step", "Rollout", PromoteBody),
    Operation("post", "/canary/rollback", "operator", "Roll back: 100 % to the stable slot now",
              "Rollout", RollbackBody),
    Operation("post", "/canary/revert", "operator", "After a success, make the previous "
              "version stable again (100 % to its slot)", "Rollout", RollbackBody),
    Operation("post", "/canary/pause", "operator", "Freeze the wait clock", "Rollout", PauseBody),
    Operation("post", "/canary/resume", "operator", "Unfreeze the wait clock", "Rollout",
              PauseBody),
    Operation("get", "/canary", "viewer", "Open rollouts", "Rollouts"),
    Operation("get", "/canary/{service}", "viewer", "The service's latest rollout", "Rollout",
              parameters=(_SERVICE_PATH,)),
    Operation("get", "/canary/{service}/history", "viewer",
              "The service's rollouts, newest first", "History",
              parameters=(_SERVICE_PATH, _limit(100, 20),
                          _query("cursor", {"type": "integer", "minimum": 1, "maximum": INT32_MAX},
                                 "next_cursor of the previous page."))),
    Operation("get", "/canary/{service}/weight", "viewer", "The canary percentage to apply now "
              "(the data plane; ETag, If-None-Match: 304, long poll with wait)", "Weight",
              parameters=(_SERVICE_PATH,
                          _query("wait", {**DURATION, "description": "Hold a 304 until the "
                                          "weight changes, at most 60s (with If-None-Match)."}),
                          {"name": "If-None-Match", "in": "header", "schema": {"type": "string"},
                           "description": "The ETag of the weight the client holds."})),
    Operation("get", "/rollouts/{rollout_id}/evaluations", "viewer",
              "Gate evaluations of a rollout, newest first", "Evaluations",
              parameters=(_ROLLOUT_PATH, _limit(1000, 100),
                          _query("cursor", {"type": "integer", "minimum": 1, "maximum": INT64_MAX},
                                 "next_cursor of the previous page."),
                          _query("gate", _text(63), f"Only this gate (names: {GATE_NAME})."))),
    Operation("post", "/execute", "per operation (health-check: viewer; gate-check, "
              "router-sync: operator; set-weight, pagerduty-test: admin)",
              "Run a named operation, or a dry run", "Execution", ExecuteBody),
    Operation("get", "/services", "viewer", "Every service: stable version and slot, latest "
              "rollout", "Services",
              parameters=(_limit(1000, 100),
                          _query("cursor", {"type": "string", "pattern": SERVICE_NAME.pattern},
                                 "next_cursor of the previous page (the last name)."))),
    Operation("get", "/services/{service}", "viewer", "The service's policy and status",
              "ServicePolicy", parameters=(_SERVICE_PATH,)),
    Operation("put", "/services/{service}", "admin", "Replace the service's policy (omitted "
              "fields take the server's defaults; status is ignored)", "ServicePolicy",
              "Policy", parameters=(_SERVICE_PATH,)),
    Operation("get", "/services/{service}/rejections", "viewer", "Versions rolled back by a "
              "breach or an incident (standing and lifted)", "Rejections",
              parameters=(_SERVICE_PATH,)),
    Operation("post", "/services/{service}/rejections/lift", "admin", "Lift a standing "
              "rejection, with a reason", "Rejection", LiftBody, parameters=(_SERVICE_PATH,)),
    Operation("get", "/freezes", "viewer", "Freeze windows (server and API) and open incidents",
              "Freezes"),
    Operation("post", "/freezes", "admin", "Add a freeze window (absolute, or cron + duration "
              "+ time zone)", "FreezeWindow", FreezeSpec, status="201"),
    Operation("delete", "/freezes/{freeze_id}", "admin", "End an API-set freeze window now",
              "FreezeDeleted", parameters=(_FREEZE_PATH,)),
    Operation("get", "/audit", "auditor", "Audit events newest first (keyset pages)",
              "AuditPage",
              parameters=(*_AUDIT_FILTERS, _limit(1000, 100),
                          _query("cursor", _CURSOR_TEXT, "next_cursor of the previous page "
                                 "(valid with the same filters)."))),
    Operation("get", "/audit/export", "auditor",
              "Stream matching audit events oldest first", "export",
              parameters=(_query("format", {"type": "string", "enum": ["csv", "ndjson"]}),
                          *_AUDIT_FILTERS)),
    Operation("get", "/audit/verify", "auditor", "Verify the audit hash chain", "Verification",
              parameters=(
                  _query("since_id", {"type": "integer", "minimum": 1, "maximum": INT64_MAX}),
                  _query("expect_head", {"type": "string",
                                         "pattern": "^[1-9][0-9]{0,17}:[0-9a-fA-F]{64}$"},
                         "ID:HASH, the head of an earlier verification."))),
    Operation("post", "/webhooks/pagerduty", "none: a valid X-PagerDuty-Signature "
              "(HMAC-SHA256)", "PagerDuty webhook v3: a qualifying incident rolls back the "
              "mapped service", "WebhookAnswer", "WebhookEvent"),
]  # fmt: skip
# The export's `format` is required (there is no default format).
_REQUIRED_QUERY = {("/audit/export", "format")}


class _Schemas(GenerateJsonSchema):
    """Pydantic's schemas with durations as this API writes them, not ISO 8601."""

    def timedelta_schema(self, schema: core_schema.TimedeltaSchema) -> JsonSchemaValue:
        return dict(DURATION)

    def encode_default(self, dft: Any) -> Any:
        if isinstance(dft, timedelta):
            return format_duration(dft)
        return super().encode_default(dft)


def _model_schema(
    model: type[BaseModel], mode: JsonSchemaMode, components: dict[str, Any]
) -> dict[str, Any]:
    """`model`'s schema with its `$defs` lifted into `components` (refs point there)."""
    schema = model.model_json_schema(
        by_alias=True, ref_template=REF, schema_generator=_Schemas, mode=mode
    )
    components.update(schema.pop("$defs", {}))
    return schema


def _components() -> dict[str, Any]:
    components: dict[str, Any] = {}
    for model in (PromoteBody, RollbackBody, PauseBody, ExecuteBody, LiftBody, FreezeSpec):
        components[model.__name__] = _model_schema(model, "validation", components)
    policy = _model_schema(Policy, "validation", components)
    # A policy read can be edited and put back: `status` is accepted in a PUT and ignored.
    policy["properties"]["status"] = {"description": "Read-only; ignored in a PUT."}
    components["Policy"] = policy
    components["RolloutView"] = _model_schema(RolloutView, "serialization", components)
    components["ServiceStatus"] = _model_schema(ServiceStatus, "serialization", components)
    components.update(_ANSWERS)
    return components


def _responses(operation: Operation) -> dict[str, Any]:
    if operation.answer == "export":
        ok = {
            "description": "The events as CSV or NDJSON (`format`)",
            "content": {
                "text/csv": {"schema": {"type": "string"}},
                "application/x-ndjson": {"schema": {"type": "string"}},
            },
        }
    else:
        ok = {
            "description": "OK",
            "content": {"application/json": {"schema": _ref(operation.answer)}},
        }
    responses: dict[str, Any] = {operation.status: ok}
    if operation.path.endswith("/weight"):
        responses["304"] = {"description": "Not modified: the ETag in If-None-Match is current"}
    problems = _READ_PROBLEMS if operation.method == "get" else _WRITE_PROBLEMS
    if operation.path.startswith("/webhooks/"):
        problems = _WEBHOOK_PROBLEMS
    for status in problems:
        responses[status] = {
            "description": _WHY[status],
            "content": {"application/problem+json": {"schema": _ref("Problem")}},
        }
    responses["503"]["headers"] = {
        "Retry-After": {"required": True, "schema": {"type": "integer", "minimum": 1},
                        "description": "Seconds to wait before sending the request again."}
    }  # fmt: skip
    responses["401"]["headers"] = {
        "WWW-Authenticate": {"required": True, "schema": {"type": "string"}}
    }
    return responses


@cache
def openapi_document(prefix: str) -> dict[str, Any]:
    """The API description served at `{prefix}/openapi.json`."""
    paths: dict[str, dict[str, Any]] = {}
    for operation in OPERATIONS:
        document: dict[str, Any] = {
            "summary": operation.summary,
            "description": f"Role: {operation.role}.",
            "operationId": f"{operation.method}{operation.path}".replace("/", "_")
            .replace("{", "")
            .replace("}", ""),
            "security": [{"bearer": []}],
            "responses": _responses(operation),
        }
        parameters = [
            {**p, "required": True} if (operation.path, p["name"]) in _REQUIRED_QUERY else p
            for p in operation.parameters
        ]
        if operation.path.startswith("/webhooks/"):
            # Authenticated by the sender's signature, not a bearer token; no Idempotency-Key
            # (replays are recognised by event id).
            document["security"] = []
            parameters.append(
                {"name": "X-PagerDuty-Signature", "in": "header", "required": True,
                 "schema": {"type": "string"}}
            )  # fmt: skip
        elif operation.method != "get":
            parameters.append(
                {"name": "Idempotency-Key", "in": "header",
                 "description": "A replay with the same key answers the first answer.",
                 "schema": {"type": "string", "pattern": "^[\\u0021-\\u007e]{1,255}$"}}
            )  # fmt: skip
        if parameters:
            document["parameters"] = parameters
        if operation.body is not None:
            name = operation.body if isinstance(operation.body, str) else operation.body.__name__
            document["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": _ref(name)}},
            }
        paths.setdefault(prefix + operation.path, {})[operation.method] = document
    return {
        "openapi": "3.1.0",
        "info": {"title": "opsapi", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": _components(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
