"""The bare floor for `api_throughput.py`: Starlette and a raw asyncpg pool doing the same
durable work per request as opsapi, and nothing else.

Served exactly as `opsapi serve` serves (`opsapi.cli._run_server`: granian in process, the
same HTTP settings, uvloop), against a database migrated by opsapi (same tables, indexes and
triggers), so that only the application differs:

- `GET /internal/ops/canary/{service}`: the token found in a dict (a warm cache), the
  service's latest rollout row read, and one audit row appended to the hash chain (advisory
  lock, previous hash, insert: what `opsapi.audit.chain.append` does), committed before the
  answer leaves;
- `POST /internal/ops/canary/promote` and `/canary/rollback` (opsapi's bodies): the latest
  rollout row locked and updated (state, weight, generation) plus one chained audit row, in
  one transaction;
- `GET /internal/ops/canary/{service}/weight`: the floor of a cached data-plane answer (an
  in-memory copy loaded once, `ETag`, `If-None-Match` → 304, polls counted in memory).

    python benchmarks/floor_app.py --port 8123 --dsn postgresql://… --tokens tokens.json

`tokens.json` maps each bearer token to `{"subject": …, "roles": […]}`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

# The same lock key as opsapi's chain, so a reader of either schema sees one convention.
APPEND_LOCK = 724_113_002
GENESIS = "0" * 64
_SERVICE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_LATEST = "SELECT * FROM rollout WHERE service = $1 ORDER BY id DESC LIMIT 1"
_INSERT = (
    "INSERT INTO audit_event (at, actor, roles, source, action, service, rollout_id, outcome, "
    "request_id, client_address, details, prev_hash, hash) "
    "VALUES ($1, $2, $3::jsonb, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12, $13)"
)
_UPDATE = (
    "UPDATE rollout SET state = $2, canary_version = coalesce($3, canary_version), "
    "desired_weight = $4, applied_weight = $4, step_index = 0, generation = generation + 1, "
    "applied_generation = generation + 1, reason = $5, updated_at = $6, step_started_at = $6, "
    "finished_at = $7 WHERE id = $1 RETURNING *"
)


class Floor:
    """The app's state: the pool, the token table and the weight copies."""

    def __init__(self, dsn: str, tokens: dict[str, dict[str, Any]]) -> None:
        self.dsn = dsn
        self.tokens = tokens
        self.pool: asyncpg.Pool | None = None
        self.weights: dict[str, tuple[bytes, str]] = {}
        self.polls: Counter[tuple[str, str, str]] = Counter()

    def identity(self, request: Request) -> dict[str, Any] | None:
        """The caller's identity: the bearer token looked up in a dict."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        return self.tokens.get(token.strip())

    async def append(self, connection: asyncpg.Connection, event: dict[str, Any]) -> None:
        """One audit row at the end of the hash chain, in the connection's transaction."""
        await connection.execute("SELECT pg_advisory_xact_lock($1)", APPEND_LOCK)
        previous = await connection.fetchval(
            "SELECT hash FROM audit_event ORDER BY id DESC LIMIT 1"
        )
        previous = previous or GENESIS
        canonical = json.dumps(
            {**event, "at": event["at"].strftime("%Y-%m-%dT%H:%M:%S.%fZ")},
            sort_keys=True,
            separators=(",", ":"),
        )
        digest = hashlib.sha256(previous.encode() + b"\n" + canonical.encode()).hexdigest()
        await connection.execute(
            _INSERT, event["at"], event["actor"], json.dumps(event["roles"]), event["source"],
            event["action"], event["service"], event["rollout_id"], event["outcome"],
            event["request_id"], event["client_address"], json.dumps(event["details"]),
            previous, digest,
        )  # fmt: skip


