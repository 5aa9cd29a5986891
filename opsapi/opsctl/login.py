"""`opsctl login`: OIDC authorization code + PKCE through a loopback redirect, a token cache
(mode 0600) renewed with its refresh token, `logout` and `whoami`.

Why the code flow and not the device grant: every provider opsapi documents (Keycloak, Okta,
Entra ID, Google) offers it to native applications (RFC 8252), whereas the device grant is
missing from some; the browser opens on the machine running opsctl, or the URL is printed for
another browser on that machine (`--no-browser`).

Settings (environment, or `opsctl login` options): `OPSCTL_ISSUER`, `OPSCTL_CLIENT_ID`,
`OPSCTL_CLIENT_SECRET` (only for providers that give native apps one), `OPSCTL_SCOPES`,
`OPSCTL_BEARER` (`id_token` or `access_token`: which token opsctl sends to opsapi),
`OPSCTL_REDIRECT_PORT`, `OPSCTL_AUTH_PARAMS` (extra authorization request parameters),
`OPSCTL_ROLES_CLAIM` (for `whoami`; default `OPSAPI_ROLES_CLAIM`, then `roles`).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import html
import ipaddress
import json
import os
import secrets
import tempfile
import threading
import time
import webbrowser
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

import httpx

from opsapi.auth.identity import IMPLIED_ROLES, Role
from opsapi.opsctl.client import ExitCode, OpsctlError

CACHE_NAME: Final = "credentials.json"
LOCK_NAME: Final = "credentials.lock"
DEFAULT_SCOPES: Final = "openid profile email offline_access"
BEARERS: Final = ("id_token", "access_token")
CALLBACK_PATH: Final = "/callback"
# A token is renewed this long before it expires (a request must not carry a token that
# expires on the way), but never earlier than a quarter into its life.
REFRESH_MARGIN_SECONDS: Final = 30.0
_CACHE_VERSION: Final = 1


def config_dir(environ: Mapping[str, str] | None = None) -> Path:
    """`$XDG_CONFIG_HOME/opsctl`, or `~/.config/opsctl` (XDG: a relative value is ignored)."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".config"
    return root / "opsctl"


def cache_path(environ: Mapping[str, str] | None = None) -> Path:
    """Where `opsctl login` keeps the tokens."""
    return config_dir(environ) / CACHE_NAME


def roles_claim(environ: Mapping[str, str] | None = None) -> str:
    """The claim `whoami` reads roles from: OPSCTL_ROLES_CLAIM, else the server's setting."""
    environ = os.environ if environ is None else environ
    return environ.get("OPSCTL_ROLES_CLAIM") or environ.get("OPSAPI_ROLES_CLAIM") or "roles"


def jwt_claims(token: str | None) -> dict[str, Any]:
    """A JWT's claims, decoded without verifying it (opsapi verifies; this only describes)."""
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


def opsapi_roles(claims: Mapping[str, Any], claim: str) -> tuple[list[str], list[str]]:
    """The roles opsapi grants for `claims` (as the server maps them) and the roles they imply."""
    # Imported here: it brings the JOSE library, which only this and a refusal need (every
    # opsctl command pays for what is imported at start).
    from opsapi.auth.tokens import roles_from_claims

    granted = roles_from_claims(claims, claim)
    implied = {role for held in granted for role in IMPLIED_ROLES[held]} - set(granted)
    order = list(Role)
    return (
        [role.value for role in sorted(granted, key=order.index)],
        [role.value for role in sorted(implied, key=order.index)],
    )


# ---------------------------------------------------------------------------------------------
# Settings and discovery


@dataclass(frozen=True)
class LoginSettings:
    """What `opsctl login` needs to know about the identity provider and the client."""

    issuer: str
    client_id: str
    client_secret: str | None = None
    scopes: str = DEFAULT_SCOPES
    bearer: str = "id_token"
    redirect_port: int = 0
    auth_params: dict[str, str] = field(default_factory=dict)
    timeout: float = 10.0


