"""The served OpenAPI document is a valid, machine-checkable contract (issue "Hardening" 20).

Every `$ref` resolves, parameters and path patterns are declared with the ranges the server
accepts, durations are described as they are written, and every answer has a schema.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from openapi_spec_validator import validate

from opsapi.durations import parse_duration
from tests.support.app import API, Harness

ROLLOUT_ANSWERS = [
    ("post", "/canary/promote"),
    ("post", "/canary/rollback"),
    ("post", "/canary/revert"),
    ("post", "/canary/pause"),
    ("post", "/canary/resume"),
    ("get", "/canary/{service}"),
]
BODY_ROUTES = [
    ("post", "/canary/promote"),
    ("post", "/canary/rollback"),
    ("post", "/canary/revert"),
    ("post", "/canary/pause"),
    ("post", "/canary/resume"),
    ("post", "/execute"),
    ("put", "/services/{service}"),
    ("post", "/webhooks/pagerduty"),
]


@pytest.fixture
async def document(api: Harness) -> dict[str, Any]:
    response = await api.client.get(API + "/openapi.json")
    assert response.status_code == 200
    return dict(response.json())


def resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def walk(node: Any) -> list[dict[str, Any]]:
    """Every JSON object in `node`, at any depth."""
    found: list[dict[str, Any]] = []
    pending = [node]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            found.append(value)
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return found


def schema_of(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    return dict(resolve(document, schema["$ref"])) if "$ref" in schema else schema


def operation(document: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    return dict(document["paths"][API + path][method])


async def test_the_document_validates_and_every_ref_resolves(document: dict[str, Any]) -> None:
    validate(document)  # raises on an invalid OpenAPI 3.1 document
    refs = {node["$ref"] for node in walk(document) if "$ref" in node}
    assert "#/components/schemas/Policy" in refs
    for ref in refs:
        resolve(document, ref)  # raises KeyError on a dangling reference
    assert "$defs" not in json.dumps(document)


async def test_durations_are_described_as_they_are_written(document: dict[str, Any]) -> None:
    # no ISO 8601 `format: duration`, no ISO default such as "PT0S"
    assert not [node for node in walk(document) if node.get("format") == "duration"]
    assert '"PT' not in json.dumps(document)
    policy = document["components"]["schemas"]["Policy"]
    wait = schema_of(document, policy["properties"]["steps"]["items"])["properties"]["wait"]
    pattern = re.compile(wait["pattern"])
    for written in ("30s", "15m", "2h", "1h30m", "500ms", "1.5h"):
        assert pattern.fullmatch(written), written
        parse_duration(written)
    for iso in ("PT30S", "P1D", "30", "thirty seconds"):
        assert not pattern.fullmatch(iso), iso
    assert policy["properties"]["interval"]["default"] == "1m"


async def test_parameters_and_path_patterns_are_declared(document: dict[str, Any]) -> None:
    def parameters(method: str, path: str) -> dict[str, dict[str, Any]]:
        return {p["name"]: p for p in operation(document, method, path).get("parameters", [])}

    service = parameters("get", "/canary/{service}")["service"]
    assert (service["in"], service["required"]) == ("path", True)
    assert service["schema"]["pattern"] == "^[a-z0-9][a-z0-9-]{0,62}$"
    rollout = parameters("get", "/rollouts/{rollout_id}/evaluations")["rollout_id"]
    assert rollout["schema"] == {"type": "integer", "minimum": 1, "maximum": 2**31 - 1}
    assert set(parameters("get", "/canary/{service}/history")) == {"service", "limit", "cursor"}
    assert set(parameters("get", "/rollouts/{rollout_id}/evaluations")) == {
        "rollout_id",
        "limit",
        "cursor",
        "gate",
    }
    audit = parameters("get", "/audit")
    assert set(audit) >= {"actor", "action", "service", "rollout_id", "outcome", "source",
                          "since", "until", "limit", "cursor"}  # fmt: skip
    assert audit["limit"]["schema"]["maximum"] == 1000
    export = parameters("get", "/audit/export")
    assert export["format"]["required"] is True
    assert set(parameters("get", "/audit/verify")) == {"since_id", "expect_head"}


async def test_every_answer_has_a_schema(document: dict[str, Any]) -> None:
    for path, operations in document["paths"].items():
        for method, described in operations.items():
            for status, response in described["responses"].items():
                if status == "304":  # Not Modified has no body
                    assert "content" not in response
                    continue
                content = response.get("content")
                assert content, (method, path, status)
                for media_type, body in content.items():
                    assert "schema" in body, (method, path, status, media_type)
                    if status >= "400":
                        assert media_type == "application/problem+json"
                        assert body["schema"] == {"$ref": "#/components/schemas/Problem"}
            assert "503" in described["responses"], (method, path)
            retry = described["responses"]["503"]["headers"]["Retry-After"]
            assert retry["required"] is True


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
async def test_body_routes_document_size_type_and_availability_problems(
    document: dict[str, Any], method: str, path: str
) -> None:
    described = operation(document, method, path)
    assert {"400", "413", "415", "422", "503"} <= set(described["responses"])
    body = described["requestBody"]["content"]["application/json"]["schema"]
    assert schema_of(document, body)["type"] == "object"


@pytest.mark.parametrize(("method", "path"), ROLLOUT_ANSWERS)
async def test_rollout_answers_are_the_rollout_view(
    document: dict[str, Any], method: str, path: str
) -> None:
    ok = operation(document, method, path)["responses"]["200"]["content"]["application/json"]
    view = schema_of(document, schema_of(document, ok["schema"]))
    assert view["title"] == "RolloutView"
    assert {"id", "service", "state", "canary_version", "stable_version", "step_index", "steps",
            "desired_weight", "applied_weight", "step_started_at", "ready", "ready_at",
            "triggered_by", "gates", "reason"} <= set(view["required"])  # fmt: skip


async def test_a_405_on_services_lists_get_and_put(api: Harness) -> None:
    response = await api.client.post(API + "/services/checkout", headers=api.auth("admin"))
    assert response.status_code == 405
    allowed = {method.strip() for method in response.headers["allow"].split(",")}
    assert {"GET", "PUT"} <= allowed


async def test_a_405_on_freezes_lists_get_and_post(api: Harness) -> None:
    response = await api.client.put(API + "/freezes", headers=api.auth("admin"))
    assert response.status_code == 405
    allowed = {method.strip() for method in response.headers["allow"].split(",")}
    assert {"GET", "POST"} <= allowed
