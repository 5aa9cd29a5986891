"""The app in JWKS mode against a real identity provider on loopback, end to end over HTTP."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.auth.idp import AUDIENCE, ISSUER, TestIdP, running_idp, spare_key
from tests.support.app import API, Harness, running_app

SERVICE = "checkout"
START = {"service": SERVICE, "version": "v2"}


@pytest.fixture
def idp() -> Iterator[TestIdP]:
    with running_idp() as server:
        yield server


@pytest.fixture
async def jwks_api(pg_url: str, key_file: Path, idp: TestIdP) -> AsyncIterator[Harness]:
    async with running_app(
        pg_url, key_file, jwks_url=idp.jwks_url, jwt_issuer=ISSUER, jwt_audience=AUDIENCE
    ) as harness:
        yield harness


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: Any) -> str:
    return b64url(json.dumps(value).encode())


async def promote(api: Harness, token: str) -> httpx.Response:
    return await api.client.post(
        API + "/canary/promote", json=START, headers={"Authorization": f"Bearer {token}"}
    )


# Forged and invalid tokens. The verifier checks time against the real clock, so tokens are
# minted at time.time(); every one of them claims the admin role.


def _tampered(idp: TestIdP, now: float) -> str:
    header, _, signature = idp.token(now, roles=["viewer"]).split(".")
    forged = idp.claims(now, sub="mallory", roles=["admin"])
    return f"{header}.{b64json(forged)}.{signature}"


def _alg_none(idp: TestIdP, now: float) -> str:
    header = {"alg": "none", "typ": "JWT", "kid": idp.current_key.kid}
    return f"{b64json(header)}.{b64json(idp.claims(now, roles=['admin']))}."


def _hs256_with_public_key(idp: TestIdP, now: float) -> str:
    header = {"alg": "HS256", "typ": "JWT", "kid": idp.current_key.kid}
    signing_input = f"{b64json(header)}.{b64json(idp.claims(now, roles=['admin']))}"
    secret = idp.current_key.as_pem(private=False)
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def _unknown_kid(idp: TestIdP, now: float) -> str:
    return idp.token(now, key=spare_key("not-published-by-the-idp"), roles=["admin"])


INVALID: list[Any] = [
    pytest.param(
        lambda idp, now: idp.token(now, exp=int(now) - 600, roles=["admin"]),
        "token expired",
        id="expired",
    ),
    pytest.param(
        lambda idp, now: idp.token(now, nbf=int(now) + 600, roles=["admin"]),
        "token not yet valid",
        id="not-yet-valid",
    ),
    pytest.param(
        lambda idp, now: idp.token(now, iss="https://evil.example.test", roles=["admin"]),
        "invalid issuer",
        id="wrong-issuer",
    ),
    pytest.param(
        lambda idp, now: idp.token(now, aud="another-api", roles=["admin"]),
        "invalid audience",
        id="wrong-audience",
    ),
    pytest.param(_unknown_kid, "unknown signing key", id="unknown-kid"),
    pytest.param(_tampered, "invalid signature", id="tampered-payload"),
    pytest.param(_alg_none, "unsupported algorithm", id="alg-none"),
    pytest.param(_hs256_with_public_key, "unsupported algorithm", id="hs256-public-key"),
]


async def test_valid_operator_token_promotes(jwks_api: Harness, idp: TestIdP) -> None:
    # when an operator with a token from the identity provider promotes
    response = await promote(jwks_api, idp.token(time.time()))

    # then the rollout starts, attributed to the token's subject
    assert response.status_code == 200, response.text
    assert response.json()["desired_weight"] == 10
    [record] = await jwks_api.rollouts(SERVICE)
    assert record.created_by == "alice@example.test"
    [event] = await jwks_api.audit_events(action="canary.promote")
    assert (event.outcome, event.actor, event.roles) == (
        "success",
        "alice@example.test",
        ["operator"],
    )
    assert idp.fetches == 1


async def test_locally_signed_tokens_are_refused_in_jwks_mode(jwks_api: Harness) -> None:
    response = await promote(jwks_api, jwks_api.token("admin"))

    assert response.status_code == 401, response.text
    assert await jwks_api.rollouts(SERVICE) == []


async def test_valid_viewer_token_is_forbidden_to_promote(jwks_api: Harness, idp: TestIdP) -> None:
    response = await promote(jwks_api, idp.token(time.time(), roles=["viewer"]))

    assert response.status_code == 403, response.text
    assert await jwks_api.rollouts(SERVICE) == []
    [event] = await jwks_api.audit_events()
    assert (event.outcome, event.actor) == ("denied", "alice@example.test")


@pytest.mark.parametrize(("make_token", "message"), INVALID)
async def test_invalid_token_is_401_and_audited(
    jwks_api: Harness,
    idp: TestIdP,
    make_token: Callable[[TestIdP, float], str],
    message: str,
) -> None:
    # given the identity provider's keys are known (a valid request went through)
    viewer = idp.token(time.time(), roles=["viewer"])
    listed = await jwks_api.client.get(
        API + "/canary", headers={"Authorization": f"Bearer {viewer}"}
    )
    assert listed.status_code == 200, listed.text
    token = make_token(idp, time.time())

    # when a caller promotes with an invalid (admin-claiming) token
    response = await promote(jwks_api, token)

    # then 401 problem+json with a Bearer challenge, and the reason
    assert response.status_code == 401, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.headers["www-authenticate"].split()[0] == "Bearer"
    problem = response.json()
    assert problem["status"] == 401
    assert problem["detail"] == f"invalid bearer token: {message}"
    # and nothing started, and the refusal was audited as denied, without the token
    assert await jwks_api.rollouts(SERVICE) == []
    [event] = await jwks_api.audit_events(action="canary.promote")
    assert (event.outcome, event.actor, event.roles) == ("denied", "anonymous", [])
    assert event.details["status"] == 401
    logged = json.dumps([e.model_dump(mode="json") for e in await jwks_api.audit_events()])
    assert token.split(".")[1] not in logged


async def test_roles_from_a_nested_claim(pg_url: str, key_file: Path, idp: TestIdP) -> None:
    # given the app reads roles from Keycloak's realm_access.roles
    async with running_app(
        pg_url,
        key_file,
        jwks_url=idp.jwks_url,
        jwt_issuer=ISSUER,
        jwt_audience=AUDIENCE,
        roles_claim="realm_access.roles",
    ) as api:
        now = time.time()
        # when a token grants viewer there but admin in the top-level "roles" claim
        viewer = idp.token(now, roles=["admin"], realm_access={"roles": ["viewer"]})
        # then only the nested claim counts
        assert (await promote(api, viewer)).status_code == 403

        # when a token grants operator in the nested claim (with a prefix, among other roles)
        operator = idp.token(
            now, roles=None, realm_access={"roles": ["offline_access", "opsapi-operator"]}
        )
        response = await promote(api, operator)

        # then it may promote
        assert response.status_code == 200, response.text
        [event] = await api.audit_events(outcome="success")
        assert event.roles == ["operator"]
