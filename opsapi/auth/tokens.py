"""Bearer-token verification (OIDC JWKS or the embedded local key) and role mapping."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import secrets
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final, Protocol

import httpx
from joserfc import jwt
from joserfc.errors import (
    BadSignatureError,
    ExpiredTokenError,
    InvalidClaimError,
    InvalidKeyIdError,
    JoseError,
    KeyParameterError,
    MissingAlgorithmError,
    MissingClaimError,
    UnsupportedAlgorithmError,
)
from joserfc.jwk import ECKey, KeySet

from opsapi.auth.identity import AuthError, Identity, Role

__all__ = [
    "ALLOWED_ALGORITHMS",
    "LOCAL_AUDIENCE",
    "LOCAL_ISSUER",
    "JwksVerifier",
    "LocalSigner",
    "TokenVerifier",
    "roles_from_claims",
]

logger = logging.getLogger(__name__)

# Asymmetric only: with an HMAC algorithm allowed, anyone holding the (public) verification
# key could mint tokens, and "none" needs no key at all.
ALLOWED_ALGORITHMS: Final[list[str]] = [
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
]

LOCAL_ISSUER: Final = "opsapi-local"
LOCAL_AUDIENCE: Final = "opsapi"

_DEFAULT_LEEWAY_SECONDS: Final = 30

_ROLE_PREFIX = re.compile(r"^opsapi[:\-]", re.IGNORECASE)
_ROLE_SEPARATORS = re.compile(r"[\s,]+")
_ROLES_BY_NAME: Final = {role.value: role for role in Role}

# Messages for claim failures; claim names come from our own registry, never from the token.
_CLAIM_MESSAGES: Final = {
    "iss": "invalid issuer",
    "aud": "invalid audience",
    "nbf": "token not yet valid",
    "iat": "token not yet valid",  # joserfc rejects an iat later than now + leeway
    "sub": "invalid subject",
    "exp": "invalid claim: exp",
    "jti": "invalid claim: jti",
}


class TokenVerifier(Protocol):
    """Turns a bearer token into an Identity, or raises AuthError with a client-safe message."""

    async def verify(self, token: str) -> Identity:
        """Verify `token` and return who it identifies."""
        ...


def roles_from_claims(claims: Mapping[str, Any], roles_claim: str) -> frozenset[Role]:
    """Map the roles claim (list or space/comma separated string, dotted path) to known roles."""
    value: Any
    # A literal key wins so that namespaced claims such as "https://example.com/roles"
    # (which contain dots) still work; otherwise the dots navigate nested objects.
    if roles_claim in claims:
        value = claims[roles_claim]
    else:
        value = claims
        for part in roles_claim.split("."):
            if not isinstance(value, Mapping) or part not in value:
                return frozenset()
            value = value[part]

    if isinstance(value, str):
        names: Iterable[Any] = _ROLE_SEPARATORS.split(value)
    elif isinstance(value, list | tuple):
        names = value
    else:
        return frozenset()

    roles: set[Role] = set()
    for name in names:
        if not isinstance(name, str):
            continue
        role = _ROLES_BY_NAME.get(_ROLE_PREFIX.sub("", name.strip()).lower())
        if role is not None:
            roles.add(role)
    return frozenset(roles)


class _UnknownSigningKeyError(Exception):
    """The token names a key that the key set in hand does not hold."""


class _TokenRules:
    """The checks shared by every verifier: signature, algorithm and registered claims."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        roles_claim: str,
        leeway_seconds: int,
        clock: Callable[[], float],
    ) -> None:
        self._roles_claim = roles_claim
        self._claims = jwt.JWTClaimsRegistry(
            now=lambda: math.floor(clock()),
            leeway=leeway_seconds,
            iss={"essential": True, "value": issuer},
            aud={"essential": True, "value": audience},
            exp={"essential": True},
            sub={"essential": True},
        )

    def identity(self, token: str, keys: KeySet) -> Identity:
        """Verify `token` against `keys`; raise _UnknownSigningKeyError or AuthError."""
        if not isinstance(token, str) or not token:
            raise AuthError("malformed token")
        try:
            claims = jwt.decode(token, keys, algorithms=ALLOWED_ALGORITHMS).claims
            self._claims.validate(claims)
        except InvalidKeyIdError:
            raise _UnknownSigningKeyError from None
        except JoseError as error:
            logger.debug("token rejected: %s", error)
            raise AuthError(_message_for(error)) from None
        except Exception as error:
            # joserfc lets some parsing errors of hostile input escape as plain
            # ValueError/TypeError/...; a caller must only ever see AuthError.
            logger.debug("token rejected: %s", type(error).__name__)
            raise AuthError("malformed token") from None
        return Identity(subject=claims["sub"], roles=roles_from_claims(claims, self._roles_claim))


