"""Console sign-in through an OIDC provider: authorization code with PKCE (S256), against a real
provider implementation (oidc-provider-mock, built on authlib's server side) on loopback, with
the API verifying the provider's tokens against its JWKS, as in production.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from itsdangerous import URLSafeTimedSerializer

from tests.console.support import CONSOLE, Browser, csrf_of
from tests.support.app import Harness, running_app

CLIENT_ID = "opsapi-console"
SECRET = "s" * 40
SERVICE = "checkout"


@pytest.fixture
def provider() -> Iterator[str]:
    from oidc_provider_mock import User, run_server_in_thread

    users = [User(sub="alice", claims={"roles": ["operator"]}),
             User(sub="nobody", claims={"roles": []})]  # fmt: skip
    with run_server_in_thread(user_claims=users) as server:
        yield f"http://localhost:{server.server_port}"


@pytest.fixture
async def oidc_api(pg_url: str, key_file: Path, provider: str) -> AsyncIterator[Harness]:
    async with running_app(
        pg_url,
        key_file,
        jwks_url=f"{provider}/jwks",
        jwt_issuer=provider,
        jwt_audience=CLIENT_ID,
        oidc_issuer=provider,
        oidc_client_id=CLIENT_ID,
        oidc_client_secret="client-secret",
        console_secret=SECRET,
    ) as api:
        yield api


async def sign_in_at_provider(client: httpx.AsyncClient, subject: str) -> httpx.Response:
    """Start at the console, choose `subject` at the provider; the console's callback answer."""
    start = await client.get(
        CONSOLE + "/auth/oidc/start", headers={"Sec-Fetch-Site": "same-origin"}
    )
    assert start.status_code == 302, start.text
    authorize = start.headers["location"]
    async with httpx.AsyncClient() as browser_at_provider:
        chosen = await browser_at_provider.post(authorize, data={"sub": subject})
    assert chosen.status_code == 302, chosen.text
    callback = chosen.headers["location"]
    assert callback.startswith("http://opsapi" + CONSOLE + "/auth/oidc/callback?")
    # the provider's redirect back is a navigation from another site
    return await client.get(callback, headers={"Sec-Fetch-Site": "cross-site"})


async def test_sign_in_with_the_provider_acts_as_that_user(oidc_api: Harness) -> None:
    transport = httpx.ASGITransport(app=oidc_api.app, client=("198.51.100.7", 42000))
    async with httpx.AsyncClient(transport=transport, base_url="http://opsapi") as client:
        page = await client.get(CONSOLE + "/auth/signin", headers={"Sec-Fetch-Site": "same-origin"})
        # Given a server whose tokens come from the provider: no local sign-in is offered
        assert "auth/oidc/start" in page.text
        assert "signin/local" not in page.text
        start = await client.get(
            CONSOLE + "/auth/oidc/start", headers={"Sec-Fetch-Site": "same-origin"}
        )
        # When the browser is sent to the provider, the request is bound to it with PKCE S256
        query = parse_qs(urlsplit(start.headers["location"]).query)
        assert query["response_type"] == ["code"]
        assert query["client_id"] == [CLIENT_ID]
        assert query["code_challenge_method"] == ["S256"]
        pending = URLSafeTimedSerializer(SECRET, salt="opsapi.console.oidc").loads(
            client.cookies["opsapi_console_oidc"]
        )
        challenge = base64.urlsafe_b64encode(
            hashlib.sha256(pending["code_verifier"].encode()).digest()
        ).rstrip(b"=")
        assert query["code_challenge"] == [challenge.decode()]
        assert query["state"] == [pending["state"]]
        assert query["nonce"] == [pending["nonce"]]
        assert "lax" in start.headers["set-cookie"].lower()

        # and alice signs in there
        answer = await sign_in_at_provider(client, "alice")
        # Then the console holds her session and continues from one of its own pages
        assert answer.status_code == 200, answer.text
        assert '<meta http-equiv="refresh"' in answer.text
        assert "opsapi_console=" in answer.headers["set-cookie"]
        console = Browser(client)
        overview = await console.get("/")
        assert overview.status_code == 200
        assert ">alice <small>operator, viewer</small>" in overview.text
        # and what she does is the API's call with her as the actor
        started = await console.act("start", SERVICE, "release v2", version="v2")
        assert started.status_code == 303
    [event] = await oidc_api.audit_events(action="canary.promote")
    assert (event.actor, event.outcome, event.roles) == ("alice", "success", ["operator"])
    [signin] = await oidc_api.audit_events(action="console.signin")
    assert (signin.actor, signin.details["method"]) == ("alice", "oidc")
    # the provider's access token is opaque: the console keeps the ID token, which the API
    # verified (issuer, audience = the client id, signature from the JWKS, nonce)
    assert signin.details["credential"] == "id_token"


async def test_an_answer_that_does_not_match_the_browsers_request_is_refused(
    oidc_api: Harness,
) -> None:
    transport = httpx.ASGITransport(app=oidc_api.app, client=("198.51.100.7", 42000))
    async with httpx.AsyncClient(transport=transport, base_url="http://opsapi") as client:
        start = await client.get(CONSOLE + "/auth/oidc/start")
        state = parse_qs(urlsplit(start.headers["location"]).query)["state"][0]
        callback = CONSOLE + "/auth/oidc/callback"
        # a code sent to this browser with another state (login CSRF)
        forged = await client.get(callback, params={"code": "stolen", "state": state[::-1]})
        assert forged.status_code == 401
        assert "does not match" in forged.text
        # the pending request is used up either way
        again = await client.get(callback, params={"code": "x", "state": state})
        assert again.status_code == 400
        # and a provider's refusal is shown, not followed
        await client.get(CONSOLE + "/auth/oidc/start")
        denied = await client.get(callback, params={"error": "access_denied"})
        assert denied.status_code == 401
        assert "access_denied" in denied.text
        assert (await client.get(CONSOLE + "/")).status_code == 303
    refusals = await oidc_api.audit_events(action="console.signin")
    assert [e.outcome for e in refusals] == ["denied", "denied"]


async def test_a_token_the_api_refuses_is_no_session(oidc_api: Harness) -> None:
    transport = httpx.ASGITransport(app=oidc_api.app, client=("198.51.100.7", 42000))
    async with httpx.AsyncClient(transport=transport, base_url="http://opsapi") as client:
        # a token the local signer minted is not the provider's
        page = await client.get(CONSOLE + "/auth/signin")
        local = oidc_api.token("admin", "mallory")
        answer = await client.post(
            CONSOLE + "/auth/signin/token",
            data={"csrf": csrf_of(page.text), "token": local},
            headers={"Sec-Fetch-Site": "same-origin"},
        )
        assert answer.status_code == 401
        assert (await client.get(CONSOLE + "/")).status_code == 303


async def test_jwks_mode_without_a_console_secret_says_so(
    pg_url: str, key_file: Path, provider: str
) -> None:
    async with running_app(
        pg_url, key_file, jwks_url=f"{provider}/jwks", jwt_issuer=provider,
        jwt_audience=CLIENT_ID,
    ) as api:  # fmt: skip
        answer = await api.client.get(CONSOLE + "/auth/signin")
    assert answer.status_code == 503
    assert "OPSAPI_CONSOLE_SECRET" in answer.text
