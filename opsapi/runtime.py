"""The one builder of a process's runtime, shared by `opsapi serve` and `opsapi controller`.

`build_runtime` opens the database (migrating it if the settings say so), builds the metrics,
audit writer, routers, gate provider, controller and PagerDuty delivery worker, starts the
background loops the settings enable, and on exit stops and closes all of it in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from datetime import timedelta

from opsapi.audit import service as audit
from opsapi.audit.limiter import RefusalLimiter
from opsapi.audit.models import Outcome, Source
from opsapi.audit.writer import AuditWriter
from opsapi.auth.cache import CachedVerifier
from opsapi.auth.identity import AuthError, Identity
from opsapi.auth.tokens import JwksVerifier, LocalSigner, TokenVerifier
from opsapi.canary.dataplane import Listener, PollAudit, WeightCache
from opsapi.canary.effects import Effects
from opsapi.canary.freezes import load_freezes
from opsapi.canary.policy import default_policy
from opsapi.clock import Clock
from opsapi.config import Settings
from opsapi.controller.loop import Controller
from opsapi.gates.prometheus import PrometheusProvider
from opsapi.gates.provider import GateProvider, NoProvider
from opsapi.http.runtime import Runtime
from opsapi.metrics import Metrics
from opsapi.pagerduty.worker import DeliveryWorker
from opsapi.routers.instances import load_routers
from opsapi.routers.traffic import Traffic
from opsapi.storage.db import DatabaseHealth, create_engine, session_factory
from opsapi.storage.migrate import upgrade

log = logging.getLogger("opsapi")


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


async def migrate(settings: Settings) -> None:
    """Bring the database to the latest schema (what `opsapi migrate` does)."""
    # No statement or lock timeout here: a replica waits for another's migration (advisory
    # lock) and an index build may take long; connecting is still bounded.
    unbounded = dataclasses.replace(
        settings.database_limits(),
        statement_timeout=0,
        lock_timeout=0,
        idle_in_transaction_timeout=0,
        pool_size=1,
        max_overflow=0,
    )
    engine = create_engine(settings.database_url, limits=unbounded)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()


@contextlib.asynccontextmanager
async def build_runtime(
    settings: Settings,
    *,
    clock: Clock,
    verifier: TokenVerifier | None = None,
    gate_provider: GateProvider | None = None,
    serve_api: bool = True,
) -> AsyncIterator[Runtime]:
    """Everything a process runs, started per `settings`; closed in order on exit.

    The controller loop runs when `OPSAPI_CONTROLLER_ENABLED` (or when `serve_api` is false:
    that process exists to run it), the delivery worker when `OPSAPI_PAGERDUTY_WORKER_ENABLED`.
    A `gate_provider` passed in is the caller's to close; one built here is closed here.
    """
    if settings.migrate_on_start:
        await migrate(settings)
    health = DatabaseHealth()
    engine = create_engine(settings.database_url, limits=settings.database_limits(), health=health)
    own_provider = gate_provider is None
    provider = gate_provider or build_provider(settings)
    tasks: list[asyncio.Task[None]] = []
    listeners: list[Listener] = []
    stop = asyncio.Event()
    worker: DeliveryWorker | None = None
    audit_writer: AuditWriter | None = None
    weights: WeightCache | None = None
    try:
        sessions = session_factory(engine)
        metrics = Metrics()
        traffic = Traffic(
            engine, sessions, load_routers(settings.routers_file), clock, metrics,
            confirm_within=timedelta(seconds=settings.rollback_confirm_seconds),
        )  # fmt: skip
        policy = default_policy(with_gates=bool(settings.prometheus_url))
        weights = WeightCache()
        effects = Effects(
            traffic=traffic,
            metrics=metrics,
            default_policy=policy,
            freezes=load_freezes(settings.freezes_file),
            weights=weights,
        )
        controller = Controller(
            sessions,
            clock,
            metrics,
            provider=provider,
            traffic=traffic,
            effects=effects,
            batch_size=settings.controller_batch_size,
            poll_seconds=settings.controller_poll_seconds,
            idempotency_ttl=timedelta(hours=settings.idempotency_ttl_hours),
        )
        # Delivers the PagerDuty outbox (alerts are enqueued with the changes causing them).
        worker = DeliveryWorker.from_settings(settings, sessions, clock, metrics)
        audit_writer = AuditWriter(
            engine,
            clock=clock,
            metrics=metrics,
            refusals=RefusalLimiter(per_minute=settings.audit_refusals_per_minute),
        )
        runtime = Runtime(
            settings=settings,
            engine=engine,
            sessions=sessions,
            verifier=CachedVerifier(verifier or _verifier_for(settings, serve_api)),
            clock=clock,
            metrics=metrics,
            audit_writer=audit_writer,
            default_policy=policy,
            traffic=traffic,
            effects=effects,
            provider=provider,
            controller=controller,
            delivery=worker,
            database_health=health,
            stop=stop,
            weights=weights,
            polls=PollAudit(),
            repeats=PollAudit(),
        )
        audit_writer.start()
        if serve_api:
            # Keeps every replica's weight answers fresh (SQLite: one process, invalidated
            # by the interpreter itself).
            if engine.dialect.name == "postgresql":
                listener = Listener(engine, weights)
                listener.start()
                listeners.append(listener)
            else:
                weights.listening = True
            tasks.append(asyncio.create_task(_flush_polls(runtime, stop), name="poll-audit"))
        if settings.controller_enabled or not serve_api:
            tasks.append(asyncio.create_task(controller.run(stop), name="controller"))
        if settings.pagerduty_worker_enabled:
            tasks.append(asyncio.create_task(worker.run(stop), name="pagerduty-delivery"))
        yield runtime
    finally:
        stop.set()
        await _finish(tasks, settings.shutdown_timeout_seconds)
        if weights is not None:
            # A client's fetch recorded as the pull router's applied weight lands before exit.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(weights.settle(), settings.shutdown_timeout_seconds)
        for listener in listeners:
            await listener.stop()
        if worker is not None:
            worker.close()
        if audit_writer is not None:
            await audit_writer.stop()
        await engine.dispose()
        if own_provider and isinstance(provider, PrometheusProvider):
            await provider.aclose()


async def _flush_polls(runtime: Runtime, stop: asyncio.Event) -> None:
    """Write each minute's aggregated poll events once the minute is over (and all at exit)."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=5)
        await flush_polls(runtime, final=stop.is_set())