def _message_for(error: JoseError) -> str:
    if isinstance(error, ExpiredTokenError):
        return "token expired"
    if isinstance(error, MissingClaimError):
        return f"missing claim: {error.claim}"
    if isinstance(error, InvalidClaimError):
        return _CLAIM_MESSAGES.get(error.claim, "invalid claims")
    if isinstance(error, UnsupportedAlgorithmError | MissingAlgorithmError):
        return "unsupported algorithm"
    if isinstance(error, BadSignatureError | KeyParameterError):
        # KeyParameterError: the named key cannot be used with the token's algorithm.
        return "invalid signature"
    return "malformed token"


class _KeySetVerifier:
    """A TokenVerifier over a fixed key set (used by the embedded local mode)."""

    def __init__(self, keys: KeySet, rules: _TokenRules) -> None:
        self._keys = keys
        self._rules = rules

    async def verify(self, token: str) -> Identity:
        """Verify `token` against the fixed key set."""
        try:
            return self._rules.identity(token, self._keys)
        except _UnknownSigningKeyError:
            raise AuthError("unknown signing key") from None


class _JwksFetchError(Exception):
    """The JWKS could not be fetched or parsed."""


class JwksVerifier:
    """Verifies tokens of an OIDC provider against its JWKS, fetched and cached over HTTP."""

    def __init__(
        self,
        *,
        jwks_url: str,
        issuer: str,
        audience: str,
        roles_claim: str = "roles",
        cache_seconds: float = 300,
        min_refetch_seconds: float = 10,
        leeway_seconds: int = _DEFAULT_LEEWAY_SECONDS,
        http_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
        max_stale_seconds: float = 3600,
    ) -> None:
        self._jwks_url = jwks_url
        self._cache_seconds = cache_seconds
        self._min_refetch_seconds = min_refetch_seconds
        self._max_stale_seconds = max_stale_seconds
        self._http_timeout = http_timeout
        self._clock = clock
        self._rules = _TokenRules(
            issuer=issuer,
            audience=audience,
            roles_claim=roles_claim,
            leeway_seconds=leeway_seconds,
            clock=clock,
        )
        self._keys: KeySet | None = None
        self._fetched_at = -math.inf
        self._attempted_at = -math.inf
        # One lock so that concurrent requests share a single fetch instead of each fetching.
        self._lock = asyncio.Lock()

    async def verify(self, token: str) -> Identity:
        """Verify `token` against the provider's keys, refetching once for an unknown `kid`."""
        keys = await self._current_keys()
        try:
            return self._rules.identity(token, keys)
        except _UnknownSigningKeyError:
            pass
        keys = await self._keys_after_unknown_kid(keys)
        try:
            return self._rules.identity(token, keys)
        except _UnknownSigningKeyError:
            raise AuthError("unknown signing key") from None

    async def _current_keys(self) -> KeySet:
        keys = self._keys
        if keys is not None and self._clock() - self._fetched_at < self._cache_seconds:
            return keys
        async with self._lock:
            now = self._clock()
            if self._keys is not None and now - self._fetched_at < self._cache_seconds:
                return self._keys  # refreshed by another request while we waited
            # A failing provider is retried at most every min_refetch_seconds, not per request.
            if now - self._attempted_at >= self._min_refetch_seconds:
                try:
                    return await self._fetch()
                except _JwksFetchError:
                    pass
            # Keep serving keys we already trust through a provider outage, for a bounded time,
            # so that operators can still act (e.g. roll back) while the IdP is flaky.
            if self._keys is not None and now - self._fetched_at < self._max_stale_seconds:
                return self._keys
            raise AuthError("identity provider unavailable")

    async def _keys_after_unknown_kid(self, seen: KeySet) -> KeySet:
        async with self._lock:
            if self._keys is not None and self._keys is not seen:
                return self._keys  # another request already refetched
            # Rate-limited so that tokens with random kids cannot make us hammer the provider.
            if self._clock() - self._attempted_at < self._min_refetch_seconds:
                return seen
            try:
                return await self._fetch()
            except _JwksFetchError:
                raise AuthError("identity provider unavailable") from None

    async def _fetch(self) -> KeySet:
        """Fetch the JWKS; the caller holds the lock."""
        self._attempted_at = self._clock()
        try:
            async with httpx.AsyncClient(timeout=self._http_timeout) as client:
                response = await client.get(self._jwks_url, headers={"Accept": "application/json"})
            response.raise_for_status()
            keys = KeySet.import_key_set(response.json())
        except Exception as error:
            # Any failure (network, HTTP status, JSON, key import) means the same thing here.
            logger.warning(
                "JWKS fetch from %s failed: %s: %s", self._jwks_url, type(error).__name__, error
            )
            raise _JwksFetchError from None
        self._keys = keys
        self._fetched_at = self._clock()
        logger.info("JWKS fetched from %s (%d keys)", self._jwks_url, len(keys.keys))
        return keys


