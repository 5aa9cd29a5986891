"""The ASGI application: routes, lifespan (database, controller), health and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import timedelta

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from opsapi.audit import views as audit_views
from opsapi.audit.writer import AuditWriter
from opsapi.auth.cache import CachedVerifier
from opsapi.auth.tokens import JwksVerifier, LocalSigner, TokenVerifier
from opsapi.canary import service as canary_service
from opsapi.canary import views as canary_views
from opsapi.canary.policy import default_policy
from opsapi.clock import Clock, system_clock
from opsapi.config import Settings
from opsapi.controller.loop import Controller
from opsapi.errors import Problem
from opsapi.execute import views as execute_views
from opsapi.gates import views as gate_views
from opsapi.gates.prometheus import PrometheusProvider
from opsapi.gates.provider import GateProvider, NoProvider
from opsapi.http.endpoint import problem_response
from opsapi.http.openapi import openapi_document
from opsapi.http.runtime import Runtime
from opsapi.metrics import Metrics
from opsapi.pagerduty import outbox as pagerduty_outbox
from opsapi.pagerduty import webhook as pagerduty_webhook
from opsapi.pagerduty.worker import DeliveryWorker
from opsapi.routers.instances import load_routers
from opsapi.routers.traffic import Traffic
from opsapi.storage.db import create_engine, session_factory
from opsapi.storage.migrate import upgrade

log = logging.getLogger("opsapi")
API_PREFIX = "/internal/ops"


def build_verifier(settings: Settings) -> TokenVerifier:
    """A JWKS verifier when one is configured; otherwise the embedded local signer's."""
    if settings.jwks_url:
        assert settings.jwt_issuer
        assert settings.jwt_audience
        return JwksVerifier(
            jwks_url=settings.jwks_url,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            roles_claim=settings.roles_claim,
        )
    return LocalSigner.load_or_create(settings.signing_key_path).verifier()


def build_provider(settings: Settings) -> GateProvider:
    """Prometheus when configured; otherwise every gate query is no data."""
    if settings.prometheus_url:
        return PrometheusProvider(
            settings.prometheus_url, timeout_seconds=settings.prometheus_timeout_seconds
        )
    return NoProvider()


def create_app(
    settings: Settings | None = None,
    *,
    clock: Clock = system_clock,
    verifier: TokenVerifier | None = None,
    gate_provider: GateProvider | None = None,
) -> Starlette:
    """Build the application; the database and controller start with its lifespan."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine = create_engine(settings.database_url)
        if settings.migrate_on_start:
            await upgrade(engine)
        sessions = session_factory(engine)
        metrics = Metrics()
        traffic = Traffic(engine, sessions, load_routers(settings.routers_file), clock, metrics)
        runtime = Runtime(
            settings=settings,
            engine=engine,
            sessions=sessions,
            verifier=CachedVerifier(verifier or build_verifier(settings)),
            clock=clock,
            metrics=metrics,
            audit_writer=AuditWriter(engine),
            default_policy=default_policy(with_gates=bool(settings.prometheus_url)),
            traffic=traffic,
        )
        runtime.audit_writer.start()
        app.state.runtime = runtime
        provider = gate_provider or build_provider(settings)
        controller = Controller(
            runtime.sessions,
            clock,
            runtime.metrics,
            provider=provider,
            traffic=traffic,
            batch_size=settings.controller_batch_size,
            poll_seconds=settings.controller_poll_seconds,
            idempotency_ttl=timedelta(hours=settings.idempotency_ttl_hours),
        )
        app.state.controller = controller
        # Delivers the PagerDuty outbox (alerts are enqueued with the changes causing them).
        worker = DeliveryWorker.from_settings(settings, runtime.sessions, clock, runtime.metrics)
        app.state.pagerduty_worker = worker
        stop = asyncio.Event()
        task = asyncio.create_task(controller.run(stop)) if settings.controller_enabled else None
        delivery = (
            asyncio.create_task(worker.run(stop)) if settings.pagerduty_worker_enabled else None
        )
        try:
            yield
        finally:
            stop.set()
            if task is not None:
                await task
            if delivery is not None:
                await delivery
            worker.close()
            await pagerduty_webhook.drain()
            await runtime.audit_writer.stop()
            await engine.dispose()
            if isinstance(provider, PrometheusProvider):
                provider.close()

    api_routes = [
        *canary_views.routes,
        *gate_views.routes,
        *execute_views.routes,
        *audit_views.routes,
        Route("/openapi.json", openapi, methods=["GET"]),
        # Authenticated by PagerDuty's signature, not by a token (opsapi/pagerduty/webhook.py).
        Route(pagerduty_webhook.PATH, pagerduty_webhook.pagerduty_webhook, methods=["POST"]),
    ]
    return Starlette(
        routes=[
            Mount(API_PREFIX, routes=api_routes),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )


async def healthz(request: Request) -> Response:
    """Liveness: the process answers."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Readiness: the database answers."""
    runtime: Runtime = request.app.state.runtime
    try:
        async with runtime.engine.connect() as connection:
            await asyncio.wait_for(connection.execute(text("SELECT 1")), timeout=2)
    except Exception:
        return problem_response(_NotReady("the database is not reachable"))
    return JSONResponse({"status": "ready"})


async def metrics(request: Request) -> Response:
    """The product's own metrics in the Prometheus exposition format."""
    runtime: Runtime = request.app.state.runtime
    async with runtime.sessions() as session:
        open_rollouts = await canary_service.list_open(session=session)
        runtime.metrics.pagerduty_pending.set(await pagerduty_outbox.pending_count(session))
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
