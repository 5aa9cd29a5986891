"""The console's pages and actions: server-rendered HTML over the API (docs/console.md).

Every read and every action is an API call made in process with the signed-in user's token
(`dispatch.Api`): the same routes, the same role checks, the same audit events with the user as
actor. The console adds no authority of its own; it only decides which buttons to show.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import re
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from opsapi.audit import service as audit
from opsapi.audit.models import Outcome, Source
from opsapi.auth.identity import AuthError, Identity, Role
from opsapi.canary.policy import is_service_name
from opsapi.console.dispatch import Answer, Api
from opsapi.console.headers import SecurityHeaders
from opsapi.console.oidc import Oidc, SignInFailed
from opsapi.console.session import NoSecret, Session, Sessions, signing_secret
from opsapi.errors import PayloadTooLarge
from opsapi.http.clients import client_address, is_allowed, networks
from opsapi.http.endpoint import read_limited
from opsapi.http.params import iso
from opsapi.http.runtime import Runtime

log = logging.getLogger("opsapi.console")

_HERE = Path(__file__).parent
_SUBJECT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")
_IDEMPOTENCY = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_MAX_FORM_BYTES = 16 * 1024
_MAX_TOKEN_CHARS = 8192
_LOCAL_TOKEN_SECONDS = 8 * 3600
# Fields whose values move with the clock alone: left out of a live answer's ETag.
_TICKING = frozenset({"time_left", "waited", "paused_for"})
_AUDIT_FILTERS = ("actor", "action", "service", "rollout_id", "outcome", "source", "since", "until")
# Console actions and the API call each one makes.
ACTIONS: dict[str, str] = {
    "start": "/canary/promote",
    "promote": "/canary/promote",
    "rollback": "/canary/rollback",
    "pause": "/canary/pause",
    "resume": "/canary/resume",
    "revert": "/canary/revert",
}
_DONE = {
    "start": "Started",
    "promote": "Promoted",
    "rollback": "Rolled back",
    "pause": "Paused",
    "resume": "Resumed",
    "revert": "Reverted",
}


# What every page's template may use, for pages rendered without a signed-in context.
_DEFAULTS: dict[str, Any] = {
    "user": None,
    "roles": [],
    "can_act": False,
    "is_auditor": False,
    "csrf": "",
    "flashes": [],
    "server_now": "",
    "request_id": None,
    "back": None,
}


class _Stop(Exception):
    """End the request with this response (a refusal, a redirect)."""

    def __init__(self, response: Response) -> None:
        self.response = response


@dataclass
class _Context:
    request: Request
    runtime: Runtime
    sessions: Sessions
    session: Session
    identity: Identity | None
    api: Api
    client: str | None

    @property
    def roles(self) -> list[str]:
        return sorted(self.identity.effective_roles()) if self.identity else []


class Console:
    """The console of one application, mounted at `<prefix>/console`."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.base = prefix + "/console"
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(_HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.filters["number"] = _number
        self.templates.filters["pretty"] = _pretty
        self._sessions: Sessions | None = None
        self._oidc: Oidc | None = None

    # --- routes ---------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        """The console's routes: `/` and the bare console path redirect into it."""
        pages = [
            Route("/", self.overview, methods=["GET"]),
            Route("/live", self.overview_live, methods=["GET"]),
            Route("/go", self.go, methods=["GET"]),
            Route("/services/{service}", self.service_page, methods=["GET"]),
            Route("/services/{service}/live", self.service_live, methods=["GET"]),
            Route("/audit", self.audit_page, methods=["GET"]),
            Route("/audit/export", self.audit_export, methods=["GET"]),
            Route("/audit/verify", self.audit_verify, methods=["GET"]),
            Route("/freezes", self.freezes_page, methods=["GET"]),
            Route("/actions/{action}", self.action, methods=["POST"]),
            Route("/auth/signin", self.signin_page, methods=["GET"]),
            Route("/auth/signin/local", self.signin_local, methods=["POST"]),
            Route("/auth/signin/token", self.signin_token, methods=["POST"]),
            Route("/auth/oidc/start", self.oidc_start, methods=["GET"]),
            Route("/auth/oidc/callback", self.oidc_callback, methods=["GET"]),
            Route("/auth/signout", self.signout, methods=["POST"]),
            Mount("/static", StaticFiles(directory=_HERE / "static"), name="console-static"),
            Route("/{path:path}", self.not_found, methods=["GET", "POST"]),
        ]
        return [
            Route("/", self.to_console, methods=["GET"]),
            Route(self.base, self.to_console, methods=["GET"]),
            Mount(self.base, routes=pages, middleware=[SecurityHeaders.middleware()]),
        ]

    async def to_console(self, request: Request) -> Response:
        """`/` and the console's bare path lead to the console."""
        return RedirectResponse(self.base + "/", status_code=308)

    # --- the request's context ------------------------------------------------------------

    def _sessions_for(self, runtime: Runtime) -> Sessions:
        if self._sessions is None:
            settings = runtime.settings
            secure = True if (settings.public_url or "").startswith("https://") else None
            self._sessions = Sessions(signing_secret(settings), path=self.base, secure=secure)
        return self._sessions

    def _oidc_of(self, runtime: Runtime) -> Oidc | None:
        if runtime.settings.oidc_issuer is None:
            return None
        if self._oidc is None:
            self._oidc = Oidc(runtime.settings)
        return self._oidc

    async def _context(self, request: Request) -> _Context:
        runtime: Runtime = request.app.state.runtime
        settings = runtime.settings
        client = client_address(
            request.client.host if request.client else None,
            request.headers.get("x-forwarded-for"),
            networks(settings.trusted_proxies),
        )
        if not is_allowed(client, networks(settings.allowed_cidrs)):
            raise _Stop(self._error(request, 403, "This client address may not use opsapi."))
        try:
            sessions = self._sessions_for(runtime)
        except NoSecret as error:
            raise _Stop(
                self._error(request, 503, f"The console is not configured: {error}.")
            ) from None
        session = sessions.load(request) or Session()
        identity = None
        if session.token is not None:
            try:
                identity = await runtime.verifier.verify(session.token)
            except AuthError as error:
                session.token = None
                session.expires_at = None
                session.flash("error", f"You were signed out: {error}.")
        request_id = "console-" + uuid.uuid4().hex[:24]
        api = Api(request, self.prefix, session.token, request_id)
        return _Context(request, runtime, sessions, session, identity, api, client)

    async def _signed_in(self, request: Request) -> _Context:
        """The context of a page that needs a signed-in user (else: to the sign-in page)."""
        context = await self._context(request)
        if context.identity is None:
            self._bounce_cross_site(request)
            target = f"{self.base}/auth/signin?{urlencode({'next': _here(request)})}"
            response = RedirectResponse(target, status_code=303)
            self._save(context, response)
            raise _Stop(response)
        return context

    def _bounce_cross_site(self, request: Request) -> None:
        """A link from another site does not carry the SameSite=Strict cookie: load the page
        again from here, which does (instead of showing a signed-in user the sign-in page)."""
        if request.method == "GET" and _cross_site(request):
            raise _Stop(self._render(request, "bounce.html", {"target": _here(request)}))

    def _save(self, context: _Context, response: Response) -> None:
        """Set the session cookie, unless the request came from another site: it carried no
        cookie, so what we hold is not the browser's session, and must not replace it."""
        if not _cross_site(context.request):
            context.sessions.save(context.request, response, context.session)

    # --- rendering ------------------------------------------------------------------------

    def _render(
        self, request: Request, template: str, values: dict[str, Any], status: int = 200
    ) -> HTMLResponse:
        html = self.templates.get_template(template).render(
            {**_DEFAULTS, "base": self.base, **values}
        )
        return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})

    def _page(
        self, context: _Context, template: str, values: dict[str, Any], status: int = 200
    ) -> HTMLResponse:
        runtime = context.runtime
        response = self._render(
            context.request,
            template,
            {
                "user": context.identity.subject if context.identity else None,
                "roles": context.roles,
                "can_act": bool(context.identity and context.identity.has(Role.OPERATOR)),
                "is_auditor": bool(context.identity and context.identity.has(Role.AUDITOR)),
                "csrf": context.session.csrf,
                "flashes": context.session.take_flashes(),
                "server_now": iso(runtime.clock()),
                "new_key": _new_key,
                **values,
            },
            status,
        )
        self._save(context, response)
        return response

    def _error(self, request: Request, status: int, detail: str) -> HTMLResponse:
        return self._render(request, "error.html", {"status": status, "detail": detail}, status)

    def _refused(self, context: _Context, answer: Answer) -> Response:
        """The API's refusal of a page's read: signed out on 401, else an error page."""
        if answer.status == 401:
            context.session.token = None
            context.session.flash("error", f"You were signed out: {answer.detail()}.")
            response = RedirectResponse(
                f"{self.base}/auth/signin?{urlencode({'next': _here(context.request)})}", 303
            )
            self._save(context, response)
            return response
        return self._page(
            context,
            "error.html",
            {"status": answer.status, "detail": answer.detail()},
            status=answer.status if answer.status >= 400 else 502,
        )

    async def _audit_refusal(
        self, context: _Context, action: str, status: int, detail: str
    ) -> None:
        """A refusal of the console's own (a CSRF failure, a sign-in refused), audited as the
        API audits its refusals."""
        identity = context.identity
        row = audit.event_row(
            at=context.runtime.clock(),
            actor=identity.subject if identity else "anonymous",
            roles=identity.roles if identity else (),
            source=Source.API,
            action=action,
            outcome=Outcome.DENIED,
            request_id=context.api.request_id,
            client_address=context.client,
            details={"status": status, "detail": detail},
        )
        caller = identity.subject if identity else f"address:{context.client}"
        try:
            await context.runtime.audit_writer.write_refusal(caller, row)
        except Exception:
            raise self._audit_failed(context) from None

    async def _audit_success(
        self, context: _Context, identity: Identity, action: str, details: dict[str, Any]
    ) -> None:
        """A sign-in or sign-out, audited before it takes effect (not at all if that fails)."""
        row = audit.event_row(
            at=context.runtime.clock(),
            actor=identity.subject,
            roles=identity.roles,
            source=Source.API,
            action=action,
            outcome=Outcome.SUCCESS,
            request_id=context.api.request_id,
            client_address=context.client,
            details={"status": 303, **details},
        )
        try:
            await context.runtime.audit_writer.write(row)
        except Exception:
            raise self._audit_failed(context) from None

    def _audit_failed(self, context: _Context) -> _Stop:
        log.exception("could not write a console audit event")
        detail = "The audit log could not be written, so nothing was done; try again later."
        return _Stop(self._error(context.request, 503, detail))

    # --- pages ----------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        """Every open rollout in full, and every service with its latest rollout."""
        try:
            context = await self._signed_in(request)
            live = await self._overview_values(context)
            if isinstance(live, Answer):
                return self._refused(context, live)
            services = await context.api.get("/services", {"limit": 1000})
            if not services.ok:
                return self._refused(context, services)
            values = {**live, "services": services.json()["items"]}
            return self._page(context, "overview.html", values)
        except _Stop as stop:
            return stop.response

    async def overview_live(self, request: Request) -> Response:
        """The open rollouts' part of the overview, for polling (ETag / If-None-Match)."""
        try:
            context = await self._live_context(request)
            live = await self._overview_values(context)
            if isinstance(live, Answer):
                return _live_refusal(live)
            return self._live(context, "_rollouts.html", live, live["digest_of"])
        except _Stop as stop:
            return stop.response

    async def _overview_values(self, context: _Context) -> dict[str, Any] | Answer:
        rollouts = await context.api.get("/canary")
        if not rollouts.ok:
            return rollouts
        freezes = await context.api.get("/freezes")
        if not freezes.ok:
            return freezes
        items = rollouts.json()["items"]
        held = freezes.json()
        cards = [{"rollout": item, "holds": _holds_of(item["service"], held)} for item in items]
        return {"cards": cards, "digest_of": cards}

    async def go(self, request: Request) -> Response:
        """The overview's "open a service" box."""
        name = request.query_params.get("service", "").strip()
        if not is_service_name(name):
            return RedirectResponse(self.base + "/", status_code=303)
        return RedirectResponse(f"{self.base}/services/{name}", status_code=303)

    async def service_page(self, request: Request) -> Response:
        """A service: its latest rollout live, history, gate evaluations, policy, rejections."""
        try:
            context = await self._signed_in(request)
            name = self._service_name(context)
            live = await self._service_values(context, name)
            if isinstance(live, Answer):
                return self._refused(context, live)
            api = context.api
            history = await api.get(f"/canary/{name}/history", {"limit": 20})
            policy = await api.get(f"/services/{name}")
            rejections = await api.get(f"/services/{name}/rejections")
            for answer in (history, policy, rejections):
                if not answer.ok:
                    return self._refused(context, answer)
            evaluations: list[dict[str, Any]] = []
            rollout = live["rollout"]
            if rollout is not None:
                answer = await api.get(f"/rollouts/{rollout['id']}/evaluations", {"limit": 50})
                if not answer.ok:
                    return self._refused(context, answer)
                evaluations = answer.json()["items"]
            policy_document = policy.json()
            status = policy_document.pop("status", {})
            values = {
                **live,
                "history": history.json()["items"],
                "policy": policy_document,
                "status": status,
                "rejections": rejections.json()["items"],
                "evaluations": evaluations,
            }
            return self._page(context, "service.html", values)
        except _Stop as stop:
            return stop.response

    async def service_live(self, request: Request) -> Response:
        """The service's latest rollout, for polling (ETag / If-None-Match)."""
        try:
            context = await self._live_context(request)
            name = self._service_name(context)
            live = await self._service_values(context, name)
            if isinstance(live, Answer):
                return _live_refusal(live)
            return self._live(context, "_rollout.html", live, live["rollout"])
        except _Stop as stop:
            return stop.response

    async def _service_values(self, context: _Context, name: str) -> dict[str, Any] | Answer:
        answer = await context.api.get(f"/canary/{name}")
        if answer.status == 404:
            return {"service": name, "rollout": None}
        if not answer.ok:
            return answer
        return {"service": name, "rollout": answer.json()}

    def _service_name(self, context: _Context) -> str:
        name = str(context.request.path_params["service"])
        if not is_service_name(name):
            raise _Stop(
                self._page(
                    context,
                    "error.html",
                    {
                        "status": 404,
                        "detail": "Service names are lower-case letters, digits and "
                        "dashes, at most 63 characters.",
                    },
                    status=404,
                )
            )
        return name

    async def _live_context(self, request: Request) -> _Context:
        context = await self._context(request)
        if context.identity is None:
            raise _Stop(
                Response("signed out", status_code=401, headers={"Cache-Control": "no-store"})
            )
        return context

    def _live(
        self, context: _Context, template: str, values: dict[str, Any], data: Any
    ) -> Response:
        """A fragment for the page's poller: 304 while nothing but the clock moved."""
        digest = _digest({"data": data, "roles": context.roles})
        etag = f'W/"{digest}"'
        headers = {
            "ETag": etag,
            "Cache-Control": "no-cache",
            "X-Console-Now": iso(context.runtime.clock()) or "",
        }
        if etag in _etags(context.request.headers.get("if-none-match")):
            return Response(status_code=304, headers=headers)
        html = self.templates.get_template(template).render(
            base=self.base,
            can_act=bool(context.identity and context.identity.has(Role.OPERATOR)),
            csrf=context.session.csrf,
            new_key=_new_key,
            **values,
        )
        return HTMLResponse(html, headers=headers)

    async def audit_page(self, request: Request) -> Response:
        """The audit log for auditors: filters, pages, export links, chain verification."""
        try:
            context = await self._signed_in(request)
            params = request.query_params
            filters = {name: params[name] for name in _AUDIT_FILTERS if params.get(name)}
            query = {**filters, "limit": 50, "cursor": params.get("cursor")}
            answer = await context.api.get("/audit", query)
            if not answer.ok:
                if answer.status in (401, 403):
                    return self._refused(context, answer)
                # A bad filter: say so above an empty table.
                context.session.flash("error", answer.detail(), context.api.request_id)
                page: dict[str, Any] = {"items": [], "next_cursor": None}
            else:
                page = answer.json()
            exports = {
                fmt: f"{self.base}/audit/export?{urlencode({**filters, 'format': fmt})}"
                for fmt in ("csv", "ndjson")
            }
            next_link = None
            if page.get("next_cursor"):
                next_link = (
                    f"{self.base}/audit?{urlencode({**filters, 'cursor': page['next_cursor']})}"
                )
            values = {
                "filters": filters,
                "events": page["items"],
                "next_link": next_link,
                "exports": exports,
            }
            return self._page(context, "audit.html", values)
        except _Stop as stop:
            return stop.response

    async def audit_export(self, request: Request) -> Response:
        """The API's export, streamed to the browser as a download."""
        try:
            context = await self._signed_in(request)
            params = request.query_params
            query = {name: params[name] for name in (*_AUDIT_FILTERS, "format") if params.get(name)}
            stream = await context.api.stream("/audit/export", query)
            if stream.status != 200:
                answer = Answer(
                    stream.status, stream.headers, b"".join([chunk async for chunk in stream.body])
                )
                return self._refused(context, answer)
            headers = {
                name: stream.headers[name]
                for name in ("content-disposition", "cache-control", "x-request-id")
                if name in stream.headers
            }
            return StreamingResponse(
                stream.body, media_type=stream.headers.get("content-type"), headers=headers
            )
        except _Stop as stop:
            return stop.response

    async def audit_verify(self, request: Request) -> Response:
        """The hash chain verified, as `GET /audit/verify` reports it."""
        try:
            context = await self._signed_in(request)
            answer = await context.api.get("/audit/verify")
            if not answer.ok:
                return self._refused(context, answer)
            return self._page(context, "verify.html", {"report": answer.json()})
        except _Stop as stop:
            return stop.response

    async def freezes_page(self, request: Request) -> Response:
        """Freeze windows and open incidents (what holds starts and promotions)."""
        try:
            context = await self._signed_in(request)
            answer = await context.api.get("/freezes")
            if not answer.ok:
                return self._refused(context, answer)
            return self._page(context, "freezes.html", answer.json())
        except _Stop as stop:
            return stop.response

    async def not_found(self, request: Request) -> Response:
        """Anything else under the console."""
        return self._error(request, 404, "There is no such page in the console.")

    # --- actions --------------------------------------------------------------------------

    async def action(self, request: Request) -> Response:
        """A button: check the CSRF token, then make the API call with the user's token."""
        try:
            name = str(request.path_params["action"])
            context = await self._context(request)
            form = await self._form(context)
            await self._check_csrf(context, form, f"console.{name}"[:64])
            if name not in ACTIONS:
                return self._page(
                    context, "error.html", {"status": 404, "detail": "No such action."}, status=404
                )
            if context.identity is None:
                raise _Stop(self._to_signin(context))
            service = form.get("service", "")
            if not is_service_name(service):
                return self._page(
                    context, "error.html", {"status": 422, "detail": "No such service."}, status=422
                )
            back = f"{self.base}/services/{service}"
            reason = form.get("reason", "").strip()
            if not reason:
                context.session.flash("error", "Say why: every action needs a reason.")
                return self._redirect(context, back)
            body: dict[str, Any] = {"service": service, "reason": reason[:2000]}
            if name == "start":
                body["version"] = form.get("version", "").strip()
                if form.get("stable_version", "").strip():
                    body["stable_version"] = form["stable_version"].strip()
            if name == "promote" and form.get("from_percent", "").isdigit():
                body["from_percent"] = int(form["from_percent"])
            key = form.get("idempotency_key")
            answer = await context.api.post(
                ACTIONS[name],
                body,
                idempotency_key=key if key and _IDEMPOTENCY.fullmatch(key) else None,
            )
            if answer.status in (401, 403):
                # Refused by the API itself (a viewer's forged form, an expired token): say so
                # with the API's own status.
                if answer.status == 401:
                    context.session.token = None
                return self._page(
                    context,
                    "error.html",
                    {
                        "status": answer.status,
                        "detail": answer.detail(),
                        "request_id": context.api.request_id,
                        "back": back,
                    },
                    status=answer.status,
                )
            if answer.ok:
                context.session.flash(
                    "ok", _done(name, service, answer.json()), context.api.request_id
                )
            else:
                context.session.flash(
                    "error", f"Refused: {answer.detail()}", context.api.request_id
                )
            return self._redirect(context, back)
        except _Stop as stop:
            return stop.response

    async def _form(self, context: _Context) -> dict[str, str]:
        request = context.request
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            raise _Stop(
                self._page(
                    context,
                    "error.html",
                    {"status": 415, "detail": "The console takes forms."},
                    status=415,
                )
            )
        try:
            raw = await read_limited(request, _MAX_FORM_BYTES)
        except PayloadTooLarge:
            raise _Stop(
                self._page(
                    context,
                    "error.html",
                    {"status": 413, "detail": "The form is too large."},
                    status=413,
                )
            ) from None
        try:
            pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, max_num_fields=20)
        except (UnicodeDecodeError, ValueError):
            raise _Stop(
                self._page(
                    context,
                    "error.html",
                    {"status": 400, "detail": "The form could not be read."},
                    status=400,
                )
            ) from None
        return {key: value.replace("\x00", "") for key, value in pairs}

    async def _check_csrf(self, context: _Context, form: dict[str, str], action: str) -> None:
        """Refuse (403, audited) a state change that did not come from a console page."""
        request = context.request
        problem = None
        if request.headers.get("sec-fetch-site", "same-origin") != "same-origin":
            problem = "the form was sent from another site"
        elif not context.session.check_csrf(form.get("csrf")):
            problem = "the form's CSRF token is missing or does not match this session"
        if problem is None:
            return
        await self._audit_refusal(context, action, 403, problem)
        raise _Stop(
            self._page(
                context,
                "error.html",
                {"status": 403, "detail": f"Refused: {problem}. Reload the page and try again."},
                status=403,
            )
        )

    def _redirect(self, context: _Context, target: str) -> Response:
        response = RedirectResponse(target, status_code=303)
        self._save(context, response)
        return response

    def _to_signin(self, context: _Context) -> Response:
        context.session.flash("error", "Sign in first.")
        return self._redirect(context, f"{self.base}/auth/signin")

    # --- signing in and out ---------------------------------------------------------------

    def _local_signin(self, context: _Context) -> str | None:
        """Why the local sign-in form is not offered here, or None when it is."""
        settings = context.runtime.settings
        if settings.jwks_url:
            return "tokens come from the identity provider"
        if settings.env == "production":
            return "this server runs in production"
        if not _loopback(context.client):
            return "local sign-in is offered only to browsers on this machine"
        return None

    async def signin_page(self, request: Request) -> Response:
        """Sign in: the identity provider, a local account (embedded mode), or a token."""
        try:
            context = await self._context(request)
            target = self._next(request.query_params.get("next"))
            self._bounce_cross_site(request)
            if context.identity is not None:
                return self._redirect(context, target)
            return self._signin_form(context, target)
        except _Stop as stop:
            return stop.response

    def _signin_form(
        self, context: _Context, target: str, status: int = 200, error: str | None = None
    ) -> Response:
        oidc = self._oidc_of(context.runtime)
        values = {
            "next": target,
            "local": self._local_signin(context) is None,
            "oidc": oidc is not None,
            "oidc_problem": oidc.problem() if oidc else None,
            "oidc_issuer": oidc.issuer if oidc else None,
            "role_names": [role.value for role in Role],
            "error": error,
        }
        return self._page(context, "signin.html", values, status=status)

    async def signin_local(self, request: Request) -> Response:
        """Embedded mode: mint a local token for a subject and a role (loopback only)."""
        try:
            context = await self._context(request)
            form = await self._form(context)
            await self._check_csrf(context, form, "console.signin")
            target = self._next(form.get("next"))
            refusal = self._local_signin(context)
            subject = form.get("subject", "").strip()
            role = form.get("role", "")
            if refusal is None and not _SUBJECT.fullmatch(subject):
                refusal = "a name is 1-64 letters, digits and . _ @ + -"
            if refusal is None and role not in {r.value for r in Role}:
                refusal = "choose a role"
            if refusal is not None:
                await self._audit_refusal(context, "console.signin", 403, refusal)
                return self._signin_form(context, target, 403, f"Refused: {refusal}.")
            from opsapi.auth.tokens import LocalSigner

            signer = LocalSigner.load_or_create(context.runtime.settings.signing_key_path)
            token = signer.mint(subject=subject, roles=[role], ttl_seconds=_LOCAL_TOKEN_SECONDS)
            return await self._sign_in(context, token, "local", target)
        except _Stop as stop:
            return stop.response

    async def signin_token(self, request: Request) -> Response:
        """Sign in with a bearer token (`opsapi token` output, or one from the provider)."""
        try:
            context = await self._context(request)
            form = await self._form(context)
            await self._check_csrf(context, form, "console.signin")
            target = self._next(form.get("next"))
            token = form.get("token", "").strip()
            if token.lower().startswith("bearer "):
                token = token[7:].strip()
            if not token or len(token) > _MAX_TOKEN_CHARS:
                return self._signin_form(context, target, 422, "Paste a token.")
            return await self._sign_in(context, token, "token", target)
        except _Stop as stop:
            return stop.response

    async def _sign_in(self, context: _Context, token: str, method: str, target: str) -> Response:
        """Hold `token` once the API's own verifier accepts it; audited either way."""
        try:
            identity = await context.runtime.verifier.verify(token)
        except AuthError as error:
            await self._audit_refusal(context, "console.signin", 401, f"invalid token: {error}")
            return self._signin_form(context, target, 401, f"That token was refused: {error}.")
        context.session.sign_in(token, _expiry(token))
        if not context.sessions.fits(context.session):
            context.session.token = None
            return self._signin_form(
                context, target, 422, "That token is too large for a console session."
            )
        context.identity = identity
        await self._audit_success(context, identity, "console.signin", {"method": method})
        return self._redirect(context, target)

    async def oidc_start(self, request: Request) -> Response:
        """Send the browser to the identity provider (authorization code, PKCE S256)."""
        try:
            context = await self._context(request)
            oidc = self._oidc_of(context.runtime)
            if oidc is None or oidc.problem():
                detail = oidc.problem() if oidc else "no identity provider is configured"
                return self._page(context, "error.html", {"status": 404, "detail": detail}, 404)
            try:
                pending = await oidc.begin(self._callback_url(context))
            except SignInFailed as error:
                return self._signin_form(context, self._next(None), 503, f"{error}.")
            response = RedirectResponse(pending.url, status_code=302)
            context.sessions.save_oidc(
                request,
                response,
                {
                    "state": pending.state,
                    "code_verifier": pending.code_verifier,
                    "nonce": pending.nonce,
                    "next": self._next(request.query_params.get("next")),
                },
            )
            return response
        except _Stop as stop:
            return stop.response

    async def oidc_callback(self, request: Request) -> Response:
        """The provider's answer: exchange the code, keep the token, continue."""
        try:
            context = await self._context(request)
            oidc = self._oidc_of(context.runtime)
            pending = context.sessions.load_oidc(request)
            params = request.query_params
            target = self._next(pending.get("next") if pending else None)
            if oidc is None or pending is None:
                response = self._signin_form(
                    context, target, 400, "That sign-in expired; start again."
                )
                context.sessions.clear_oidc(request, response)
                return response
            if params.get("error"):
                error = params["error"][:100]
                await self._audit_refusal(
                    context, "console.signin", 401, f"identity provider: {error}"
                )
                response = self._signin_form(
                    context, target, 401, f"The identity provider said: {error}."
                )
                context.sessions.clear_oidc(request, response)
                return response
            try:
                signed_in = await oidc.finish(
                    pending=pending,
                    state=params.get("state"),
                    code=params.get("code"),
                    redirect_uri=self._callback_url(context),
                    verifier=context.runtime.verifier,
                )
            except SignInFailed as error:
                await self._audit_refusal(context, "console.signin", 401, str(error))
                response = self._signin_form(context, target, 401, f"{error}.")
                context.sessions.clear_oidc(request, response)
                return response
            context.session.sign_in(signed_in.token, signed_in.expires_at)
            if not context.sessions.fits(context.session):
                context.session.token = None
                return self._signin_form(
                    context, target, 422, "The provider's token is too large for a session."
                )
            await self._audit_success(
                context,
                signed_in.identity,
                "console.signin",
                {"status": 200, "method": "oidc", "credential": signed_in.kind},
            )
            # This answer ends a cross-site redirect chain, on which the browser withholds a
            # SameSite=Strict cookie: a page of ours navigates on, and that request carries it.
            response = self._render(request, "bounce.html", {"target": target})
            context.sessions.save(request, response, context.session)
            context.sessions.clear_oidc(request, response)
            return response
        except _Stop as stop:
            return stop.response

    def _callback_url(self, context: _Context) -> str:
        public = context.runtime.settings.public_url
        origin = public.rstrip("/") if public else str(context.request.base_url).rstrip("/")
        return origin + self.base + "/auth/oidc/callback"

    async def signout(self, request: Request) -> Response:
        """Forget the session's token (audited)."""
        try:
            context = await self._context(request)
            form = await self._form(context)
            await self._check_csrf(context, form, "console.signout")
            if context.identity is not None:
                await self._audit_success(context, context.identity, "console.signout", {})
            context.session = Session()
            context.session.flash("ok", "Signed out.")
            return self._redirect(context, f"{self.base}/auth/signin")
        except _Stop as stop:
            return stop.response

    def _next(self, raw: str | None) -> str:
        """A console path to go to after sign-in; anything else (another site) is ignored."""
        if (
            raw
            and raw.startswith(self.base + "/")
            and not raw.startswith(self.base + "/auth/")
            and "//" not in raw
            and "\\" not in raw
            and all(32 < ord(char) < 127 for char in raw)
        ):
            return raw
        return self.base + "/"


