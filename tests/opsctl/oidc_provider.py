"""A real OpenID provider process for the `opsctl login` tests: `oidc-provider-mock` (authlib's
authorization server on Flask: discovery, JWKS, authorization code with PKCE, refresh tokens, a
login form), run as `python -m tests.opsctl.oidc_provider --port P --token-seconds N`.

One setting is added, through authlib's documented `OAUTH2_ACCESS_TOKEN_GENERATOR`: access
tokens are JWTs signed with the provider's own key (published in its JWKS), carrying the user's
claims and the client id as audience, as Keycloak, Okta and Entra ID issue them for an API. The
package's default (random strings) cannot be verified by opsapi; its ID tokens are untouched.
Users and their claims (roles) are set through the provider's own `PUT /users/{sub}`.
"""

from __future__ import annotations

import argparse
import os
import secrets
import time
import uuid
from datetime import timedelta
from typing import Any

import flask
import oidc_provider_mock
import werkzeug.serving
from authlib.oauth2.rfc6750 import BearerTokenGenerator  # type: ignore[import-untyped]
from joserfc import jwt
from joserfc.jwk import RSAKey

# Claims a JWT access token sets itself; a user's claims never override them.
_REGISTERED = {"iss", "sub", "aud", "iat", "nbf", "exp", "jti", "scope", "client_id"}


def jwt_access_tokens(token_seconds: int) -> Any:
    """An authlib access-token generator: RFC 9068-style JWTs signed with the provider's key."""

    def generate(client: Any, grant_type: str, user: Any, scope: str) -> str:
        # The provider keeps its signing key (the one its JWKS publishes) in its request globals.
        storage = flask.g.oidc_provider_mock_storage
        key = RSAKey.import_key(storage.jwk.as_dict(is_private=True))
        now = int(time.time())
        lifetime = (
            token_seconds
            if grant_type == "authorization_code"
            else BearerTokenGenerator.GRANT_TYPES_EXPIRES_IN.get(grant_type, 3600)
        )
        claims = {k: v for k, v in user.claims.items() if k not in _REGISTERED}
        claims.update(
            iss=flask.request.host_url.rstrip("/"),
            sub=user.sub,
            aud=client.get_client_id(),
            client_id=client.get_client_id(),
            scope=scope,
            iat=now,
            nbf=now,
            exp=now + lifetime,
            jti=uuid.uuid4().hex,
        )
        return jwt.encode({"alg": "RS256", "typ": "at+jwt"}, claims, key, algorithms=["RS256"])

    return generate


def main() -> None:
    """Serve the provider on 127.0.0.1:PORT until killed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token-seconds", type=int, default=3600)
    args = parser.parse_args()
    os.environ["AUTHLIB_INSECURE_TRANSPORT"] = "1"  # plain http on loopback, as the CLI does
    app = flask.Flask("oidc_provider_mock")
    app.secret_key = secrets.token_bytes(16)
    # Read by authlib when the provider's authorization server is set up (in init_app).
    app.config["OAUTH2_ACCESS_TOKEN_GENERATOR"] = jwt_access_tokens(args.token_seconds)
    oidc_provider_mock.init_app(app, access_token_max_age=timedelta(seconds=args.token_seconds))
    server = werkzeug.serving.make_server("127.0.0.1", args.port, app, threaded=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
