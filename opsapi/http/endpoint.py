"""The one path every API request takes: authenticate, authorise, parse, run, audit, answer.

Handlers are plain async functions of a `Call`; `endpoint()` wraps them so that every request
that reaches a handler, or is refused on the way, writes exactly one audit event, and the
state change and that event commit in one transaction.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import IntegrityError
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Scope

from opsapi.audit import chain
from opsapi.audit import service as audit
from opsapi.audit.models import Outcome, Source
from opsapi.auth.identity import AuthError, Identity, Role
from opsapi.canary.effects import Cause, Effects
from opsapi.canary.policy import is_service_name
from opsapi.canary.service import Refused
from opsapi.errors import (
    BadRequest,
    Forbidden,
    PayloadTooLarge,
    Problem,
    ServiceUnavailable,
    Unauthorized,
    Unprocessable,
    UnsupportedMediaType,
)
from opsapi.http.clients import client_address, is_allowed, networks
from opsapi.http.problems import refusal_problem
from opsapi.http.runtime import Runtime
from opsapi.storage import idempotency, rows
from opsapi.storage.db import is_unavailable, load_json
from opsapi.storage.idempotency import IdempotencyRecord

log = logging.getLogger("opsapi.http")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def header(request: Request, name: bytes) -> str | None:
    """The request's first `name` header (a lowercase name, as ASGI servers give them), as
    `request.headers.get` gives it, without building the headers or raising for a missing one
    (several lookups of every request)."""
    for key, value in request.scope["headers"]:
        if key == name:
            text: str = value.decode("latin-1")
            return text
    return None


def new_request_id() -> str:
    """A random version-4 UUID in hex, as `uuid.uuid4().hex` writes one."""
    # From the process's pseudo-random generator, not the OS's: a request id correlates, it
    # guards nothing, and `uuid4()` (a system call and a UUID object) cost 3.6 us a request.
    bits = random.getrandbits(128) & _UUID_CLEAR | _UUID_V4
    return f"{bits:032x}"


_UUID_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))  # the version nibble and the variant bits
_UUID_V4 = (0x4000 << 64) | (0x8000 << 48)
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
ANONYMOUS = "anonymous"
# A replay of a call whose router apply is still running waits this long for its final answer.
_REPLAY_WAITS = 150
_REPLAY_WAIT_SECONDS = 0.1
# JSON bodies nest no deeper than this (ours need 6); deeper is refused before it costs a
# recursion (1,000 levels exhaust Python's stack).
MAX_JSON_DEPTH = 32
# Text a body may not carry: NUL (PostgreSQL text cannot hold it) and lone UTF-16 surrogates
# (not encodable as UTF-8). Only a \u escape can produce either in valid UTF-8 JSON.
_ODD_TEXT = re.compile("[\x00\ud800-\udfff]")

BodyT = TypeVar("BodyT", bound=BaseModel)


@dataclass
class Call:
    """One request as a handler sees it; the handler fills in what the audit event says."""

    request: Request
    runtime: Runtime
    identity: Identity
    # The request's database session (`session`), opened when a handler first asks for it:
    # an answer from memory (the data plane) costs no session.
    open_session: Callable[[], AsyncSession]
    now: datetime
    request_id: str
    body: BaseModel | None
    client_address: str | None = None
    service: str | None = None
    rollout_id: int | None = None
    details: dict[str, Any] = field(default_factory=dict)
    action: str = ""
    # Work that must follow the commit (applying a weight through a router); each may
    # return a fresher response to answer with.
    after_commit: list[Callable[[], Awaitable[Response | None]]] = field(default_factory=list)
    # Set when the handler's transition wrote the request's audit event itself.
    audited: bool = False
    # The outcome of a request that succeeds without acting (a webhook event that does not act).
    outcome: Outcome | None = None
    # The request body's bytes as received (read before parsing).
    raw_body: bytes = b""
    # The pipeline's own write for this call's transaction (its Idempotency-Key record, as
    # answered after the commit), until a transition takes it (`take_writes`).
    own_writes: list[rows.Pending] = field(default_factory=list)
    _session: AsyncSession | None = None

    @property
    def session(self) -> AsyncSession:
        """The request's database session (opened on first use, closed by the pipeline)."""
        if self._session is None:
            self._session = self.open_session()
        return self._session

    async def close_session(self) -> None:
        """Close the session if one was opened (even when the request is being cancelled)."""
        if self._session is not None:
            await asyncio.shield(self._session.close())

    def body_as(self, model: type[BodyT]) -> BodyT:
        """The parsed body, typed."""
        assert isinstance(self.body, model)
        return self.body

    def require(self, role: Role, what: str) -> None:
        """Refuse (403) unless the caller holds `role`; `what` names the privileged part."""
        if not self.identity.has(role):
            raise Forbidden(f"{what} requires the {role.value} role")

    def cause(self, source: Source = Source.API) -> Cause:
        """This request as the cause of a transition: its audit event is the transition's."""
        self.audited = True
        return Cause(
            actor=self.identity.subject,
            source=source,
            roles=tuple(sorted(self.identity.roles)),
            request_id=self.request_id,
            client_address=self.client_address,
            action=self.action,
            details={"status": 200, **self.details},
            detected_at=self.now,
        )

    def pending(self) -> Response:
        """The placeholder a handler returns when an after-commit hook builds the answer."""
        return Response(status_code=200)

    def take_writes(self) -> list[rows.Pending]:
        """The pipeline's writes for a transition that answers through an after-commit hook
        (`pending`) to carry with its audit event (one round trip fewer); taken once."""
        writes, self.own_writes = self.own_writes, []
        return writes

    @property
    def effects(self) -> Effects:
        """The runtime's effect interpreter."""
        return self.runtime.effects


