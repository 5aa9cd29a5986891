"""The HTTP side of `opsctl`: requests, retries, and problem+json answers turned into exit codes."""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import httpx

API_PREFIX = "/internal/ops"
# Answers that mean "try again": nothing was done (opsapi stores no 5xx answer).
_RETRY_STATUSES = frozenset({502, 503, 504})


class ExitCode(IntEnum):
    """`opsctl` exit statuses, one per class of failure."""

    OK = 0
    ERROR = 1
    USAGE = 2
    UNAUTHENTICATED = 3
    FORBIDDEN = 4
    NOT_FOUND = 5
    CONFLICT = 6
    INVALID = 7
    SERVER_ERROR = 8
    UNREACHABLE = 9
    AUDIT_BROKEN = 10


EXIT_CODES: dict[ExitCode, str] = {
    ExitCode.OK: "success",
    ExitCode.ERROR: "any other failure (an answer opsctl did not expect, e.g. 405)",
    ExitCode.USAGE: "usage error: unknown command or option, bad argument",
    ExitCode.UNAUTHENTICATED: "not authenticated (401), or not logged in: missing, invalid or "
    "expired token or login",
    ExitCode.FORBIDDEN: "forbidden (403): the token lacks the role",
    ExitCode.NOT_FOUND: "not found (404): no such service rollout, rollout or operation",
    ExitCode.CONFLICT: "conflict (409): the state refuses it (not ready, paused, no revert, ...)",
    ExitCode.INVALID: "invalid request (400, 413, 415, 422)",
    ExitCode.SERVER_ERROR: "server error (5xx), after retries",
    ExitCode.UNREACHABLE: "opsapi unreachable: connection refused, DNS, TLS or timeout",
    ExitCode.AUDIT_BROKEN: "`audit verify` found the audit hash chain broken",
}

_STATUS_CODES: dict[int, ExitCode] = {
    400: ExitCode.INVALID,
    401: ExitCode.UNAUTHENTICATED,
    403: ExitCode.FORBIDDEN,
    404: ExitCode.NOT_FOUND,
    409: ExitCode.CONFLICT,
    413: ExitCode.INVALID,
    415: ExitCode.INVALID,
    422: ExitCode.INVALID,
}