async def flush_polls(runtime: Runtime, *, final: bool) -> int:
    """Audit the counted polls and repeated reads of the minutes that are over (all of them
    when `final`)."""
    until = None if final else runtime.clock()
    written = 0
    for action, counted in (("canary.weight.polls", runtime.polls),
                            ("canary.get.repeats", runtime.repeats)):  # fmt: skip
        for fields in counted.drain(until):
            row = audit.event_row(source=Source.API, action=action, outcome=Outcome.SUCCESS,
                                  **fields)  # fmt: skip
            try:
                await runtime.audit_writer.write(row)
                written += 1
            except Exception:
                log.exception("could not write an aggregated read event")
    return written


def _verifier_for(settings: Settings, serve_api: bool) -> TokenVerifier:
    # A controller-only process verifies no tokens: it must not create a signing key.
    return build_verifier(settings) if serve_api else _NoTokens()


class _NoTokens:
    async def verify(self, token: str) -> Identity:
        raise AuthError("this process serves no API")


async def _finish(tasks: list[asyncio.Task[None]], grace: float) -> None:
    """Let the loops end their pass; past `grace` seconds, cancel them (their leases expire)."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=grace)
    for task in pending:
        log.warning("%s did not stop within %.0f s; cancelled", task.get_name(), grace)
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=grace)
