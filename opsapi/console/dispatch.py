"""The console's calls into the API: the same routes, pipeline, roles and audit as any client.

A console page or action builds an ASGI request for an API route and runs it through the
application itself, in process. The request carries the signed-in user's bearer token, the
console request's client address and `X-Forwarded-For` (so the allowlist and trusted proxies
judge it as they would the browser), and an `X-Request-Id`: the API authenticates it, checks the
role, audits it with the user as actor, and answers as it answers everyone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import Message, Scope

log = logging.getLogger("opsapi.console")

# Request headers of the browser's request that the API call keeps (who is calling, from where).
_FORWARDED = (b"x-forwarded-for", b"user-agent", b"host")
_QUEUE_SIZE = 16


@dataclass(frozen=True)
class Answer:
    """An API answer, read whole."""

    status: int
    headers: Headers
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        """The body as JSON (None when it is not JSON)."""
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def detail(self) -> str:
        """What a refusal says (problem+json `detail`), or a generic line."""
        document = self.json()
        if isinstance(document, dict) and isinstance(document.get("detail"), str):
            return str(document["detail"])
        return f"the API answered {self.status}"


@dataclass
class Stream:
    """An API answer whose body is read as it comes (an export)."""

    status: int
    headers: Headers
    body: AsyncIterator[bytes]


class Api:
    """Calls API routes in process on behalf of the console's signed-in user."""

    def __init__(self, request: Request, prefix: str, token: str | None, request_id: str) -> None:
        self._request = request
        self._prefix = prefix
        self._token = token
        self.request_id = request_id

    async def get(self, path: str, params: dict[str, Any] | None = None) -> Answer:
        """GET `path` (under the API prefix) with query `params` (None values left out)."""
        return await self._read(await self._open("GET", path, params, None, None))

    async def post(
        self, path: str, body: dict[str, Any], *, idempotency_key: str | None = None
    ) -> Answer:
        """POST a JSON `body` to `path` (with an Idempotency-Key when given)."""
        raw = json.dumps(body).encode()
        return await self._read(await self._open("POST", path, None, raw, idempotency_key))

    async def stream(self, path: str, params: dict[str, Any] | None = None) -> Stream:
        """GET `path`, its body handed on as it is produced."""
        return await self._open("GET", path, params, None, None)

    async def _read(self, stream: Stream) -> Answer:
        chunks = [chunk async for chunk in stream.body]
        return Answer(stream.status, stream.headers, b"".join(chunks))

    def _scope(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None,
        body: bytes | None,
        idempotency_key: str | None,
    ) -> Scope:
        original = self._request.scope
        headers = [(name, value) for name, value in original["headers"] if name in _FORWARDED]
        headers.append((b"x-request-id", self.request_id.encode()))
        headers.append((b"accept", b"application/json"))
        if self._token is not None:
            headers.append((b"authorization", b"Bearer " + self._token.encode()))
        if body is not None:
            headers.append((b"content-type", b"application/json"))
            headers.append((b"content-length", str(len(body)).encode()))
        if idempotency_key is not None:
            headers.append((b"idempotency-key", idempotency_key.encode()))
        query = {k: str(v) for k, v in (params or {}).items() if v is not None and v != ""}
        full_path = self._prefix + path
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": original.get("http_version", "1.1"),
            "method": method,
            "scheme": original.get("scheme", "http"),
            "server": original.get("server"),
            "client": original.get("client"),
            "root_path": "",
            "path": full_path,
            "raw_path": full_path.encode(),
            "query_string": urlencode(query).encode(),
            "headers": headers,
            "state": dict(original.get("state", {})),
            "extensions": {},
        }

    async def _open(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None,
        body: bytes | None,
        idempotency_key: str | None,
    ) -> Stream:
        scope = self._scope(method, path, params, body, idempotency_key)
        queue: asyncio.Queue[Message | None] = asyncio.Queue(maxsize=_QUEUE_SIZE)
        finished = asyncio.Event()
        sent_body = False

        async def receive() -> Message:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body or b"", "more_body": False}
            # Nobody disconnects: the call lasts until the API has answered.
            await finished.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            await queue.put(message)

        async def run() -> None:
            try:
                await self._request.app(scope, receive, send)
            finally:
                finished.set()
                await queue.put(None)

        task = asyncio.create_task(run(), name=f"console {method} {path}")
        start = await queue.get()
        if start is None or start["type"] != "http.response.start":
            await _settle(task)
            raise RuntimeError(f"the API sent no answer to {method} {path}")
        return Stream(
            status=int(start["status"]),
            headers=Headers(raw=list(start.get("headers", []))),
            body=_body(queue, task),
        )


async def _body(
    queue: asyncio.Queue[Message | None], task: asyncio.Task[None]
) -> AsyncIterator[bytes]:
    complete = False
    try:
        while True:
            message = await queue.get()
            if message is None:
                break
            if message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    break
        complete = True
    finally:
        if not complete and not task.done():
            # The reader went away (a download cancelled): stop the API's work too.
            task.cancel()
        await _settle(task)


async def _settle(task: asyncio.Task[None]) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        try:
            await task
        except Exception:
            log.exception("an in-process API call failed")