def _cross_site(request: Request) -> bool:
    return request.headers.get("sec-fetch-site") == "cross-site"


def _here(request: Request) -> str:
    query = request.url.query
    return request.url.path + (f"?{query}" if query else "")


def _loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _expiry(token: str) -> float | None:
    """The `exp` of a token the verifier accepted."""
    from opsapi.console.oidc import _claims

    expires = _claims(token).get("exp")
    return float(expires) if isinstance(expires, int | float) else None


def _new_key() -> str:
    """An Idempotency-Key for one rendered form: submitting it twice acts once."""
    return secrets.token_urlsafe(24)


def _holds_of(service: str, freezes: dict[str, Any]) -> list[dict[str, Any]]:
    """What holds `service` now, from `GET /freezes`: active windows and open incidents."""
    holds: list[dict[str, Any]] = []
    for window in freezes.get("windows", []):
        services = window.get("services") or []
        if window.get("active") and ("*" in services or service in services):
            holds.append(
                {
                    "kind": "freeze",
                    "detail": f"{window['name']}: {window['reason']}",
                    "until": window.get("active_until"),
                }
            )
    for incident in freezes.get("incidents", []):
        if incident.get("service") == service:
            holds.append(
                {
                    "kind": "incident",
                    "detail": f"#{incident['number']} {incident['title']}",
                    "until": None,
                }
            )
    return holds