class LocalSigner:
    """The embedded mode's own ES256 signing key, kept as a private JWK file."""

    def __init__(self, key: ECKey) -> None:
        if not key.is_private or key.kid is None or key.curve_name != "P-256":
            raise ValueError("LocalSigner needs a private P-256 EC key with a kid")
        self._key = key
        self._public = KeySet([ECKey.import_key(key.as_dict(private=False))])

    @property
    def kid(self) -> str:
        """The key id put in every minted token's header."""
        kid = self._key.kid
        assert kid is not None
        return kid

    @classmethod
    def load_or_create(cls, path: Path) -> LocalSigner:
        """Load the key at `path`, generating and storing a new one (mode 0600) if absent."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls._create(path)
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            logger.warning("signing key %s is accessible to others (mode %o)", path, mode)
        key = ECKey.import_key(json.loads(text))
        return cls(key)

    @classmethod
    def _create(cls, path: Path) -> LocalSigner:
        key = ECKey.generate_key(
            "P-256",
            parameters={"kid": secrets.token_urlsafe(16), "alg": "ES256", "use": "sig"},
        )
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # mkstemp creates the file 0600, so the private key is never readable by others,
        # and os.replace makes a crash leave either no key file or a complete one.
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as tmp:
                json.dump(key.as_dict(private=True), tmp)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.chmod(tmp_name, 0o600)
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        logger.info("generated local signing key %s (kid %s)", path, key.kid)
        return cls(key)

    def mint(
        self,
        *,
        subject: str,
        roles: Iterable[Role | str],
        ttl_seconds: int = 8 * 3600,
        now: float | None = None,
    ) -> str:
        """Sign a token for `subject` with `roles`, valid for `ttl_seconds` from `now`."""
        issued = math.floor(time.time() if now is None else now)
        claims = {
            "iss": LOCAL_ISSUER,
            "aud": LOCAL_AUDIENCE,
            "sub": subject,
            "iat": issued,
            "nbf": issued,
            "exp": issued + ttl_seconds,
            # Role(...) rejects unknown names: minting a role nobody checks is a caller bug.
            "roles": sorted({Role(role).value for role in roles}),
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(
            {"alg": "ES256", "kid": self.kid}, claims, self._key, algorithms=["ES256"]
        )

    def verifier(self, *, clock: Callable[[], float] = time.time) -> TokenVerifier:
        """A verifier accepting tokens minted with this key (same rules as JwksVerifier)."""
        rules = _TokenRules(
            issuer=LOCAL_ISSUER,
            audience=LOCAL_AUDIENCE,
            roles_claim="roles",
            leeway_seconds=_DEFAULT_LEEWAY_SECONDS,
            clock=clock,
        )
        return _KeySetVerifier(self._public, rules)
