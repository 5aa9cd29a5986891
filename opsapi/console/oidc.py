"""Console sign-in through the organisation's OIDC provider: authorization code with PKCE.

authlib's httpx client builds the authorization request (S256 code challenge, state, nonce) and
exchanges the code. The token the console keeps is one the API itself accepts: the access token
when the server's verifier (OPSAPI_JWKS_URL, issuer, audience) accepts it, else the ID token
(providers whose access tokens are opaque, with OPSAPI_JWT_AUDIENCE set to the client id). The
console never trusts a token the API would refuse.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx
from authlib.common.security import generate_token, is_secure_transport  # type: ignore[import-untyped]
from authlib.integrations.httpx_client import AsyncOAuth2Client  # type: ignore[import-untyped]

from opsapi.auth.identity import AuthError, Identity
from opsapi.auth.tokens import TokenVerifier
from opsapi.config import Settings

log = logging.getLogger("opsapi.console")

_DISCOVERY_SECONDS = 3600
_TIMEOUT_SECONDS = 5.0


class SignInFailed(Exception):
    """The round trip did not yield a token the API accepts (the message is safe to show)."""


@dataclass(frozen=True)
class Provider:
    """The provider's endpoints, from its discovery document."""

    authorization_endpoint: str
    token_endpoint: str
    token_auth_methods: tuple[str, ...]


@dataclass(frozen=True)
class Pending:
    """An authorization request in flight: where to send the browser, what to keep."""

    url: str
    state: str
    code_verifier: str
    nonce: str


@dataclass(frozen=True)
class SignedIn:
    """The outcome of a callback: the token to hold and who it names."""

    token: str
    identity: Identity
    expires_at: float | None
    kind: str  # "access_token" or "id_token"


class Oidc:
    """The configured provider (OPSAPI_OIDC_ISSUER, OPSAPI_OIDC_CLIENT_ID, …)."""

    def __init__(self, settings: Settings) -> None:
        assert settings.oidc_issuer is not None
        self.issuer = settings.oidc_issuer.rstrip("/")
        self.client_id = settings.oidc_client_id
        secret = settings.oidc_client_secret
        self.client_secret = secret.get_secret_value() if secret is not None else None
        self.scope = settings.oidc_scope
        self._provider: Provider | None = None
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()

    def problem(self) -> str | None:
        """Why sign-in cannot work with these settings, or None."""
        if not self.client_id:
            return "OPSAPI_OIDC_ISSUER is set but OPSAPI_OIDC_CLIENT_ID is not"
        if not is_secure_transport(self.issuer):
            return "OPSAPI_OIDC_ISSUER must be an https:// URL (http only on loopback)"
        return None

    async def provider(self) -> Provider:
        """The discovery document's endpoints (cached for an hour)."""
        async with self._lock:
            if self._provider and time.monotonic() - self._fetched_at < _DISCOVERY_SECONDS:
                return self._provider
            url = self.issuer + "/.well-known/openid-configuration"
            try:
                async with httpx.AsyncClient(timeout=_TIMEOUT_SECONDS) as client:
                    response = await client.get(url, headers={"Accept": "application/json"})
                response.raise_for_status()
                document = response.json()
                provider = Provider(
                    authorization_endpoint=str(document["authorization_endpoint"]),
                    token_endpoint=str(document["token_endpoint"]),
                    token_auth_methods=tuple(
                        document.get("token_endpoint_auth_methods_supported")
                        or ("client_secret_basic",)
                    ),
                )
            except Exception as error:
                log.warning("OIDC discovery at %s failed: %s", url, type(error).__name__)
                raise SignInFailed("the identity provider is unavailable") from None
            for endpoint in (provider.authorization_endpoint, provider.token_endpoint):
                if not is_secure_transport(endpoint):
                    raise SignInFailed("the identity provider's endpoints are not https")
            self._provider, self._fetched_at = provider, time.monotonic()
            return provider

    def _client(self, provider: Provider, redirect_uri: str) -> Any:
        if self.client_secret is None:
            method = "none"  # a public client: PKCE alone binds the code to this browser
        elif "client_secret_basic" in provider.token_auth_methods:
            method = "client_secret_basic"
        else:
            method = "client_secret_post"
        return AsyncOAuth2Client(
            client_id=self.client_id,
            client_secret=self.client_secret,
            token_endpoint_auth_method=method,
            scope=self.scope,
            redirect_uri=redirect_uri,
            code_challenge_method="S256",
            timeout=_TIMEOUT_SECONDS,
        )

    async def begin(self, redirect_uri: str) -> Pending:
        """A new authorization request (state, PKCE verifier, nonce) for the browser."""
        provider = await self.provider()
        verifier = generate_token(64)
        nonce = generate_token(32)
        async with self._client(provider, redirect_uri) as client:
            url, state = client.create_authorization_url(
                provider.authorization_endpoint, code_verifier=verifier, nonce=nonce
            )
        return Pending(url=url, state=state, code_verifier=verifier, nonce=nonce)

    async def finish(
        self,
        *,
        pending: dict[str, str],
        state: str | None,
        code: str | None,
        redirect_uri: str,
        verifier: TokenVerifier,
    ) -> SignedIn:
        """Check the state, exchange the code (with the PKCE verifier) and keep the token the
        API accepts."""
        if not state or not hmac.compare_digest(state.encode(), pending["state"].encode()):
            raise SignInFailed("the sign-in answer does not match a request of this browser")
        if not code:
            raise SignInFailed("the identity provider returned no authorization code")
        provider = await self.provider()
        try:
            async with self._client(provider, redirect_uri) as client:
                tokens = await client.fetch_token(
                    provider.token_endpoint,
                    grant_type="authorization_code",
                    code=code,
                    code_verifier=pending["code_verifier"],
                )
        except Exception as error:
            log.warning("OIDC code exchange failed: %s", type(error).__name__)
            raise SignInFailed("the identity provider refused the sign-in") from None
        for kind in ("access_token", "id_token"):
            token = tokens.get(kind)
            if not isinstance(token, str) or token.count(".") != 2:
                continue  # opaque: not something the API can verify
            try:
                identity = await verifier.verify(token)
            except AuthError:
                continue
            claims = _claims(token)
            if kind == "id_token" and claims.get("nonce") != pending["nonce"]:
                raise SignInFailed("the ID token does not belong to this sign-in (nonce)")
            expires = claims.get("exp")
            return SignedIn(
                token=token,
                identity=identity,
                expires_at=float(expires) if isinstance(expires, int | float) else None,
                kind=kind,
            )
        raise SignInFailed(
            "the identity provider's tokens are not accepted by this server: check "
            "OPSAPI_JWKS_URL, OPSAPI_JWT_ISSUER and OPSAPI_JWT_AUDIENCE"
        )


def _claims(token: str) -> dict[str, Any]:
    """The payload of a token the verifier already accepted."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}