Handler = Callable[[Call], Awaitable[Response]]


def model_response(model: BaseModel) -> Response:
    """A JSON answer serialised by pydantic in one pass (no intermediate dict)."""
    return Response(model.model_dump_json(), media_type="application/json")


def document_response(document: dict[str, Any], model: type[BaseModel]) -> Response:
    """A JSON answer from `document`, which holds `model`'s fields as the JSON values its
    serialisation writes: written by orjson without building the model, or, for what orjson
    refuses (an integer past 64 bits, a lone surrogate), by the model as before."""
    try:
        body = orjson.dumps(document)
    except TypeError:  # orjson's refusal (JSONEncodeError is one)
        return model_response(model.model_validate(document))
    return Response(body, media_type="application/json")


def problem_response(problem: Problem, headers: dict[str, str] | None = None) -> JSONResponse:
    """An RFC 9457 problem+json response (with `Retry-After` when the problem has one)."""
    if problem.retry_after_seconds is not None:
        headers = {**(headers or {}), "Retry-After": str(problem.retry_after_seconds)}
    return JSONResponse(
        problem.body(),
        status_code=problem.status,
        media_type="application/problem+json",
        headers=headers,
    )


def _outcome_for(status: int) -> Outcome:
    if status < 400:
        return Outcome.SUCCESS
    if status in (401, 403):
        return Outcome.DENIED
    if status == 409:
        return Outcome.CONFLICT
    return Outcome.ERROR


# How a route authenticates its caller: a bearer token by default; a sender's signature over
# the raw body for webhooks (the authenticator may read the body through `read_body`).
Authenticator = Callable[["_Request"], Awaitable[Identity]]


@dataclass(frozen=True)
class _Spec:
    action: str
    role: Role | None
    body: type[BaseModel] | None
    mutating: bool
    authenticate: Authenticator | None
    source: Source
    unknown_actor: str
    challenge: str


