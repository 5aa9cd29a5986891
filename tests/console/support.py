"""Helpers for the console's tests: a browser-like client of the in-process app."""

from __future__ import annotations

import contextlib
import html
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx

from tests.support.app import API, Harness

CONSOLE = API + "/console"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
_KEY = re.compile(r'name="idempotency_key" value="([^"]+)"')


def csrf_of(page: str) -> str:
    """The CSRF token of the first form on a page."""
    match = _CSRF.search(page)
    assert match is not None, "no form with a CSRF token on the page"
    return html.unescape(match.group(1))


def key_of(page: str) -> str:
    """The Idempotency-Key of the first action form on a page."""
    match = _KEY.search(page)
    assert match is not None, "no action form on the page"
    return match.group(1)


class Browser:
    """A cookie-keeping client that sends what a browser sends on same-origin requests."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def get(self, path: str, **headers: str) -> httpx.Response:
        return await self.client.get(
            CONSOLE + path, headers={"Sec-Fetch-Site": "same-origin", **headers}
        )

    async def post(self, path: str, form: dict[str, Any], **headers: str) -> httpx.Response:
        return await self.client.post(
            CONSOLE + path,
            data={k: str(v) for k, v in form.items()},
            headers={"Sec-Fetch-Site": "same-origin", **headers},
        )

    async def sign_in(self, subject: str, role: str) -> httpx.Response:
        """Local sign-in (embedded mode, loopback client), as the form does it."""
        page = await self.get("/auth/signin")
        answer = await self.post(
            "/auth/signin/local",
            {"csrf": csrf_of(page.text), "subject": subject, "role": role, "next": CONSOLE + "/"},
        )
        assert answer.status_code == 303, answer.text
        return answer

    async def act(
        self, action: str, service: str, reason: str, page: str | None = None, **extra: Any
    ) -> httpx.Response:
        """Press an action's button on the service page (a fresh page unless given)."""
        if page is None:
            page = (await self.get(f"/services/{service}")).text
        form = {"csrf": csrf_of(page), "service": service, "reason": reason, **extra}
        return await self.post(f"/actions/{action}", form)


@contextlib.asynccontextmanager
async def browser(api: Harness, address: str = "127.0.0.1") -> AsyncIterator[Browser]:
    """A console client of the harness's app from `address` (loopback by default)."""
    transport = httpx.ASGITransport(app=api.app, client=(address, 41000))
    async with httpx.AsyncClient(transport=transport, base_url="http://opsapi") as client:
        yield Browser(client)