def _done(action: str, service: str, rollout: Any) -> str:
    """What an accepted action did, in one line."""
    if not isinstance(rollout, dict):
        return f"{_DONE[action]} {service}."
    state, version = rollout.get("state"), rollout.get("canary_version")
    line = f"{_DONE[action]} {service}: {state}, {version} at {rollout.get('desired_weight')} %"
    if action in ("rollback", "revert"):
        router = rollout.get("router") or {}
        if rollout.get("traffic_at_zero"):
            line += ", traffic at 0 % confirmed by the router"
        elif router.get("name", "pull") == "pull":
            line += ", 0 % published: applied when a client fetches it"
        else:
            line += ", the router has not confirmed 0 % yet (it keeps retrying)"
    return line + "."


def _strip_ticking(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_ticking(v) for k, v in value.items() if k not in _TICKING}
    if isinstance(value, list):
        return [_strip_ticking(item) for item in value]
    return value


def _digest(value: Any) -> str:
    text = json.dumps(_strip_ticking(value), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _etags(header: str | None) -> set[str]:
    if not header:
        return set()
    return {tag.strip() for tag in header.split(",") if tag.strip()}


def _live_refusal(answer: Answer) -> Response:
    # The poller shows the status and stops; a reload shows the page's own answer.
    return Response(
        answer.detail(),
        status_code=answer.status if answer.status >= 400 else 502,
        media_type="text/plain",
        headers={"Cache-Control": "no-store"},
    )


def _number(value: Any) -> str:
    """A gate value or threshold, short."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:.4g}"


def _pretty(value: Any) -> str:
    """JSON, indented (escaped by the template like any text)."""
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)