def parse_auth_params(raw: str | None) -> dict[str, str]:
    """`OPSCTL_AUTH_PARAMS` ("access_type=offline&prompt=consent") as a dict."""
    if not raw:
        return {}
    try:
        pairs = parse_qsl(raw, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise OpsctlError(
            ExitCode.USAGE, "OPSCTL_AUTH_PARAMS must look like name=value&name=value"
        ) from None
    reserved = {"client_id", "redirect_uri", "state", "nonce", "code_challenge",
                "code_challenge_method", "response_type", "scope"}  # fmt: skip
    clash = sorted(name for name, _ in pairs if name in reserved)
    if clash:
        raise OpsctlError(
            ExitCode.USAGE, f"OPSCTL_AUTH_PARAMS may not set {', '.join(clash)} (opsctl does)"
        )
    return dict(pairs)


def _is_loopback(host: str | None) -> bool:
    if host is None or host == "localhost":
        return host is not None
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_url(url: str, what: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "https" or (parts.scheme == "http" and _is_loopback(parts.hostname)):
        return url
    raise OpsctlError(
        ExitCode.USAGE,
        f"{what} must be an https:// URL (plain http only on this machine's loopback): {url}",
    )


def discover(issuer: str, timeout: float) -> dict[str, Any]:
    """The provider's OpenID configuration from `{issuer}/.well-known/openid-configuration`."""
    _check_url(issuer, "OPSCTL_ISSUER")
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    try:
        response = httpx.get(url, timeout=timeout, headers={"Accept": "application/json"})
    except httpx.HTTPError as error:
        raise OpsctlError(
            ExitCode.UNREACHABLE,
            f"cannot reach the identity provider at {issuer}: {type(error).__name__}",
        ) from None
    if response.status_code != 200:
        raise OpsctlError(
            ExitCode.ERROR,
            f"{url} answered {response.status_code}: is OPSCTL_ISSUER the issuer URL?",
        )
    try:
        document = response.json()
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise OpsctlError(ExitCode.ERROR, f"{url} is not an OpenID configuration document")
    # OpenID Connect Discovery §4.3: the document must name the issuer it was asked for.
    if str(document.get("issuer", "")).rstrip("/") != issuer.rstrip("/"):
        raise OpsctlError(
            ExitCode.ERROR,
            f"the identity provider at {issuer} names another issuer "
            f"({document.get('issuer')!r}): set OPSCTL_ISSUER to exactly that",
        )
    for key in ("authorization_endpoint", "token_endpoint"):
        if not isinstance(document.get(key), str):
            raise OpsctlError(ExitCode.ERROR, f"the OpenID configuration at {url} has no {key}")
        _check_url(document[key], key)
    return document


# ---------------------------------------------------------------------------------------------
# The token cache


@dataclass
class CachedLogin:
    """What `opsctl login` stored: the provider, the client, and the token set."""

    issuer: str
    client_id: str
    token_endpoint: str
    bearer: str
    token: dict[str, Any]
    client_secret: str | None = None
    logged_in_at: float = 0.0

    @property
    def bearer_token(self) -> str | None:
        """The token opsctl sends to opsapi."""
        value = self.token.get(self.bearer)
        return value if isinstance(value, str) and value else None

    @property
    def claims(self) -> dict[str, Any]:
        """The bearer token's claims (an opaque token has none)."""
        return jwt_claims(self.bearer_token)

    @property
    def expires_at(self) -> float | None:
        """When the bearer token expires: its `exp`, else the token answer's `expires_at`."""
        exp = self.claims.get("exp") if self.bearer_token else None
        if isinstance(exp, int | float) and not isinstance(exp, bool):
            return float(exp)
        if self.bearer != "access_token":
            return None
        expires_at = self.token.get("expires_at")
        return float(expires_at) if isinstance(expires_at, int | float) else None

    def needs_refresh(self, now: float) -> bool:
        """Whether the bearer token is missing, expired, or about to expire."""
        if self.bearer_token is None:
            return True
        expires_at = self.expires_at
        if expires_at is None:
            return False
        issued = self.claims.get("iat")
        life = expires_at - float(issued) if isinstance(issued, int | float) else None
        margin = REFRESH_MARGIN_SECONDS if life is None else min(REFRESH_MARGIN_SECONDS, life / 4)
        return now >= expires_at - margin

    def document(self) -> dict[str, Any]:
        """The cache file's JSON."""
        document: dict[str, Any] = {
            "version": _CACHE_VERSION,
            "issuer": self.issuer,
            "client_id": self.client_id,
            "token_endpoint": self.token_endpoint,
            "bearer": self.bearer,
            "logged_in_at": self.logged_in_at,
            "token": self.token,
        }
        if self.client_secret:
            document["client_secret"] = self.client_secret
        return document

    @classmethod
    def from_document(cls, document: Any) -> CachedLogin | None:
        """The login a cache file holds; None when it is not one opsctl wrote."""
        if not isinstance(document, dict) or document.get("version") != _CACHE_VERSION:
            return None
        try:
            login = cls(
                issuer=str(document["issuer"]),
                client_id=str(document["client_id"]),
                token_endpoint=str(document["token_endpoint"]),
                bearer=str(document["bearer"]),
                token=dict(document["token"]),
                client_secret=document.get("client_secret") or None,
                logged_in_at=float(document.get("logged_in_at") or 0.0),
            )
        except (KeyError, TypeError, ValueError):
            return None
        return login if login.bearer in BEARERS else None


def load(path: Path) -> CachedLogin | None:
    """The cached login at `path`, or None (absent, unreadable or not opsctl's)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as error:
        raise OpsctlError(ExitCode.ERROR, f"cannot read {path}: {error.strerror}") from None
    try:
        return CachedLogin.from_document(json.loads(text))
    except ValueError:
        return None


def save(path: Path, login: CachedLogin) -> None:
    """Write the cache atomically, readable by its owner only (directory 0700, file 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # mkstemp creates the file 0600, so the tokens are never readable by others, and
    # os.replace leaves either the old cache or the new one, never half of one.
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(login.document(), out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(name, 0o600)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """One opsctl at a time renews or replaces the login (a refresh token may be single-use)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def remove(path: Path) -> bool:
    """Delete the cache (logout); whether there was one."""
    with locked(path.parent):
        try:
            path.unlink()
        except FileNotFoundError:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Renewing


def _oauth() -> tuple[Any, type[Exception]]:
    """authlib's OAuth 2 client and error classes, imported only when a login or a renewal
    needs them (they take longer to import than the rest of opsctl)."""
    from authlib.integrations.base_client.errors import (  # type: ignore[import-untyped]
        OAuthError,
    )
    from authlib.integrations.httpx_client import OAuth2Client  # type: ignore[import-untyped]

    return OAuth2Client, OAuthError


def _oauth_reason(error: Exception) -> str:
    """An OAuth error answer as "code (description)", as short as the provider made it."""
    code = str(getattr(error, "error", "") or "error")
    description = getattr(error, "description", None)
    return f"{code} ({str(description)[:200]})" if description else code


def _oauth_client(login: CachedLogin, timeout: float) -> Any:
    oauth2_client, _ = _oauth()
    return oauth2_client(
        client_id=login.client_id,
        client_secret=login.client_secret,
        token_endpoint_auth_method="client_secret_basic" if login.client_secret else "none",
        timeout=timeout,
    )


def _login_again(reason: str) -> OpsctlError:
    return OpsctlError(ExitCode.UNAUTHENTICATED, f"{reason}: run `opsctl login`")


def refresh(path: Path, *, timeout: float = 10.0, now: Callable[[], float] = time.time) -> str:
    """The cached bearer token, renewed with the refresh token when it is (about to be)
    expired; the cache is rewritten with what the provider answered."""
    login = load(path)
    if login is None:
        raise _login_again("not logged in")
    if not login.needs_refresh(now()):
        return str(login.bearer_token)
    with locked(path.parent):
        login = load(path)  # another opsctl may have renewed it while this one waited
        if login is None:
            raise _login_again("not logged in")
        if not login.needs_refresh(now()):
            return str(login.bearer_token)
        _, oauth_error = _oauth()
        refresh_token = login.token.get("refresh_token")
        if not isinstance(refresh_token, str) or not refresh_token:
            raise _login_again(
                f"your login to {login.issuer} has expired and the provider gave no refresh token"
            )
        try:
            with _oauth_client(login, timeout) as client:
                renewed = client.refresh_token(login.token_endpoint, refresh_token=refresh_token)
            answer = dict(renewed)
        except oauth_error as error:
            # invalid_grant: the refresh token expired, was revoked, or was used already.
            raise _login_again(
                f"your login to {login.issuer} could not be renewed ({_oauth_reason(error)})"
            ) from None
        except httpx.HTTPError as error:
            raise OpsctlError(
                ExitCode.UNREACHABLE,
                f"cannot reach the identity provider at {login.issuer} to renew your login: "
                f"{type(error).__name__}",
            ) from None
        except ValueError:
            raise OpsctlError(
                ExitCode.ERROR,
                f"the identity provider at {login.issuer} answered the renewal with something "
                "other than a token",
            ) from None
        previous = login.token
        login.token = {**answer, "refresh_token": answer.get("refresh_token") or refresh_token}
        if login.bearer == "id_token" and not answer.get("id_token"):
            # OpenID Connect Core §12.2 lets a provider renew without a new ID token; the old
            # one stays expired, so only a new login helps.
            login.token["id_token"] = previous.get("id_token")
            save(path, login)
            raise _login_again(
                f"{login.issuer} renewed your login without a new ID token (OPSCTL_BEARER="
                "access_token uses the access token instead, if the provider issues JWTs for "
                "opsapi)"
            )
        save(path, login)
        if login.bearer_token is None:
            raise _login_again(f"{login.issuer} renewed your login without a {login.bearer}")
        return login.bearer_token


# ---------------------------------------------------------------------------------------------
# Logging in


@dataclass
class _Callback:
    """What the browser brought back to the loopback redirect."""

    state: str
    code: str | None = None
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


def _page(title: str, text: str) -> bytes:
    return (
        "<!doctype html><meta charset=utf-8><title>opsctl</title>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(text)}</p>"
    ).encode()


def _handler(callback: _Callback) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            if parts.path != CALLBACK_PATH:
                self._answer(404, _page("Not found", "This is opsctl's login redirect."))
                return
            query = dict(parse_qsl(parts.query))
            # Anything without this login's state is someone else's request: ignored, and the
            # login keeps waiting for its own. Some providers leave the state out of an error
            # redirect (RFC 6749 §4.1.2.1 says they must not); such an answer can only end the
            # login as refused, never complete it, so it is believed.
            stateless_error = "state" not in query and bool(query.get("error"))
            if not stateless_error and not secrets.compare_digest(
                query.get("state", ""), callback.state
            ):
                self._answer(400, _page("Not this login", "The state does not match: ignored."))
                return
            if callback.done.is_set():
                self._answer(400, _page("Already done", "This login has finished."))
                return
            if query.get("error"):
                callback.error = query["error"]
                description = query.get("error_description")
                if description:
                    callback.error += f": {description[:200]}"
                self._answer(200, _page("Login refused", f"{callback.error}. Close this window."))
            elif query.get("code"):
                callback.code = query["code"]
                self._answer(200, _page("Logged in", "You can close this window."))
            else:
                self._answer(400, _page("No code", "The redirect carried no code."))
                return
            callback.done.set()

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the URL carries the authorization code: never printed

    return Handler


def _loopback(port: int, callback: _Callback) -> HTTPServer:
    try:
        return HTTPServer(("127.0.0.1", port), _handler(callback))
    except OSError as error:
        raise OpsctlError(
            ExitCode.ERROR,
            f"cannot listen on 127.0.0.1:{port} for the login redirect: {error.strerror}",
        ) from None


def _check_id_token(claims: Mapping[str, Any], issuer: str, client_id: str, nonce: str) -> None:
    """The ID token's issuer, audience and nonce (OpenID Connect Core §3.1.3.7). Its signature
    is opsapi's to verify: opsctl received it straight from the token endpoint over TLS."""
    audience = claims.get("aud")
    audiences = audience if isinstance(audience, list) else [audience]
    problems = []
    if str(claims.get("iss", "")).rstrip("/") != issuer.rstrip("/"):
        problems.append(f"issuer {claims.get('iss')!r} is not {issuer!r}")
    if client_id not in audiences:
        problems.append(f"audience {audience!r} does not include {client_id!r}")
    if claims.get("nonce") != nonce:
        problems.append("its nonce is not this login's")
    if problems:
        raise OpsctlError(
            ExitCode.UNAUTHENTICATED, "the ID token is not for this login: " + "; ".join(problems)
        )


def login(
    settings: LoginSettings,
    path: Path,
    *,
    open_browser: bool,
    wait_seconds: float,
    announce: Callable[[str], None],
) -> CachedLogin:
    """Log in through the browser and cache the tokens; answers the cached login."""
    if settings.bearer not in BEARERS:
        raise OpsctlError(ExitCode.USAGE, "OPSCTL_BEARER must be id_token or access_token")
    configuration = discover(settings.issuer, settings.timeout)
    issuer = str(configuration["issuer"])
    callback = _Callback(state=secrets.token_urlsafe(32))
    server = _loopback(settings.redirect_port, callback)
    redirect_uri = f"http://127.0.0.1:{server.server_address[1]}{CALLBACK_PATH}"
    login = CachedLogin(
        issuer=issuer,
        client_id=settings.client_id,
        token_endpoint=str(configuration["token_endpoint"]),
        bearer=settings.bearer,
        token={},
        client_secret=settings.client_secret,
    )
    _, oauth_error = _oauth()
    nonce = secrets.token_urlsafe(32)
    verifier = secrets.token_urlsafe(64)  # PKCE (RFC 7636): 86 characters
    client = _oauth_client(login, settings.timeout)
    client.redirect_uri = redirect_uri
    client.scope = settings.scopes
    client.code_challenge_method = "S256"
    with client, _closing(server):
        url, _ = client.create_authorization_url(
            configuration["authorization_endpoint"],
            state=callback.state,
            code_verifier=verifier,
            nonce=nonce,
            **settings.auth_params,
        )
        thread = threading.Thread(target=_serve, args=(server, callback, wait_seconds))
        thread.daemon = True
        thread.start()
        opened = open_browser and webbrowser.open(url)
        announce(
            ("A browser window opened to log in. If it did not, open this URL:\n" if opened
             else "Open this URL in a browser on this machine to log in:\n") + f"\n    {url}\n"
        )  # fmt: skip
        if not callback.done.wait(wait_seconds):
            raise OpsctlError(
                ExitCode.UNAUTHENTICATED,
                f"no login within {wait_seconds:g}s: the browser never came back to {redirect_uri}",
            )
        if callback.error or not callback.code:
            raise OpsctlError(
                ExitCode.UNAUTHENTICATED,
                f"the identity provider refused the login: {callback.error or 'no code'}",
            )
        try:
            token = dict(
                client.fetch_token(
                    login.token_endpoint,
                    grant_type="authorization_code",
                    code=callback.code,
                    code_verifier=verifier,
                )
            )
        except oauth_error as error:
            raise OpsctlError(
                ExitCode.UNAUTHENTICATED,
                f"the identity provider refused the code: {_oauth_reason(error)}",
            ) from None
        except httpx.HTTPError as error:
            raise OpsctlError(
                ExitCode.UNREACHABLE,
                f"cannot reach the token endpoint {login.token_endpoint}: {type(error).__name__}",
            ) from None
    id_token = token.get("id_token")
    if isinstance(id_token, str) and id_token:
        _check_id_token(jwt_claims(id_token), issuer, settings.client_id, nonce)
    login.token = token
    login.logged_in_at = time.time()
    if login.bearer_token is None:
        hint = " (is openid in OPSCTL_SCOPES?)" if settings.bearer == "id_token" else ""
        raise OpsctlError(
            ExitCode.UNAUTHENTICATED, f"the identity provider issued no {settings.bearer}{hint}"
        )
    with locked(path.parent):
        save(path, login)
    return login


@contextlib.contextmanager
def _closing(server: HTTPServer) -> Iterator[HTTPServer]:
    try:
        yield server
    finally:
        server.server_close()


def _serve(server: HTTPServer, callback: _Callback, wait_seconds: float) -> None:
    server.timeout = 0.2
    deadline = time.monotonic() + wait_seconds
    while not callback.done.is_set() and time.monotonic() < deadline:
        server.handle_request()


__all__ = [
    "CachedLogin",
    "LoginSettings",
    "cache_path",
    "config_dir",
    "discover",
    "jwt_claims",
    "load",
    "login",
    "opsapi_roles",
    "parse_auth_params",
    "refresh",
    "remove",
    "roles_claim",
]