def _event(
    request: Request, who: dict[str, Any], action: str, service: str, rollout_id: int | None,
    request_id: str, details: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    return {
        "at": datetime.now(UTC),
        "actor": who["subject"],
        "roles": sorted(who["roles"]),
        "source": "api",
        "action": action,
        "service": service,
        "rollout_id": rollout_id,
        "outcome": "success",
        "request_id": request_id,
        "client_address": request.client.host if request.client else None,
        "details": details,
    }


def _request_id(request: Request) -> str:
    supplied = request.headers.get("x-request-id", "")
    return supplied if _REQUEST_ID.fullmatch(supplied) else uuid.uuid4().hex


def _row(record: asyncpg.Record) -> dict[str, Any]:
    document = dict(record)
    for key, value in document.items():
        if isinstance(value, datetime):
            document[key] = value.isoformat()
        elif isinstance(value, str) and key in ("steps", "router", "gates", "gate_policy"):
            document[key] = json.loads(value)
    return document


def _problem(status: int, title: str, request_id: str) -> Response:
    return JSONResponse(
        {"status": status, "title": title}, status_code=status,
        media_type="application/problem+json", headers={"X-Request-Id": request_id},
    )  # fmt: skip


def build_app(floor: Floor) -> Starlette:
    """The floor's routes, under the same paths as opsapi's."""

    async def status_read(request: Request) -> Response:
        request_id = _request_id(request)
        who = floor.identity(request)
        if who is None:
            return _problem(401, "Unauthorized", request_id)
        service = request.path_params["service"]
        if not _SERVICE.fullmatch(service):
            return _problem(422, "Unprocessable Content", request_id)
        assert floor.pool is not None
        async with floor.pool.acquire() as connection, connection.transaction():
            record = await connection.fetchrow(_LATEST, service)
            if record is None:
                return _problem(404, "Not Found", request_id)
            await floor.append(connection, _event(
                request, who, "canary.get", service, record["id"], request_id, {"status": 200}
            ))  # fmt: skip
        return JSONResponse(_row(record), headers={"X-Request-Id": request_id})

    async def write(request: Request, action: str) -> Response:
        request_id = _request_id(request)
        who = floor.identity(request)
        if who is None:
            return _problem(401, "Unauthorized", request_id)
        if "operator" not in who["roles"] and "admin" not in who["roles"]:
            return _problem(403, "Forbidden", request_id)
        try:
            body = json.loads(await request.body())
            service = body["service"]
        except (ValueError, KeyError, TypeError):
            return _problem(400, "Bad Request", request_id)
        if not isinstance(service, str) or not _SERVICE.fullmatch(service):
            return _problem(422, "Unprocessable Content", request_id)
        now = datetime.now(UTC)
        rollback = action == "canary.rollback"
        assert floor.pool is not None
        async with floor.pool.acquire() as connection, connection.transaction():
            record = await connection.fetchrow(_LATEST + " FOR UPDATE", service)
            if record is None:
                return _problem(404, "Not Found", request_id)
            record = await connection.fetchrow(
                _UPDATE, record["id"], "rolled_back" if rollback else "progressing",
                body.get("version"), 0 if rollback else 10, body.get("reason"), now,
                now if rollback else None,
            )  # fmt: skip
            details = {"status": 200, **{k: v for k, v in body.items() if k != "service"}}
            await floor.append(
                connection, _event(request, who, action, service, record["id"], request_id, details)
            )
        return JSONResponse(_row(record), headers={"X-Request-Id": request_id})

    async def promote(request: Request) -> Response:
        return await write(request, "canary.promote")

    async def rollback(request: Request) -> Response:
        return await write(request, "canary.rollback")

    async def weight(request: Request) -> Response:
        request_id = _request_id(request)
        who = floor.identity(request)
        if who is None:
            return _problem(401, "Unauthorized", request_id)
        service = request.path_params["service"]
        if not _SERVICE.fullmatch(service):
            return _problem(422, "Unprocessable Content", request_id)
        cached = floor.weights.get(service)
        if cached is None:
            assert floor.pool is not None
            async with floor.pool.acquire() as connection:
                record = await connection.fetchrow(_LATEST, service)
            document = {"service": service, "weight": record["desired_weight"] if record else 0,
                        "generation": record["generation"] if record else None}  # fmt: skip
            body = json.dumps(document, separators=(",", ":"), sort_keys=True).encode()
            cached = (body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
            floor.weights[service] = cached
        body, etag = cached
        minute = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M")
        floor.polls[(who["subject"], service, minute)] += 1
        headers = {"ETag": etag, "Cache-Control": "no-cache", "X-Request-Id": request_id}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(body, media_type="application/json", headers=headers)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        # As many connections as opsapi's pool keeps (40); idle ones are let go soon so
        # that the floor holds few while opsapi takes its turn on the shared server.
        floor.pool = await asyncpg.create_pool(
            floor.dsn, min_size=0, max_size=40, max_inactive_connection_lifetime=20
        )
        try:
            yield
        finally:
            await floor.pool.close()

    prefix = "/internal/ops"
    return Starlette(
        routes=[
            Route(f"{prefix}/canary/promote", promote, methods=["POST"]),
            Route(f"{prefix}/canary/rollback", rollback, methods=["POST"]),
            Route(f"{prefix}/canary/{{service}}", status_read, methods=["GET"]),
            Route(f"{prefix}/canary/{{service}}/weight", weight, methods=["GET"]),
            Route("/readyz", lambda _request: Response(b"ok"), methods=["GET"]),
        ],
        lifespan=lifespan,
    )


def main() -> None:
    """Serve the floor app the way `opsapi serve` serves opsapi."""
    import logging
    import sys

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dsn", required=True, help="postgresql://… (plain asyncpg DSN)")
    parser.add_argument("--tokens", type=Path, required=True, help="JSON: token → identity")
    parser.add_argument(
        "--opsapi",
        type=Path,
        default=Path(__file__).resolve().parent.parent,
        help="the opsapi tree whose server settings to use (as measured)",
    )
    args = parser.parse_args()
    sys.path.insert(0, str(args.opsapi))
    from opsapi.cli import _run_server
    from opsapi.config import Settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app = build_app(Floor(args.dsn, json.loads(args.tokens.read_text())))
    # The settings only shape the HTTP server (limits, timeouts): their defaults, as opsapi's.
    _run_server(app, Settings(), args.host, args.port)


if __name__ == "__main__":
    main()
