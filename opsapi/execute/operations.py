"""Named operations for `POST /internal/ops/execute`: each declares its role, its typed
parameters and whether it changes anything; `dry_run` says what would happen instead.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import text
from starlette.responses import JSONResponse

from opsapi.auth.identity import Role
from opsapi.canary import machine
from opsapi.canary import service as canary
from opsapi.canary.machine import Actor, GatePhase, Trigger
from opsapi.canary.models import RolloutRecord
from opsapi.canary.policy import SERVICE_NAME
from opsapi.canary.service import Refused
from opsapi.controller.loop import claim_of, judge_measured
from opsapi.errors import NotFound
from opsapi.gates.templates import render
from opsapi.http.endpoint import Call
from opsapi.pagerduty.events import Delivery, DeliveryError, EventsApi
from opsapi.pagerduty.models import OutboxKind
from opsapi.pagerduty.outbox import redact_key, routing_key_of
from opsapi.routers.base import RouterError


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NoParams(Params):
    pass


class ServiceParams(Params):
    service: str = Field(pattern=SERVICE_NAME.pattern)


class SetWeightParams(Params):
    service: str = Field(pattern=SERVICE_NAME.pattern)
    weight: int = Field(ge=0, le=100)
    reason: str = Field(min_length=1, max_length=2000)


Runner = Callable[[Call, Any, bool], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Operation:
    """One named operation: who may run it, what it takes, whether it changes anything."""

    name: str
    role: Role
    params: type[Params]
    changes: bool
    run: Runner
    summary: str


# health-check -----------------------------------------------------------------------------------


async def _timed(check: Awaitable[str]) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        detail = await asyncio.wait_for(check, timeout=5)
        status = "up"
    except Exception as error:  # every failure is reported, never raised: this is a health check
        detail = str(error) if isinstance(error, RouterError) else _describe(error)
        status = "down"
    return {"status": status, "detail": detail,
            "latency_ms": round((time.perf_counter() - started) * 1000, 1)}  # fmt: skip


def _describe(error: Exception) -> str:
    if isinstance(error, TimeoutError):
        return "no answer within 5s"
    return f"unavailable ({error.__class__.__name__})"


async def health_check(call: Call, params: NoParams, dry_run: bool) -> dict[str, Any]:
    """Database, Prometheus, every router instance, PagerDuty settings, JWKS: up or down."""
    runtime = call.runtime
    settings = runtime.settings

    async def database() -> str:
        async with runtime.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        return runtime.engine.dialect.name

    async def prometheus() -> str:
        if not settings.prometheus_url:
            return "not configured: gates have no data; the default policy has no gates"
        measurement = await call.request.app.state.controller.provider.measure("vector(1)")
        if measurement.value != 1:
            raise RuntimeError(measurement.error or "unexpected answer")
        return "answers queries"

    async def jwks() -> str:
        if not settings.jwks_url:
            return "embedded mode: locally signed tokens"
        async with httpx.AsyncClient(timeout=3) as client:
            response = await client.get(settings.jwks_url)
            response.raise_for_status()
            keys = response.json().get("keys", [])
        return f"{len(keys)} signing keys"

    async def pagerduty() -> str:
        secrets = [s for s in settings.pagerduty_webhook_secrets.split(",") if s.strip()]
        inbound = f"{len(secrets)} webhook secret(s)" if secrets else "inbound webhook disabled"
        return f"{inbound}; events API {settings.pagerduty_events_url}"

    components: dict[str, dict[str, Any]] = {
        "database": await _timed(database()),
        "prometheus": await _timed(prometheus()),
        "jwks": await _timed(jwks()),
        "pagerduty": await _timed(pagerduty()),
    }
    routers = runtime.traffic.routers
    results = await asyncio.gather(*(_timed(router.health()) for router in routers.values()))
    for name, result in zip(routers, results, strict=True):
        components[f"router:{name}"] = result
    down = sorted(name for name, component in components.items() if component["status"] != "up")
    return {"status": "ok" if not down else "degraded", "down": down, "components": components}


# gate-check -------------------------------------------------------------------------------------


async def _open_rollout(call: Call, service: str) -> RolloutRecord:
    record = await canary.open_rollout(service, session=call.session)
    if record is None:
        raise NotFound(f"{service} has no open rollout")
    call.service = service
    call.rollout_id = record.id
    return record


async def gate_check(call: Call, params: ServiceParams, dry_run: bool) -> dict[str, Any]:
    """Measure and judge the open rollout's gates now, as the controller would; store nothing,
    act on nothing."""
    record = await _open_rollout(call, params.service)
    claim = claim_of(record, 0.0)
    measured = await call.request.app.state.controller.measure(claim)
    statuses = judge_measured(measured, record)
    gates = [
        {"name": gate.name, "query": render(gate.query, claim.values), "phase": status.phase.value,
         "value": status.value, "threshold": gate.threshold, "op": gate.op,
         "would_breach": status.breached, "detail": status.detail}
        for gate, status in zip(claim.gates, statuses, strict=True)
    ]  # fmt: skip
    passing = all(gate["phase"] == GatePhase.PASS.value for gate in gates)
    return {"service": params.service, "rollout_id": record.id, "step_weight":
            record.desired_weight, "all_passing": passing, "gates": gates}  # fmt: skip


# router-sync ------------------------------------------------------------------------------------


async def router_sync(call: Call, params: ServiceParams, dry_run: bool) -> dict[str, Any]:
    """Re-apply the service's desired weight through its router now."""
    record = await canary.latest_rollout(params.service, session=call.session)
    if record is None:
        raise NotFound(f"{params.service} has no rollout")
    call.service = params.service
    call.rollout_id = record.id
    plan = {
        "service": params.service,
        "router": record.router.get("name"),
        "desired_weight": record.desired_weight,
        "applied_weight": record.applied_weight,
    }
    if dry_run:
        return {**plan, "would": f"apply {record.desired_weight}% through {plan['router']}"}
    assert record.id is not None
    rollout_id = record.id

    async def sync() -> None:
        await call.runtime.traffic.apply(
            rollout_id, params.service, reason="execute router-sync", force=True
        )

    call.after_commit.append(_then(call, sync, plan))
    return {**plan, "result": "applying"}