def endpoint(
    *,
    action: str,
    role: Role | None,
    body: type[BaseModel] | None = None,
    mutating: bool = False,
    authenticate: Authenticator | None = None,
    source: Source = Source.API,
    unknown_actor: str = ANONYMOUS,
    challenge: str = 'Bearer realm="opsapi"',
) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    """Wrap a handler with authentication, authorisation, parsing, idempotency and audit.

    `role` None: being authenticated is enough (a webhook's signature). `source` and
    `unknown_actor` say how refusals of callers not yet identified are audited.
    """
    spec = _Spec(action, role, body, mutating, authenticate, source, unknown_actor, challenge)

    def wrap(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            runtime: Runtime = request.app.state.runtime
            return await _Request(runtime, request, spec).serve(handler)

        run.__name__ = handler.__name__
        run.__doc__ = handler.__doc__
        return run

    return wrap


class _Request:
    def __init__(self, runtime: Runtime, request: Request, spec: _Spec) -> None:
        self.runtime = runtime
        self.request = request
        self.spec = spec
        self.action = spec.action
        self.role = spec.role
        self.body_model = spec.body
        self.mutating = spec.mutating
        supplied = header(request, b"x-request-id") or ""
        self.request_id = supplied if _REQUEST_ID.fullmatch(supplied) else new_request_id()
        settings = runtime.settings
        self.client_address = client_address(
            request.client.host if request.client else None,
            header(request, b"x-forwarded-for"),
            networks(settings.trusted_proxies),
        )
        self.client_allowed = is_allowed(self.client_address, networks(settings.allowed_cidrs))
        self.identity: Identity | None = None
        self.raw_body: bytes | None = None
        self.service = _audit_service(request.path_params.get("service"))

    async def read_body(self) -> bytes:
        """The request body (read once, size-limited: 413 past the limit)."""
        if self.raw_body is None:
            self.raw_body = await read_limited(self.request, self.runtime.settings.max_body_bytes)
        return self.raw_body

    async def serve(self, handler: Handler) -> Response:
        started = time.perf_counter()
        now = self.runtime.clock()
        try:
            response = await self._serve(handler, now)
        except Exception as error:
            # Whatever escaped (a database lost mid-request, a bug) is still answered as a
            # problem, so the connection stays usable and no traceback reaches the client.
            response = await self._failed(error, now)
        response.headers["X-Request-Id"] = self.request_id
        self.runtime.metrics.served(
            self.action, self.request.method, response.status_code, time.perf_counter() - started
        )
        return response

    async def _serve(self, handler: Handler, now: datetime) -> Response:
        try:
            if not self.client_allowed:
                raise Forbidden("this client address is not allowed to call the API")
            authenticate = self.spec.authenticate or _bearer
            self.identity = await authenticate(self)
            if self.role is not None and not self.identity.has(self.role):
                raise Forbidden(
                    f"{self.action} requires the {self.role.value} role; "
                    f"this token grants: {', '.join(sorted(self.identity.roles)) or 'none'}"
                )
            raw, parsed = await self._parse_body()
        except Problem as problem:
            if problem.status in (401, 403) and self.service is None:
                await self._peek_service()
            return await self._refuse(problem, now, {})
        if not self.mutating:
            return await self._serve_read(handler, parsed, now)
        key = header(self.request, b"idempotency-key")
        if key is not None and not _IDEMPOTENCY_KEY.fullmatch(key):
            return await self._refuse(
                BadRequest("Idempotency-Key must be 1-255 visible ASCII characters"), now, {}
            )
        target = url_path(self.request.scope).encode()
        request_hash = hashlib.sha256(
            self.request.method.encode() + b" " + target + b"\n" + raw
        ).hexdigest()
        if key is not None:
            replay = await self._replay(key, request_hash, now)
            if replay is not None:
                return replay
        async with self.runtime.sessions() as session:
            call = self._call(lambda: session, parsed, now)
            if key is not None:
                # As a transition answering after its commit leaves it: completed below.
                values = self._record(key, request_hash, call.pending(), now, complete=False)
                call.own_writes.append(await idempotency.pending(session, **values))
            try:
                # The session begins by itself on first use (one trip through SQLAlchemy's
                # greenlet bridge fewer than an explicit begin); committed here, rolled back
                # before any refusal is recorded.
                async with rows.transaction(session):
                    response = await handler(call)
                    if not call.audited:
                        await audit.record(session=session, **self._audit_fields(call, response))
                    if key is not None and call.take_writes():
                        # Not taken by a transition: remembered as answered (completed below
                        # once the after-commit work, if any, built the final answer).
                        await self._remember(key, request_hash, response, now, session,
                                             complete=not call.after_commit)  # fmt: skip
            except Refused as refused:
                return await self._refuse(
                    refusal_problem(refused), now, call.details, key=key,
                    request_hash=request_hash, call=call,
                )  # fmt: skip
            except Problem as problem:
                return await self._refuse(
                    problem, now, call.details, key=key, request_hash=request_hash, call=call
                )
            except IntegrityError:
                if key is not None:
                    replay = await self._replay(key, request_hash, now)
                    if replay is not None:
                        return replay
                log.exception("integrity error in %s", self.action)
                return await self._refuse(_internal_error(), now, {}, call=call)
            except Exception as error:
                return await self._refuse(self._server_problem(error), now, {}, call=call)
            finally:
                # The hooks close over the call: out of it, the request's objects are freed
                # when it is answered, not left in a cycle for the garbage collector.
                hooks, call.after_commit = call.after_commit, []
        for hook in hooks:
            try:
                response = await hook() or response
            except Exception as error:
                # The change is committed; the reconcile pass finishes what failed here.
                _log_failure(error, f"after-commit work failed in {self.action}")
        if key is not None and hooks:
            await self._complete(key, response)
        return response

    async def _serve_read(
        self, handler: Handler, parsed: BaseModel | None, now: datetime
    ) -> Response:
        """A request that changes nothing: answer, but only once its audit event is durable."""
        # The session is closed before auditing: its read transaction must not hold a
        # connection (on SQLite, the database lock) while the audit writer waits for one.
        problem: Problem | None = None
        call = self._call(self.runtime.sessions, parsed, now)
        try:
            response = await handler(call)
        except Problem as refused:
            problem = refused
        except Exception as error:
            problem = self._server_problem(error)
        finally:
            await call.close_session()
        if problem is not None:
            details = call.details if problem.status < 500 else {}
            return await self._refuse(problem, now, details, call=call)
        if call.audited:
            return response  # counted into an aggregated event by the handler (the data plane)
        try:
            await self.runtime.audit_writer.write(
                audit.event_row(**self._audit_fields(call, response))
            )
        except Exception:
            return _audit_unavailable()
        return response

    def _server_problem(self, error: Exception) -> Problem:
        """The answer to an exception from a handler or the database: 503 when the database
        could not do the work (worth a retry), 500 otherwise; logged either way."""
        if is_unavailable(error):
            _log_failure(error, f"{self.action} failed")
            return _database_unavailable()
        log.exception("unhandled error in %s", self.action)
        return _internal_error()

    async def _failed(self, error: Exception, now: datetime) -> Response:
        """The answer to an exception that escaped the pipeline's own handling."""
        problem = self._server_problem(error)
        try:
            return await self._refuse(problem, now, {})
        except Exception:
            log.exception("could not audit the failure of %s", self.action)
            return problem_response(problem)

    def _call(
        self, open_session: Callable[[], AsyncSession], parsed: BaseModel | None, now: datetime
    ) -> Call:
        assert self.identity is not None
        return Call(
            request=self.request,
            runtime=self.runtime,
            identity=self.identity,
            open_session=open_session,
            now=now,
            request_id=self.request_id,
            body=parsed,
            client_address=self.client_address,
            service=self.service,
            action=self.action,
            raw_body=self.raw_body or b"",
        )

    async def _peek_service(self) -> None:
        """For the audit of a refused request: the service its body names, if any."""
        if self.body_model is None:
            return
        try:
            document = read_json(await self.read_body())
        except Problem:
            return
        if isinstance(document, dict):
            self.service = _audit_service(document.get("service"))

    async def _parse_body(self) -> tuple[bytes, BaseModel | None]:
        if self.body_model is None:
            return self.raw_body or b"", None
        raw = await self.read_body()
        # curl's default form content type is tolerated; the body must still be JSON.
        content_type = header(self.request, b"content-type") or ""
        if content_type.startswith("multipart/"):
            raise UnsupportedMediaType("the request body must be application/json")
        if not raw.strip():
            raise BadRequest("a JSON request body is required")
        document = read_json(raw)
        if isinstance(document, dict) and self.service is None:
            self.service = _audit_service(document.get("service"))
        try:
            return raw, self.body_model.model_validate(document)
        except ValidationError as error:
            raise Unprocessable(
                "the request body is invalid", errors=validation_errors(error)
            ) from None

    async def _replay(self, key: str, request_hash: str, now: datetime) -> Response | None:
        assert self.identity is not None
        stored = await self._stored(key)
        if stored is None:
            return None
        if stored.request_hash != request_hash:
            return await self._refuse(
                Unprocessable("this Idempotency-Key was already used for a different request"),
                now,
                {"idempotency_key": key},
            )
        row = audit.event_row(
            at=now,
            actor=self.identity.subject,
            roles=self.identity.roles,
            source=self.spec.source,
            action=self.action,
            outcome=_outcome_for(stored.status_code),
            service=self.service,
            request_id=self.request_id,
            client_address=self.client_address,
            details={"idempotent_replay": True, "status": stored.status_code},
        )
        try:
            await self.runtime.audit_writer.write(row)
        except Exception:
            return _audit_unavailable()
        content_type = "application/problem+json" if stored.status_code >= 400 else None
        return Response(
            stored.response_body,
            status_code=stored.status_code,
            media_type=content_type or "application/json",
            headers={"Idempotent-Replayed": "true"},
        )

    async def _stored(self, key: str) -> IdempotencyRecord | None:
        """The stored first answer; while the first call is still applying, wait for it."""
        assert self.identity is not None
        for _ in range(_REPLAY_WAITS):
            async with self.runtime.sessions() as session:
                stored = await idempotency.stored(session, self.identity.subject, key)
            if stored is None or stored.complete:
                return stored
            await asyncio.sleep(_REPLAY_WAIT_SECONDS)
        return stored

    async def _remember(
        self,
        key: str,
        request_hash: str,
        response: Response,
        now: datetime,
        session: AsyncSession,
        *,
        complete: bool = True,
    ) -> None:
        values = self._record(key, request_hash, response, now, complete=complete)
        await idempotency.remember(session, **values)

    def _record(
        self, key: str, request_hash: str, response: Response, now: datetime, *, complete: bool
    ) -> dict[str, Any]:
        """The Idempotency-Key record of this call answered `response`."""
        assert self.identity is not None
        return {
            "subject": self.identity.subject,
            "key": key,
            "method": self.request.method,
            "path": url_path(self.request.scope)[:512],
            "request_hash": request_hash,
            "status_code": response.status_code,
            "response_body": bytes(response.body).decode(),
            "created_at": now,
            "complete": complete,
        }

    async def _complete(self, key: str, response: Response) -> None:
        """Store the answer the first call got (built after the commit) for its replays."""
        assert self.identity is not None
        try:
            async with self.runtime.sessions() as session, rows.transaction(session):
                await idempotency.complete(
                    session, self.identity.subject, key, status_code=response.status_code,
                    response_body=bytes(response.body).decode(),
                )  # fmt: skip
        except Exception as error:
            # A replay then answers what was committed (without the router's result).
            _log_failure(error, "could not store the final answer for an Idempotency-Key")

    def _audit_fields(self, call: Call, response: Response) -> dict[str, Any]:
        return {
            "at": call.now,
            "actor": call.identity.subject,
            "roles": call.identity.roles,
            "source": self.spec.source,
            "action": call.action,
            "outcome": call.outcome or _outcome_for(response.status_code),
            "service": _audit_service(call.service),
            "rollout_id": call.rollout_id,
            "request_id": self.request_id,
            "client_address": self.client_address,
            "details": {"status": response.status_code, **call.details},
        }

    async def _refuse(
        self,
        problem: Problem,
        now: datetime,
        details: dict[str, Any],
        *,
        key: str | None = None,
        request_hash: str | None = None,
        call: Call | None = None,
    ) -> Response:
        """Answer with `problem`; the refusal's audit event is committed first."""
        headers = {"WWW-Authenticate": self.spec.challenge} if problem.status == 401 else None
        response = problem_response(problem, headers)
        if call is not None:
            self.service = _audit_service(call.service)
        identity = self.identity
        row = audit.event_row(
            at=now,
            actor=identity.subject if identity else self.spec.unknown_actor,
            roles=identity.roles if identity else (),
            source=self.spec.source,
            action=call.action if call else self.action,
            outcome=_outcome_for(problem.status),
            service=self.service,
            rollout_id=(call.rollout_id if call else None) or problem.extra.get("rollout_id"),
            request_id=self.request_id,
            client_address=self.client_address,
            details={**details, "status": problem.status, "detail": problem.detail,
                     **problem.extra},
        )  # fmt: skip
        remember = key is not None and request_hash is not None and problem.status < 500
        # Refusals are audited one by one up to a per-caller rate; beyond it they are counted
        # into one event per caller and minute (a flood cannot grow the log without bound).
        caller = identity.subject if identity else f"address:{self.client_address}"
        writer = self.runtime.audit_writer
        try:
            if not remember:
                if not await writer.write_refusal(caller, row):
                    # Counted in memory: nothing above awaited anything, so yield once, or a
                    # caller looping on refusals over one event loop would starve the others.
                    await asyncio.sleep(0)
                return response
            assert key is not None
            assert request_hash is not None
            async with self.runtime.sessions() as session, session.begin():
                if writer.refusals.allow(caller, now, row):
                    await chain.append(session, [row])
                await self._remember(key, request_hash, response, now, session)
        except IntegrityError:
            # A concurrent request with the same Idempotency-Key won; answer what it answered.
            assert key is not None
            assert request_hash is not None
            replay = await self._replay(key, request_hash, now)
            return replay if replay is not None else _audit_unavailable()
        except Exception as error:
            _log_failure(error, f"could not write the audit event for {self.action}")
            return _audit_unavailable()
        return response


async def _bearer(pipeline: _Request) -> Identity:
    authorization = header(pipeline.request, b"authorization") or ""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("a bearer token is required")
    try:
        return await pipeline.runtime.verifier.verify(token.strip())
    except AuthError as error:
        raise Unauthorized(f"invalid bearer token: {error}") from None


def url_path(scope: Scope) -> str:
    """The request's path exactly as Starlette's `request.url.path` gives it (stored request
    hashes compare against it), without building the whole URL for it."""
    path: str = scope["path"]
    return path.replace("?", "%3F").replace("#", "%23").replace("\\", "%5C")


def _audit_service(name: Any) -> str | None:
    # Only a valid name goes into the indexed column; anything else stays out of the log.
    return name if isinstance(name, str) and is_service_name(name) else None


def _log_failure(error: Exception, what: str) -> None:
    """Log `what` went wrong: one line while the database is unavailable (a traceback per
    request would flood the log and say nothing new), the traceback otherwise."""
    if is_unavailable(error):
        # No message text: SQLAlchemy's carries the statement's values.
        log.warning("%s: the database is unavailable (%s)", what, type(error).__name__)
    else:
        log.exception(what)


def _audit_unavailable() -> Response:
    # Never let a failing audit write pass as a silent success.
    return problem_response(
        ServiceUnavailable("the audit log could not be written; nothing was done")
    )


def _database_unavailable() -> Problem:
    # A commit cut off by a lost connection may still have happened: a retry with the same
    # Idempotency-Key acts at most once.
    return ServiceUnavailable(
        "the database is unavailable; try again later (with the same Idempotency-Key, a retry "
        "acts at most once)"
    )


def _internal_error() -> Problem:
    return Problem("an internal error occurred; nothing was changed")


class _NotFinite:
    """Stands in for a number that is not finite while reading, so that its place is named."""


_NOT_FINITE = _NotFinite()


def _refuse_constant(name: str) -> Any:
    return _NOT_FINITE


def _finite(text: str) -> float | _NotFinite:
    value = float(text)
    return value if math.isfinite(value) else _NOT_FINITE  # 1e400 reads as infinity


def _not_finite_at(value: Any, path: str = "") -> list[str]:
    """Where `_NOT_FINITE` stands in `value`, as field paths (`gates.0.threshold`)."""
    if value is _NOT_FINITE:
        return [path or "body"]
    items: Any = ()
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    found: list[str] = []
    for key, item in items:
        found += _not_finite_at(item, f"{path}.{key}" if path else str(key))
    return found


def read_json(raw: bytes, *, odd_text: Literal["refuse", "replace"] = "refuse") -> Any:
    """The one strict reader of JSON bodies: UTF-8 (a BOM is tolerated), finite numbers only
    (no NaN, Infinity, or a literal beyond float range), nested at most `MAX_JSON_DEPTH`
    levels (400 otherwise). NUL and lone surrogates in strings are refused (422), or with
    `odd_text="replace"` each is replaced by U+FFFD (for senders we must not refuse)."""
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        raise BadRequest("the request body is not UTF-8 encoded JSON") from None
    try:
        document = load_json(text, _strict)
    except RecursionError:
        raise BadRequest(_too_deep()) from None
    except ValueError:
        raise BadRequest("the request body is not valid JSON") from None
    # The walks are skipped when the text cannot hold what they look for (the usual case).
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _depth(document) > MAX_JSON_DEPTH:
        raise BadRequest(_too_deep())
    places = _not_finite_at(document) if _may_hold_non_finite(text) else []
    if places:
        message = "must be a finite number (not NaN, Infinity or beyond the range of a double)"
        raise Unprocessable(
            "the request body holds a number that is not finite",
            errors=[{"field": place, "message": message} for place in places[:20]],
        )
    if "\\u" in text and _has_odd_text(document):
        if odd_text == "replace":
            return _replace_odd_text(document)
        raise Unprocessable(
            "NUL characters (\\u0000) and unpaired surrogates (\\ud800-\\udfff) are not "
            "allowed in the request body"
        )
    return document


def _strict(text: str) -> Any:
    # What orjson leaves to the standard library (NaN, numbers past a double, lone surrogates,
    # deep nesting, invalid text) read with the checks that refuse each in its own words.
    return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite)


