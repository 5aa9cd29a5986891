"""The console's session: a signed cookie holding the user's bearer token and a CSRF token.

The cookie is HttpOnly (no script reads the token), SameSite=Strict (no other site's page makes
the browser send it), scoped to the console's path, Secure over HTTPS, and signed (itsdangerous)
so that it cannot be forged or altered. Every state-changing form carries the session's CSRF
token, compared in constant time; a sign-in replaces it (no session fixation).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import Request
from starlette.responses import Response

from opsapi.config import Settings

log = logging.getLogger("opsapi.console")

COOKIE = "opsapi_console"
OIDC_COOKIE = "opsapi_console_oidc"
# A session never outlives this, whatever its token says.
MAX_AGE_SECONDS = 12 * 3600
OIDC_MAX_AGE_SECONDS = 600
# Browsers drop cookies past 4096 bytes (name and attributes included).
MAX_COOKIE_BYTES = 3900
_FLASHES = 3
_FLASH_CHARS = 600


class NoSecret(Exception):
    """No key to sign sessions with (OPSAPI_CONSOLE_SECRET unset outside the embedded mode)."""


@dataclass
class Session:
    """What the cookie carries."""

    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    token: str | None = None
    expires_at: float | None = None
    flashes: list[dict[str, str]] = field(default_factory=list)

    def flash(self, kind: str, text: str, request_id: str | None = None) -> None:
        """Keep a message for the next page (the newest few)."""
        entry = {"kind": kind, "text": text[:_FLASH_CHARS]}
        if request_id:
            entry["request_id"] = request_id
        self.flashes = [*self.flashes, entry][-_FLASHES:]

    def take_flashes(self) -> list[dict[str, str]]:
        """The kept messages, forgotten once shown."""
        taken, self.flashes = self.flashes, []
        return taken

    def sign_in(self, token: str, expires_at: float | None) -> None:
        """Hold `token`; a new CSRF token, so one planted before sign-in is worthless."""
        self.token = token
        self.expires_at = expires_at
        self.csrf = secrets.token_urlsafe(32)

    def check_csrf(self, supplied: str | None) -> bool:
        """Whether `supplied` is this session's CSRF token."""
        return bool(supplied) and hmac.compare_digest(self.csrf.encode(), str(supplied).encode())


def signing_secret(settings: Settings) -> bytes:
    """OPSAPI_CONSOLE_SECRET, or in the embedded mode a key derived from the local signing key
    (shared by every process that shares that key file); NoSecret otherwise."""
    if settings.console_secret is not None:
        return settings.console_secret.get_secret_value().encode()
    if settings.jwks_url:
        raise NoSecret("console sessions need OPSAPI_CONSOLE_SECRET when tokens come from JWKS")
    from opsapi.auth.tokens import LocalSigner

    path = settings.signing_key_path
    LocalSigner.load_or_create(path)
    return hmac.new(path.read_bytes(), b"opsapi console session", hashlib.sha256).digest()


class Sessions:
    """Reads and writes the session cookies of one server."""

    def __init__(self, secret: bytes, *, path: str, secure: bool | None) -> None:
        self._serializer = URLSafeTimedSerializer(secret, salt="opsapi.console.session")
        self._oidc = URLSafeTimedSerializer(secret, salt="opsapi.console.oidc")
        self.path = path
        self._secure = secure

    def load(self, request: Request) -> Session | None:
        """The request's session, or None (no cookie, a bad signature, too old)."""
        raw = request.cookies.get(COOKIE)
        if not raw:
            return None
        try:
            data = self._serializer.loads(raw, max_age=MAX_AGE_SECONDS)
        except BadSignature:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("c"), str):
            return None
        expires_at = data.get("e")
        if isinstance(expires_at, int | float) and expires_at <= time.time():
            return Session()
        token = data.get("t")
        flashes = data.get("f")
        return Session(
            csrf=data["c"],
            token=token if isinstance(token, str) else None,
            expires_at=float(expires_at) if isinstance(expires_at, int | float) else None,
            flashes=[f for f in flashes if isinstance(f, dict)]
            if isinstance(flashes, list)
            else [],
        )

    def dumps(self, session: Session) -> str:
        """The cookie value of `session`."""
        data: dict[str, Any] = {"c": session.csrf}
        if session.token is not None:
            data["t"] = session.token
        if session.expires_at is not None:
            data["e"] = int(session.expires_at)
        if session.flashes:
            data["f"] = session.flashes
        return self._serializer.dumps(data)

    def save(self, request: Request, response: Response, session: Session) -> None:
        """Set the session cookie on `response`."""
        value = self.dumps(session)
        if len(value) > MAX_COOKIE_BYTES:
            # Messages are what can be dropped; a token too large was refused at sign-in.
            session.flashes = []
            value = self.dumps(session)
        max_age = MAX_AGE_SECONDS
        if session.expires_at is not None:
            max_age = max(0, min(max_age, int(session.expires_at - time.time())))
        response.set_cookie(
            COOKIE,
            value,
            max_age=max_age,
            path=self.path,
            secure=self.secure(request),
            httponly=True,
            samesite="strict",
        )

    def fits(self, session: Session) -> bool:
        """Whether `session` fits in a cookie browsers keep."""
        return len(self.dumps(session)) <= MAX_COOKIE_BYTES

    def clear(self, request: Request, response: Response) -> None:
        """Remove the session cookie."""
        response.delete_cookie(
            COOKIE,
            path=self.path,
            secure=self.secure(request),
            httponly=True,
            samesite="strict",
        )

    def secure(self, request: Request) -> bool:
        """Cookies are Secure when the console is reached over HTTPS."""
        if self._secure is not None:
            return self._secure
        return request.url.scheme == "https"

    # The OIDC round trip: the IdP's redirect back is a cross-site navigation, which does not
    # carry a SameSite=Strict cookie; its state travels in a short-lived Lax cookie instead.
    def save_oidc(self, request: Request, response: Response, data: dict[str, str]) -> None:
        """Keep an authorization request's state, PKCE verifier and nonce for its callback."""
        response.set_cookie(
            OIDC_COOKIE,
            self._oidc.dumps(data),
            max_age=OIDC_MAX_AGE_SECONDS,
            path=self.path + "/auth/oidc",
            secure=self.secure(request),
            httponly=True,
            samesite="lax",
        )

    def load_oidc(self, request: Request) -> dict[str, str] | None:
        """The pending authorization request, if its cookie is intact and recent."""
        raw = request.cookies.get(OIDC_COOKIE)
        if not raw:
            return None
        try:
            data = self._oidc.loads(raw, max_age=OIDC_MAX_AGE_SECONDS)
        except BadSignature:
            return None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            return None
        return {str(k): str(v) for k, v in data.items()}

    def clear_oidc(self, request: Request, response: Response) -> None:
        """Forget the pending authorization request (it is used once)."""
        response.delete_cookie(
            OIDC_COOKIE,
            path=self.path + "/auth/oidc",
            secure=self.secure(request),
            httponly=True,
            samesite="lax",
        )
