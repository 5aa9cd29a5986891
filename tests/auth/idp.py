"""A tiny real identity provider for tests: RSA keys, a JWKS endpoint on loopback, token minting."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

from opsapi.auth.tokens import ALLOWED_ALGORITHMS

ISSUER = "https://idp.example.test/realms/ops"
AUDIENCE = "opsapi"

# RSA generation costs ~50 ms; tests that only need "some other key" reuse these.
_spare_keys: dict[str, RSAKey] = {}


def rsa_key(kid: str) -> RSAKey:
    """A fresh 2048-bit RSA key with the given kid."""
    return RSAKey.generate_key(2048, parameters={"kid": kid})


def spare_key(kid: str) -> RSAKey:
    """A cached RSA key for `kid` (generated once per test session)."""
    if kid not in _spare_keys:
        _spare_keys[kid] = rsa_key(kid)
    return _spare_keys[kid]


class TestIdP:
    """Serves its public JWKS at `jwks_url`, counts fetches, mints tokens with its current key."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, *, issuer: str = ISSUER, audience: str = AUDIENCE) -> None:
        self.issuer = issuer
        self.audience = audience
        self._lock = threading.Lock()
        self._keys: list[RSAKey] = [spare_key("idp-key-1")]
        self._fetches = 0
        #: when set, the JWKS endpoint answers with this HTTP status instead of the key set
        self.fail_status: int | None = None
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        # A short poll interval makes shutdown() (which waits for the serve loop) quick.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )

    @property
    def jwks_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/jwks.json"

    @property
    def fetches(self) -> int:
        """How many times the JWKS was served (successfully or not)."""
        with self._lock:
            return self._fetches

    @property
    def current_key(self) -> RSAKey:
        """The key new tokens are signed with (the most recently rotated in)."""
        with self._lock:
            return self._keys[-1]

    def public_jwks(self) -> dict[str, Any]:
        with self._lock:
            return dict(KeySet(list(self._keys)).as_dict(private=False))

    def rotate(self, kid: str | None = None, *, drop_old: bool = False) -> RSAKey:
        """Publish a new signing key (keeping the old ones unless `drop_old`) and sign with it."""
        key = rsa_key(kid or f"idp-key-{len(self._keys) + 1}")
        with self._lock:
            self._keys = [key] if drop_old else [*self._keys, key]
        return key

    def claims(self, now: float, **overrides: Any) -> dict[str, Any]:
        """Valid claims at `now`; an override of None removes that claim."""
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": "alice@example.test",
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now) + 300,
            "roles": ["operator"],
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(
        self,
        now: float,
        *,
        key: RSAKey | None = None,
        header: Mapping[str, Any] | None = None,
        **claim_overrides: Any,
    ) -> str:
        """A signed token; `header` overrides fields (alg defaults to RS256, kid to the key's)."""
        key = key or self.current_key
        full_header: dict[str, Any] = {"alg": "RS256", "kid": key.kid, **(header or {})}
        full_header = {k: v for k, v in full_header.items() if v is not None}
        return jwt.encode(
            full_header, self.claims(now, **claim_overrides), key, algorithms=ALLOWED_ALGORITHMS
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/jwks.json":
                    self.send_error(404)
                    return
                with idp._lock:
                    idp._fetches += 1
                status = idp.fail_status
                if status is not None:
                    self.send_error(status)
                    return
                body = json.dumps(idp.public_jwks()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output quiet

        return Handler


@contextmanager
def running_idp(**kwargs: Any) -> Iterator[TestIdP]:
    """Start a TestIdP on a loopback port for the duration of the block."""
    idp = TestIdP(**kwargs)
    idp.start()
    try:
        yield idp
    finally:
        idp.stop()