def _then(call: Call, work: Callable[[], Awaitable[None]], plan: dict[str, Any]) -> Any:
    """After the commit: do the router work, then answer with the rollout's router state."""

    async def hook() -> JSONResponse:
        await work()
        async with call.runtime.sessions() as session:
            record = await session.get(RolloutRecord, call.rollout_id)
        assert record is not None
        return JSONResponse({"operation": call.action.removeprefix("execute."), "dry_run": False,
                             "result": {**plan, "applied_weight": record.applied_weight,
                                        "router_error": record.router_error}})  # fmt: skip

    return hook


# set-weight -------------------------------------------------------------------------------------


async def set_weight(call: Call, params: SetWeightParams, dry_run: bool) -> dict[str, Any]:
    """Emergency override: pin the open rollout's canary percentage now, outside the ladder.

    The rollout pauses there so that nothing promotes it past the person's weight; its gates
    keep running and a breach still rolls it back. A machine event like any other.
    """
    call.service = params.service
    actor = Actor(Trigger.USER, call.identity.subject)
    event = machine.PinWeight(params.weight, params.reason, actor)
    decision, record = await call.effects.decide(
        params.service, event, now=call.now, session=call.session
    )
    call.rollout_id = record.id if record else None
    if isinstance(decision, machine.Refusal):
        raise Refused(decision, record)
    assert record is not None
    plan = {
        "service": params.service,
        "rollout_id": record.id,
        "state": record.state,
        "from_weight": record.desired_weight,
        "to_weight": params.weight,
        "pauses_rollout": record.state != machine.State.PAUSED,
    }
    if dry_run:
        return plan
    call.details.update(reason=params.reason, result=plan)
    applied = await call.effects.run(
        params.service, event, now=call.now, cause=call.cause(), session=call.session
    )

    async def answer() -> JSONResponse:
        await call.effects.finish(applied)
        result = {**plan, "applied_weight": applied.record.applied_weight,
                  "router_error": applied.record.router_error}  # fmt: skip
        return JSONResponse({"operation": "set-weight", "dry_run": False, "changes": True,
                             "result": result})  # fmt: skip

    call.after_commit.append(answer)
    return plan


# pagerduty-test ---------------------------------------------------------------------------------


async def pagerduty_test(call: Call, params: ServiceParams, dry_run: bool) -> dict[str, Any]:
    """Send a test trigger, then its resolve, with the service's routing key; report both."""
    call.service = params.service
    settings = call.runtime.settings
    routing_key = await routing_key_of(call.session, params.service)
    if routing_key is None:
        raise NotFound(f"{params.service}'s policy has no pagerduty.routing_key")
    test_key = f"opsapi-test-{uuid.uuid4().hex[:12]}"
    plan = {"service": params.service, "events_url": settings.pagerduty_events_url,
            "routing_key": redact_key(routing_key), "dedup_key": test_key}  # fmt: skip
    if dry_run:
        return {**plan, "would": "send a trigger, then resolve it"}
    api = EventsApi(settings.pagerduty_events_url, ca_file=settings.pagerduty_ca_file,
                    timeout_seconds=settings.pagerduty_timeout_seconds)  # fmt: skip
    steps: dict[str, str] = {}
    payload = {"summary": f"opsapi test alert for {params.service} (resolved at once)",
               "source": "opsapi", "severity": "info",
               "custom_details": {"requested_by": call.identity.subject}}  # fmt: skip
    for kind in (OutboxKind.TRIGGER, OutboxKind.RESOLVE):
        delivery = Delivery(kind.value, test_key, routing_key, payload)
        try:
            # The client blocks: never on the event loop, never longer than its timeout.
            await asyncio.wait_for(
                asyncio.to_thread(api.send, delivery), settings.pagerduty_timeout_seconds + 1
            )
            steps[kind.value] = "accepted"
        except (DeliveryError, TimeoutError) as error:
            steps[kind.value] = f"failed: {error or 'timed out'}"
            break
    ok = all(result == "accepted" for result in steps.values()) and len(steps) == 2
    return {**plan, "ok": ok, "steps": steps}


OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in (
        Operation("health-check", Role.VIEWER, NoParams, False, health_check,
                  "Database, Prometheus, routers, PagerDuty, JWKS: up or down"),
        Operation("gate-check", Role.OPERATOR, ServiceParams, False, gate_check,
                  "Evaluate the open rollout's gates now; act on nothing"),
        Operation("router-sync", Role.OPERATOR, ServiceParams, True, router_sync,
                  "Re-apply the service's desired weight through its router"),
        Operation("set-weight", Role.ADMIN, SetWeightParams, True, set_weight,
                  "Emergency override of the canary percentage (pauses an open rollout)"),
        Operation("pagerduty-test", Role.ADMIN, ServiceParams, False, pagerduty_test,
                  "Send a test trigger and its resolve with the service's routing key"),
    )
}  # fmt: skip
