"""Run the real application in-process against a real database (hand-moved or real clock)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from asgi_lifespan import LifespanManager
from sqlmodel import col, select
from starlette.applications import Starlette

from opsapi.audit.models import AuditEvent
from opsapi.auth.identity import Role
from opsapi.auth.tokens import LocalSigner
from opsapi.canary.models import RolloutRecord
from opsapi.clock import system_clock
from opsapi.config import Settings
from opsapi.http.app import create_app
from opsapi.http.runtime import Runtime
from tests.support.clock import ManualClock

API = "/internal/ops"


@dataclass
class Harness:
    app: Starlette
    client: httpx.AsyncClient
    clock: ManualClock  # only meaningful when the app was started with the manual clock
    signer: LocalSigner

    @property
    def runtime(self) -> Runtime:
        return self.app.state.runtime  # type: ignore[no-any-return]

    def token(self, role: Role | str, subject: str | None = None) -> str:
        role = Role(role)
        return self.signer.mint(subject=subject or f"{role.value}-user", roles=[role])

    def auth(self, role: Role | str, subject: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(role, subject)}"}

    async def post(
        self,
        path: str,
        body: Any,
        role: Role | str = Role.OPERATOR,
        subject: str | None = None,
        **headers: str,
    ) -> httpx.Response:
        auth = self.auth(role, subject)
        return await self.client.post(API + path, json=body, headers={**auth, **headers})

    async def get(self, path: str, role: Role | str = Role.VIEWER) -> httpx.Response:
        return await self.client.get(API + path, headers=self.auth(role))

    async def put(self, path: str, body: Any, role: Role | str = Role.ADMIN) -> httpx.Response:
        return await self.client.put(API + path, json=body, headers=self.auth(role))

    async def fetch_weight(self, service: str) -> dict[str, Any]:
        """Fetch the service's weight as a pull client does; the rollout once that fetch is
        recorded as applied (the weight endpoint records it in the background)."""
        weight = await self.get(f"/canary/{service}/weight")
        assert weight.status_code == 200, weight.text
        view: dict[str, Any] = {}
        for _ in range(300):
            view = (await self.get(f"/canary/{service}")).json()
            if view["applied_generation"] == view["generation"]:
                return view
            await asyncio.sleep(0.01)
        raise AssertionError(f"{service}: the fetch was not recorded as applied: {view}")

    async def tick(self) -> int:
        """One controller pass at the clock's current time."""
        return await self.app.state.controller.run_once()  # type: ignore[no-any-return]

    async def audit_events(self, **where: Any) -> list[AuditEvent]:
        async with self.runtime.sessions() as session:
            query = select(AuditEvent).order_by(col(AuditEvent.id))
            for name, value in where.items():
                query = query.where(getattr(AuditEvent, name) == value)
            return list((await session.exec(query)).all())

    async def rollouts(self, service: str) -> list[RolloutRecord]:
        async with self.runtime.sessions() as session:
            query = select(RolloutRecord).where(RolloutRecord.service == service)
            return list((await session.exec(query.order_by(col(RolloutRecord.id)))).all())


def settings_for(database_url: str, key_file: Path, **overrides: Any) -> Settings:
    fields: dict[str, Any] = {"controller_enabled": False, "env": "test", **overrides}
    return Settings(database_url=database_url, local_key_file=key_file, **fields)


@contextlib.asynccontextmanager
async def running_app(
    database_url: str,
    key_file: Path,
    *,
    clock: ManualClock | None = None,
    real_time: bool = False,
    **overrides: Any,
) -> AsyncIterator[Harness]:
    """The app; with `real_time` it runs on the system clock and its own controller loop."""
    clock = clock or ManualClock()
    if real_time:
        overrides = {"controller_enabled": True, "controller_poll_seconds": 0.2, **overrides}
    settings = settings_for(database_url, key_file, **overrides)
    app = create_app(settings, clock=system_clock if real_time else clock)
    # Startup migrates a fresh database: a busy machine (two test workers) can take longer
    # than the library's default 5 s; a real hang still fails.
    async with LifespanManager(app, startup_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app, client=("198.51.100.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://opsapi") as client:
            yield Harness(app, client, clock, LocalSigner.load_or_create(key_file))