def _may_hold_non_finite(text: str) -> bool:
    # NaN, Infinity, or an exponent large enough to overflow a double (a digit then e/E: a
    # bare "e" is in nearly every body's keys).
    return "NaN" in text or "Infinity" in text or _EXPONENT.search(text) is not None


_EXPONENT = re.compile(r"[0-9][eE]")


def _too_deep() -> str:
    return f"the request body is nested more than {MAX_JSON_DEPTH} levels deep"


def _children(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [*value.keys(), *value.values()]
    if isinstance(value, list):
        return value
    return []


def _depth(document: Any) -> int:
    """How many containers deep `document` nests (a scalar: 0); stops counting past the bound."""
    deepest = 0
    pending = [(document, 1)] if isinstance(document, dict | list) else []
    while pending:
        value, depth = pending.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            break
        pending.extend((child, depth + 1) for child in _children(value)
                       if isinstance(child, dict | list))  # fmt: skip
    return deepest


def _has_odd_text(document: Any) -> bool:
    pending = [document]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            if _ODD_TEXT.search(value):
                return True
        else:
            pending.extend(_children(value))
    return False


def _replace_odd_text(value: Any) -> Any:
    # Recursion is bounded: the document was checked to nest at most MAX_JSON_DEPTH levels.
    if isinstance(value, str):
        return _ODD_TEXT.sub("\ufffd", value)
    if isinstance(value, list):
        return [_replace_odd_text(item) for item in value]
    if isinstance(value, dict):
        return {_replace_odd_text(k): _replace_odd_text(v) for k, v in value.items()}
    return value


async def read_limited(request: Request, limit: int) -> bytes:
    """The request body, refused (413) past `limit` bytes, declared or streamed."""
    declared = header(request, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def validation_errors(error: ValidationError) -> list[dict[str, Any]]:
    """Pydantic errors as field errors a client can act on (no input echoed back)."""
    return [
        {
            "field": ".".join(str(part) for part in item["loc"]) or "body",
            "message": item["msg"],
        }
        for item in error.errors(include_url=False, include_input=False)
    ]