class OpsctlError(Exception):
    """A failure reported as one line on stderr and an exit code."""

    def __init__(
        self, code: ExitCode, message: str, problem: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.problem = dict(problem) if problem is not None else None


@dataclass
class Answer:
    """A successful JSON answer."""

    body: Any
    request_id: str
    replayed: bool = False
    headers: dict[str, str] = field(default_factory=dict)


def api_base(url: str) -> str:
    """The API root for a server URL: `http://host:8080` -> `http://host:8080/internal/ops`."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url if url.endswith(API_PREFIX) else url + API_PREFIX


def new_request_id() -> str:
    """A fresh X-Request-Id, recognisable in the audit log as coming from opsctl."""
    return f"opsctl-{uuid.uuid4().hex[:16]}"


def new_idempotency_key() -> str:
    """A fresh Idempotency-Key for one command (retries of that command reuse it)."""
    return f"opsctl-{uuid.uuid4()}"


class Client:
    """A small synchronous client of the opsapi API with bounded retries.

    The bearer token is `token` (OPSAPI_TOKEN or --token) when given, else what `login_token`
    answers before each request (the cached `opsctl login`, renewed when it expires)."""

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        login_token: Callable[[], str | None] | None = None,
        timeout: float = 30.0,
        retries: int = 2,
        backoff: float = 0.25,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.server = url
        self.base = api_base(url)
        self.token = token.strip() if token else None
        self.login_token = login_token
        self.retries = max(0, retries)
        self.backoff = backoff
        headers = {"Accept": "application/json", "User-Agent": "opsctl"}
        self._http = httpx.Client(
            base_url=self.base, headers=headers, timeout=timeout, transport=transport
        )
        self._timeout = timeout

    def bearer(self) -> tuple[str | None, str | None]:
        """The token to send and where it comes from: "token", "login" or None (no token)."""
        if self.token:
            return self.token, "token"
        if self.login_token is not None:
            token = self.login_token()
            if token:
                return token, "login"
        return None, None

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def get(self, path: str, params: Mapping[str, Any] | None = None) -> Answer:
        """GET a JSON document (retried on transient failures)."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        return self._json(self._send("GET", path, params=query))

    def get_text(self, path: str, params: Mapping[str, Any] | None = None) -> str:
        """GET a text document such as a CSV export."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        return self._send("GET", path, params=query, accept="*/*").text

    def post(self, path: str, body: Mapping[str, Any], *, idempotency_key: str) -> Answer:
        """POST a JSON body with an Idempotency-Key, so that retrying it acts at most once."""
        content = json.dumps(dict(body), separators=(",", ":")).encode()
        return self._json(
            self._send("POST", path, content=content, idempotency_key=idempotency_key)
        )

    def put(self, path: str, body: Mapping[str, Any], *, idempotency_key: str) -> Answer:
        """PUT a JSON document with an Idempotency-Key (a retry acts at most once)."""
        content = json.dumps(dict(body), separators=(",", ":")).encode()
        return self._json(self._send("PUT", path, content=content, idempotency_key=idempotency_key))

    def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        content: bytes | None = None,
        idempotency_key: str | None = None,
        accept: str = "application/json",
    ) -> httpx.Response:
        request_id = new_request_id()
        headers = {"X-Request-Id": request_id, "Accept": accept}
        token, origin = self.bearer()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if content is not None:
            headers["Content-Type"] = "application/json"
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        attempt = 0
        while True:
            try:
                response = self._http.request(
                    method, path, params=params, content=content, headers=headers
                )
            except httpx.HTTPError as error:
                if attempt < self.retries:
                    attempt += 1
                    time.sleep(self.backoff * 2 ** (attempt - 1))
                    continue
                raise self._transport_error(error, method, idempotency_key) from None
            if response.status_code in _RETRY_STATUSES and attempt < self.retries:
                attempt += 1
                time.sleep(self.backoff * 2 ** (attempt - 1))
                continue
            if response.status_code >= 400:
                raise error_for(response, method, path, token, origin)
            return response

    def _json(self, response: httpx.Response) -> Answer:
        request_id = response.headers.get("x-request-id", "")
        try:
            body = response.json()
        except ValueError:
            raise OpsctlError(
                ExitCode.ERROR,
                f"unexpected answer from {self.server}: {response.status_code}, not JSON "
                f"(request id {request_id})",
            ) from None
        return Answer(
            body=body,
            request_id=request_id,
            replayed=response.headers.get("idempotent-replayed", "").lower() == "true",
            headers=dict(response.headers),
        )

    def _transport_error(
        self, error: httpx.HTTPError, method: str, idempotency_key: str | None
    ) -> OpsctlError:
        if isinstance(error, httpx.TimeoutException) and not isinstance(
            error, httpx.ConnectTimeout
        ):
            message = f"opsapi at {self.server} did not answer within {self._timeout:g}s"
            if method != "GET" and idempotency_key is not None:
                message += (
                    "; the change may or may not have been made: rerun with "
                    f"--idempotency-key {idempotency_key} to make it at most once"
                )
            return OpsctlError(ExitCode.UNREACHABLE, message)
        reason = _transport_reason(error)
        return OpsctlError(ExitCode.UNREACHABLE, f"cannot reach opsapi at {self.server}: {reason}")


def _transport_reason(error: httpx.HTTPError) -> str:
    if isinstance(error, httpx.ConnectTimeout):
        return "connection timed out"
    text = str(error) or error.__class__.__name__
    lowered = text.lower()
    if "refused" in lowered:
        return "connection refused"
    if "name or service not known" in lowered or "nodename nor servname" in lowered:
        return "unknown host"
    return text


def error_for(
    response: httpx.Response,
    method: str,
    path: str,
    token: str | None = None,
    origin: str | None = None,
) -> OpsctlError:
    """The one-line error (and exit code) for a refused request, from its problem+json body."""
    status = response.status_code
    problem: dict[str, Any] | None = None
    try:
        document = response.json()
        if isinstance(document, dict):
            problem = document
    except ValueError:
        problem = None
    detail = str(problem.get("detail") or "") if problem else ""
    detail = detail or response.reason_phrase or "no detail"
    request_id = response.headers.get("x-request-id", "")
    code = _STATUS_CODES.get(status)
    if code is None:
        code = ExitCode.SERVER_ERROR if status >= 500 else ExitCode.ERROR
    if status == 401:
        if origin == "login":
            message = (
                f"not authenticated: opsapi refused the token of your `opsctl login` (server: "
                f"{detail}): run `opsctl login` again, or check that opsapi trusts that issuer"
            )
        elif token:
            message = (
                "not authenticated: set OPSAPI_TOKEN or pass --token with a valid bearer token, "
                f"or unset it to use `opsctl login` (server: {detail})"
            )
        else:
            message = (
                "not authenticated: run `opsctl login`, or set OPSAPI_TOKEN or pass --token "
                "(no token was sent)"
            )
    elif status == 403:
        message = f"forbidden: {detail}{_token_hint(token)}"
    elif status == 404:
        if detail == "Not Found":  # Starlette's own answer: the route does not exist
            message = (
                f"not found: {method} {API_PREFIX}{path.split('?')[0]} is not a route of this "
                "opsapi (is the server older than opsctl?)"
            )
        else:
            message = f"not found: {detail}"
    elif status == 409:
        message = f"conflict: {detail}{_conflict_extra(problem or {}, detail)}"
    elif status in (400, 413, 415, 422):
        message = f"invalid: {detail}{_field_errors(problem or {}, detail)}"
    elif status >= 500:
        message = f"server error ({status}): {detail} (request id {request_id})"
    else:
        message = f"unexpected answer {status}: {detail} (request id {request_id})"
    return OpsctlError(code, message, problem)


def _conflict_extra(problem: Mapping[str, Any], detail: str) -> str:
    parts: list[str] = []
    time_left = problem.get("time_left")
    if time_left and time_left != "0s" and str(time_left) not in detail:
        parts.append(f"{time_left} left")
    failing = problem.get("failing_gates") or []
    if failing and not any(str(gate) in detail for gate in failing):
        parts.append("failing gates: " + ", ".join(str(gate) for gate in failing))
    state, weight = problem.get("state"), problem.get("current_weight")
    if state is not None and weight is not None:
        parts.append(f"rollout #{problem.get('rollout_id')} is {state} at {weight}%")
    return " (" + "; ".join(parts) + ")" if parts else ""


def _field_errors(problem: Mapping[str, Any], detail: str) -> str:
    errors = problem.get("errors")
    if not isinstance(errors, list):
        return ""
    items = [
        f"{item.get('field', '?')}: {item.get('message', '?')}"
        for item in errors
        if isinstance(item, dict) and item.get("message") != detail
    ]
    return " — " + "; ".join(items) if items else ""


def token_claims(token: str | None) -> dict[str, Any]:
    """The token's claims, decoded without verification (only to explain a refusal)."""
    if not token:
        return {}
    parts = token.strip().split(".")
    if len(parts) != 3:
        return {}
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except ValueError:
        return {}
    return claims if isinstance(claims, dict) else {}


def _token_hint(token: str | None) -> str:
    from opsapi.auth.tokens import roles_from_claims  # only when a refusal needs explaining

    claims = token_claims(token)
    subject = claims.get("sub")
    if not isinstance(subject, str):
        return ""
    claim = os.environ.get("OPSCTL_ROLES_CLAIM") or os.environ.get("OPSAPI_ROLES_CLAIM") or "roles"
    roles = sorted(role.value for role in roles_from_claims(claims, claim))
    return f" (token of {subject}, roles: {', '.join(roles) or 'none'})"
