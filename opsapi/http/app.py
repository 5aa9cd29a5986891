"""The ASGI application: routes, lifespan (database, controller), health and metrics."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from opsapi import heap
from opsapi.audit import views as audit_views
from opsapi.audit.verify import publish_head
from opsapi.auth.tokens import TokenVerifier
from opsapi.canary import effects as canary_effects
from opsapi.canary import safety_views, service_list
from opsapi.canary import service as canary_service
from opsapi.canary import views as canary_views
from opsapi.clock import Clock, system_clock
from opsapi.config import Settings
from opsapi.console import routes as console_routes
from opsapi.errors import Problem
from opsapi.execute import views as execute_views
from opsapi.gates import views as gate_views
from opsapi.gates.provider import GateProvider
from opsapi.http.endpoint import problem_response
from opsapi.http.openapi import openapi_document
from opsapi.http.runtime import Runtime
from opsapi.notifications import outbox as notifications_outbox
from opsapi.pagerduty import outbox as pagerduty_outbox
from opsapi.pagerduty import webhook as pagerduty_webhook
from opsapi.runtime import build_provider, build_runtime, build_verifier
from opsapi.storage.db import answers

log = logging.getLogger("opsapi")
__all__ = ["build_provider", "build_verifier", "create_app"]
API_PREFIX = "/internal/ops"
READY_TIMEOUT_SECONDS = 2.0


def create_app(
    settings: Settings | None = None,
    *,
    clock: Clock = system_clock,
    verifier: TokenVerifier | None = None,
    gate_provider: GateProvider | None = None,
    freeze_startup_objects: bool = False,
) -> Starlette:
    """Build the application; the database and controller start with its lifespan.

    `freeze_startup_objects` (a server process, not tests building many apps): once started,
    settle the garbage collector (`heap.settle`)."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with build_runtime(
            settings, clock=clock, verifier=verifier, gate_provider=gate_provider
        ) as runtime:
            app.state.runtime = runtime
            app.state.controller = runtime.controller
            app.state.pagerduty_worker = runtime.delivery
            if freeze_startup_objects:
                heap.settle()
            try:
                yield
            finally:
                # Router applies that outlived their answer's budget still need the database.
                await canary_effects.drain()

    api_routes = [
        *canary_views.routes,
        *safety_views.routes,
        *service_list.routes,
        *gate_views.routes,
        *execute_views.routes,
        *audit_views.routes,
        Route("/openapi.json", openapi, methods=["GET"]),
        # Authenticated by PagerDuty's signature, not by a token (opsapi/pagerduty/webhook.py).
        Route(pagerduty_webhook.PATH, pagerduty_webhook.pagerduty_webhook, methods=["POST"]),
    ]
    return Starlette(
        routes=[
            # The web console (HTML, session-authenticated): before the API's mount.
            *console_routes(API_PREFIX),
            Mount(API_PREFIX, routes=api_routes),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )


async def healthz(request: Request) -> Response:
    """Liveness: the process answers, and its controller loop (when it runs one) is not stuck."""
    runtime: Runtime = request.app.state.runtime
    stalled = runtime.controller.stalled_for()
    limit = runtime.settings.controller_stall_seconds
    if runtime.settings.controller_enabled and stalled is not None and stalled > limit:
        return problem_response(
            _NotReady(f"the controller loop has not completed a pass for {stalled:.0f}s")
        )
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Readiness: the database answers within 2 s and database work is not failing."""
    runtime: Runtime = request.app.state.runtime
    if runtime.database_health.failing():
        return problem_response(_NotReady("requests are failing on the database"))
    # Bounded end to end, pool checkout and connect included.
    if not await answers(runtime.engine, within=READY_TIMEOUT_SECONDS):
        runtime.database_health.failed()
        return problem_response(_NotReady("the database is not reachable"))
    return JSONResponse({"status": "ready"})


async def metrics(request: Request) -> Response:
    """The product's own metrics in the Prometheus exposition format."""
    runtime: Runtime = request.app.state.runtime
    try:
        async with runtime.sessions() as session:
            open_rollouts = await canary_service.list_open(session=session)
            pagerduty = await pagerduty_outbox.pending_count(session)
            notifications = await notifications_outbox.pending_count(session)
        await publish_head(runtime.engine, runtime.metrics)
    except Exception as error:
        # The process's own metrics still answer while the database does not: that is when
        # they matter. The gauges read from the database keep their last values.
        log.warning("metrics without the database (%s)", type(error).__name__)
    else:
        runtime.metrics.pagerduty_pending.set(pagerduty)
        runtime.metrics.notifications_pending.set(notifications)
        runtime.metrics.open_rollouts.set(len(open_rollouts))
        runtime.metrics.rollout_weight.clear()
        for record in open_rollouts:
            runtime.metrics.rollout_weight.labels(record.service).set(record.desired_weight)
    return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> Response:
    """The OpenAPI document of the API."""
    return JSONResponse(openapi_document(API_PREFIX))


class _NotReady(Problem):
    status = 503
    title = "Service Unavailable"


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    problem = Problem(exc.detail if isinstance(exc.detail, str) else "request refused")
    problem.status = exc.status_code
    problem.title = _TITLES.get(exc.status_code, "Error")
    return problem_response(problem, dict(exc.headers or {}))


async def server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return problem_response(Problem("an internal error occurred"))


_TITLES: dict[int, str] = {404: "Not Found", 405: "Method Not Allowed", 400: "Bad Request"}
