"""Bearer-token verification: JWKS (against a real loopback IdP), local mode, role mapping."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import random
import secrets
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from joserfc import jwt
from joserfc.jwk import ECKey

from opsapi.auth.identity import AuthError, Identity, Role
from opsapi.auth.tokens import (
    ALLOWED_ALGORITHMS,
    LOCAL_AUDIENCE,
    LOCAL_ISSUER,
    JwksVerifier,
    LocalSigner,
    roles_from_claims,
)

from .idp import AUDIENCE, ISSUER, TestIdP, running_idp, spare_key

T0 = 1_750_000_000.0

# Every message a client may see; anything else (a library message, key material) is a leak.
SAFE_MESSAGES = {
    "token expired",
    "token not yet valid",
    "invalid issuer",
    "invalid audience",
    "invalid subject",
    "invalid claims",
    "invalid claim: exp",
    "invalid claim: jti",
    "missing claim: aud",
    "missing claim: exp",
    "missing claim: iss",
    "missing claim: sub",
    "unknown signing key",
    "invalid signature",
    "unsupported algorithm",
    "malformed token",
    "identity provider unavailable",
}


class FakeClock:
    """A settable wall clock shared by the verifier (claims and cache) and the test."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def idp() -> Iterator[TestIdP]:
    with running_idp() as server:
        yield server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def verifier(idp: TestIdP, clock: FakeClock) -> JwksVerifier:
    return JwksVerifier(jwks_url=idp.jwks_url, issuer=ISSUER, audience=AUDIENCE, clock=clock)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: Any) -> str:
    return b64url(json.dumps(value).encode())


async def rejected(verifier: Any, token: str) -> str:
    """Verify `token`, expecting exactly AuthError with a safe message; return the message."""
    with pytest.raises(AuthError) as info:
        await verifier.verify(token)
    assert type(info.value) is AuthError
    message = str(info.value)
    assert message in SAFE_MESSAGES, message
    return message


# --- valid tokens -------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("header", "claims", "roles_claim", "expected_roles"),
    [
        pytest.param({}, {}, "roles", {Role.OPERATOR}, id="rs256-list"),
        pytest.param(
            {"alg": "PS256"},
            {"roles": "admin auditor"},
            "roles",
            {Role.ADMIN, Role.AUDITOR},
            id="ps256-string",
        ),
        pytest.param(
            {"alg": "RS512"},
            {"roles": ["opsapi:viewer", "x"]},
            "roles",
            {Role.VIEWER},
            id="rs512-prefixed",
        ),
        pytest.param(
            {},
            {"roles": None, "realm_access": {"roles": ["opsapi-admin", "offline_access"]}},
            "realm_access.roles",
            {Role.ADMIN},
            id="keycloak-nested",
        ),
        pytest.param({}, {"aud": ["other-api", AUDIENCE]}, "roles", {Role.OPERATOR}, id="aud-list"),
        pytest.param({}, {"roles": None}, "roles", set(), id="no-roles-claim"),
        pytest.param({"kid": None}, {}, "roles", {Role.OPERATOR}, id="no-kid-single-key-jwks"),
    ],
)
async def test_valid_token_gives_identity_with_mapped_roles(
    idp: TestIdP,
    clock: FakeClock,
    header: dict[str, Any],
    claims: dict[str, Any],
    roles_claim: str,
    expected_roles: set[Role],
) -> None:
    verifier = JwksVerifier(
        jwks_url=idp.jwks_url,
        issuer=ISSUER,
        audience=AUDIENCE,
        roles_claim=roles_claim,
        clock=clock,
    )
    token = idp.token(clock.now, header=header, **claims)
    identity = await verifier.verify(token)
    assert identity == Identity(subject="alice@example.test", roles=frozenset(expected_roles))


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "claims",
    [
        pytest.param({"exp": int(T0) - 20}, id="expired-within-leeway"),
        pytest.param({"nbf": int(T0) + 20, "iat": int(T0) + 20}, id="nbf-within-leeway"),
    ],
)
async def test_leeway_tolerates_small_clock_skew(
    idp: TestIdP, verifier: JwksVerifier, claims: dict[str, Any]
) -> None:
    identity = await verifier.verify(idp.token(T0, **claims))
    assert identity.subject == "alice@example.test"


# --- attacks and invalid tokens -------------------------------------------------------------


def _tampered(idp: TestIdP, now: float) -> str:
    header, _, signature = idp.token(now).split(".")
    forged = idp.claims(now, sub="mallory", roles=["admin"])
    return f"{header}.{b64json(forged)}.{signature}"


def _alg_none(idp: TestIdP, now: float) -> str:
    header = {"alg": "none", "typ": "JWT", "kid": idp.current_key.kid}
    return f"{b64json(header)}.{b64json(idp.claims(now, roles=['admin']))}."


def _hs256_with_public_key(idp: TestIdP, now: float, *, with_kid: bool = True) -> str:
    # The classic confusion attack: the verifier's public key used as an HMAC secret.
    header: dict[str, Any] = {"alg": "HS256", "typ": "JWT"}
    if with_kid:
        header["kid"] = idp.current_key.kid
    signing_input = f"{b64json(header)}.{b64json(idp.claims(now, roles=['admin']))}"
    secret = idp.current_key.as_pem(private=False)
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def _foreign_key_with_known_kid(idp: TestIdP, now: float) -> str:
    impostor = spare_key(str(idp.current_key.kid) + "-impostor")
    header = {"alg": "RS256", "kid": idp.current_key.kid}
    return jwt.encode(header, idp.claims(now, roles=["admin"]), impostor, algorithms=["RS256"])


def _es256_header_on_rsa_kid(idp: TestIdP, now: float) -> str:
    header = {"alg": "ES256", "typ": "JWT", "kid": idp.current_key.kid}
    return f"{b64json(header)}.{b64json(idp.claims(now))}.{b64url(b'x' * 64)}"


def _signed_by_hand(idp: TestIdP, header: dict[str, Any], claims: dict[str, Any]) -> str:
    # For headers joserfc refuses to produce itself.
    signing_input = f"{b64json(header)}.{b64json(claims)}"
    private_key = idp.current_key.private_key
    assert isinstance(private_key, rsa.RSAPrivateKey)
    signature = private_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


def _unknown_crit_header(idp: TestIdP, now: float) -> str:
    header = {
        "alg": "RS256",
        "kid": idp.current_key.kid,
        "crit": ["x-must-understand"],
        "x-must-understand": 1,
    }
    return _signed_by_hand(idp, header, idp.claims(now))


def _unknown_header(idp: TestIdP, now: float) -> str:
    header = {"alg": "RS256", "kid": idp.current_key.kid, "x-vendor": "1"}
    return _signed_by_hand(idp, header, idp.claims(now))


def _jwe_shaped(idp: TestIdP, now: float) -> str:
    header = {"alg": "RSA-OAEP", "enc": "A256GCM", "kid": idp.current_key.kid}
    return ".".join(
        [b64json(header), b64url(b"k" * 256), b64url(b"iv"), b64url(b"ct"), b64url(b"tag")]
    )


ATTACKS: list[Any] = [
    pytest.param(lambda idp, now: idp.token(now, exp=int(now) - 60), "token expired", id="expired"),
    pytest.param(
        lambda idp, now: idp.token(now, nbf=int(now) + 120), "token not yet valid", id="nbf-future"
    ),
    pytest.param(
        lambda idp, now: idp.token(now, iat=int(now) + 120), "token not yet valid", id="iat-future"
    ),
    pytest.param(
        lambda idp, now: idp.token(now, iss="https://evil.test"),
        "invalid issuer",
        id="wrong-issuer",
    ),
    pytest.param(
        lambda idp, now: idp.token(now, iss=None), "missing claim: iss", id="missing-issuer"
    ),
    pytest.param(
        lambda idp, now: idp.token(now, aud="other-api"), "invalid audience", id="wrong-audience"
    ),
    pytest.param(
        lambda idp, now: idp.token(now, aud=["a", "b"]),
        "invalid audience",
        id="audience-list-without-us",
    ),
    pytest.param(
        lambda idp, now: idp.token(now, aud=None), "missing claim: aud", id="missing-audience"
    ),
    pytest.param(lambda idp, now: idp.token(now, exp=None), "missing claim: exp", id="missing-exp"),
    pytest.param(
        lambda idp, now: idp.token(now, exp="9999999999"), "invalid claim: exp", id="exp-not-number"
    ),
    pytest.param(lambda idp, now: idp.token(now, sub=None), "missing claim: sub", id="missing-sub"),
    pytest.param(lambda idp, now: idp.token(now, sub=""), "invalid subject", id="empty-sub"),
    pytest.param(lambda idp, now: idp.token(now, sub=42), "invalid subject", id="sub-not-string"),
    pytest.param(_tampered, "invalid signature", id="tampered-payload"),
    pytest.param(_alg_none, "unsupported algorithm", id="alg-none"),
    pytest.param(_hs256_with_public_key, "unsupported algorithm", id="hs256-public-key-as-secret"),
    pytest.param(
        lambda idp, now: _hs256_with_public_key(idp, now, with_kid=False),
        "unsupported algorithm",
        id="hs256-public-key-as-secret-no-kid",
    ),
    pytest.param(_foreign_key_with_known_kid, "invalid signature", id="other-key-known-kid"),
    pytest.param(_es256_header_on_rsa_kid, "invalid signature", id="es256-header-rsa-key"),
    pytest.param(_unknown_crit_header, "malformed token", id="crit-header"),
    pytest.param(_unknown_header, "malformed token", id="unregistered-header"),
    pytest.param(_jwe_shaped, "malformed token", id="jwe-shaped"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("make_token", "message"), ATTACKS)
async def test_invalid_token_is_rejected_with_safe_message(
    idp: TestIdP,
    verifier: JwksVerifier,
    clock: FakeClock,
    make_token: Callable[[TestIdP, float], str],
    message: str,
) -> None:
    token = make_token(idp, clock.now)
    assert await rejected(verifier, token) == message


GARBAGE = [
    "",
    "abc",
    "a.b",
    "a.b.c",
    "....",
    "Bearer eyJhbGciOiJSUzI1NiJ9.e30.sig",
    "eyJ.eyJ.sig",
    "é.é.é",
    "\x00.\x00.\x00",
    b64json(["alg", "RS256"]) + ".e30.c2ln",  # header is a JSON list
    b64json({"alg": 256}) + ".e30.c2ln",  # alg is not a string
    b64json({"typ": "JWT"}) + ".e30.c2ln",  # no alg
    b64json({"alg": "RS256", "kid": ["x"]}) + ".e30.c2ln",  # kid is not a string
    b64json({"alg": "RS256", "kid": "idp-key-1"}) + ".bm90IGpzb24.c2ln",  # payload is not JSON
    b64json({"alg": "RS256", "kid": "idp-key-1"}) + "." + b64json([1, 2]) + ".c2ln",
    b64json({"alg": "RS256", "kid": "idp-key-1"}) + ".e30.!!!",
    "x" * 200_000,
    "a." * 10_000,
]


@pytest.mark.asyncio
@pytest.mark.parametrize("token", GARBAGE, ids=[f"garbage-{i}" for i in range(len(GARBAGE))])
async def test_garbage_is_rejected_with_auth_error(verifier: JwksVerifier, token: str) -> None:
    await rejected(verifier, token)


@pytest.mark.asyncio
async def test_mutated_tokens_only_ever_raise_auth_error(
    idp: TestIdP, verifier: JwksVerifier
) -> None:
    token = idp.token(T0)
    rng = random.Random(1234)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ "
    for _ in range(300):
        chars = list(token)
        for _ in range(rng.randint(1, 3)):
            chars[rng.randrange(len(chars))] = rng.choice(alphabet)
        mutated = "".join(chars)
        outcome: Identity | AuthError
        try:
            outcome = await verifier.verify(mutated)
        except AuthError as error:
            outcome = error
        if isinstance(outcome, AuthError):
            assert str(outcome) in SAFE_MESSAGES
        else:
            # Only changes that decode to the same bytes (e.g. unused low bits of the last
            # base64 character) may survive, and then the identity is the original one.
            assert outcome == Identity("alice@example.test", frozenset({Role.OPERATOR}))


# --- JWKS caching, rotation and refetch limits ----------------------------------------------


@pytest.mark.asyncio
async def test_jwks_is_cached(idp: TestIdP, verifier: JwksVerifier, clock: FakeClock) -> None:
    for _ in range(5):
        await verifier.verify(idp.token(clock.now))
    assert idp.fetches == 1

    clock.advance(301)  # past cache_seconds
    await verifier.verify(idp.token(clock.now))
    assert idp.fetches == 2


@pytest.mark.asyncio
async def test_concurrent_first_verifications_share_one_fetch(
    idp: TestIdP, verifier: JwksVerifier
) -> None:
    identities = await asyncio.gather(*(verifier.verify(idp.token(T0)) for _ in range(10)))
    assert {i.subject for i in identities} == {"alice@example.test"}
    assert idp.fetches == 1


@pytest.mark.asyncio
async def test_rotated_key_triggers_exactly_one_refetch(
    idp: TestIdP, verifier: JwksVerifier, clock: FakeClock
) -> None:
    await verifier.verify(idp.token(clock.now))
    assert idp.fetches == 1

    clock.advance(11)  # past min_refetch_seconds, well within cache_seconds
    idp.rotate("idp-key-2")
    new_tokens = [idp.token(clock.now, sub=f"user-{i}") for i in range(10)]
    identities = await asyncio.gather(*(verifier.verify(t) for t in new_tokens))
    assert [i.subject for i in identities] == [f"user-{i}" for i in range(10)]
    assert idp.fetches == 2

    await verifier.verify(idp.token(clock.now))
    assert idp.fetches == 2


@pytest.mark.asyncio
async def test_rotated_key_right_after_a_fetch_waits_for_the_rate_limit(
    idp: TestIdP, verifier: JwksVerifier, clock: FakeClock
) -> None:
    await verifier.verify(idp.token(clock.now))
    idp.rotate("idp-key-2")
    clock.advance(2)
    assert await rejected(verifier, idp.token(clock.now)) == "unknown signing key"
    assert idp.fetches == 1

    clock.advance(10)
    await verifier.verify(idp.token(clock.now))
    assert idp.fetches == 2


@pytest.mark.asyncio
async def test_unknown_kid_is_rejected_after_one_refetch(
    idp: TestIdP, verifier: JwksVerifier, clock: FakeClock
) -> None:
    await verifier.verify(idp.token(clock.now))
    clock.advance(11)
    stranger = spare_key("nobody-knows-me")
    assert await rejected(verifier, idp.token(clock.now, key=stranger)) == "unknown signing key"
    assert idp.fetches == 2


@pytest.mark.asyncio
@pytest.mark.parametrize("concurrent", [False, True], ids=["sequential", "concurrent"])
async def test_spraying_random_kids_refetches_at_most_once(
    idp: TestIdP, verifier: JwksVerifier, clock: FakeClock, concurrent: bool
) -> None:
    await verifier.verify(idp.token(clock.now))
    clock.advance(11)
    stranger = spare_key("sprayer")
    sprayed = [
        idp.token(clock.now, key=stranger, header={"kid": secrets.token_hex(8)}) for _ in range(20)
    ]

    if concurrent:
        results = await asyncio.gather(
            *(verifier.verify(t) for t in sprayed), return_exceptions=True
        )
        assert all(type(r) is AuthError and str(r) == "unknown signing key" for r in results)
    else:
        for token in sprayed:
            assert await rejected(verifier, token) == "unknown signing key"
    assert idp.fetches == 2

    # Valid tokens keep working throughout, without extra fetches.
    await verifier.verify(idp.token(clock.now))
    assert idp.fetches == 2

    clock.advance(11)
    assert await rejected(verifier, sprayed[0]) == "unknown signing key"
    assert idp.fetches == 3


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/jwks.json"


@pytest.mark.asyncio
async def test_idp_refusing_connections_gives_auth_error(idp: TestIdP, clock: FakeClock) -> None:
    verifier = JwksVerifier(
        jwks_url=_closed_port_url(), issuer=ISSUER, audience=AUDIENCE, clock=clock
    )
    assert await rejected(verifier, idp.token(clock.now)) == "identity provider unavailable"


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [500, 503, 404])
async def test_idp_error_gives_auth_error_and_is_not_hammered(
    idp: TestIdP, verifier: JwksVerifier, clock: FakeClock, status: int
) -> None:
    idp.fail_status = status
    for _ in range(5):
        assert await rejected(verifier, idp.token(clock.now)) == "identity provider unavailable"
    assert idp.fetches == 1

    idp.fail_status = None
    clock.advance(11)
    await verifier.verify(idp.token(clock.now))
    assert idp.fetches == 2


@pytest.mark.asyncio
async def test_cached_keys_outlive_a_short_idp_outage(
    idp: TestIdP, verifier: JwksVerifier, clock: FakeClock
) -> None:
    await verifier.verify(idp.token(clock.now))
    idp.fail_status = 503
    clock.advance(301)  # cache expired: refresh fails, the keys we have still serve
    await verifier.verify(idp.token(clock.now))
    assert idp.fetches == 2

    clock.advance(3600)  # beyond max_stale_seconds: fail closed
    assert await rejected(verifier, idp.token(clock.now)) == "identity provider unavailable"


# --- roles_from_claims ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claims", "roles_claim", "expected"),
    [
        pytest.param({"roles": ["admin", "viewer"]}, "roles", {Role.ADMIN, Role.VIEWER}, id="list"),
        pytest.param(
            {"roles": "admin viewer"}, "roles", {Role.ADMIN, Role.VIEWER}, id="space-string"
        ),
        pytest.param(
            {"roles": "admin,auditor"}, "roles", {Role.ADMIN, Role.AUDITOR}, id="comma-string"
        ),
        pytest.param(
            {"roles": " admin ,  operator "},
            "roles",
            {Role.ADMIN, Role.OPERATOR},
            id="mixed-string",
        ),
        pytest.param({"roles": "operator"}, "roles", {Role.OPERATOR}, id="single-string"),
        pytest.param(
            {"realm_access": {"roles": ["operator", "uma_authorization"]}},
            "realm_access.roles",
            {Role.OPERATOR},
            id="nested",
        ),
        pytest.param(
            {"resource_access": {"opsapi": {"roles": ["auditor"]}}},
            "resource_access.opsapi.roles",
            {Role.AUDITOR},
            id="deeply-nested",
        ),
        pytest.param(
            {"https://opsapi.example/roles": ["admin"]},
            "https://opsapi.example/roles",
            {Role.ADMIN},
            id="literal-dotted-claim-name",
        ),
        pytest.param(
            {"roles": ["root", "superuser", "admins", ""]}, "roles", set(), id="unknown-names"
        ),
        pytest.param(
            {"roles": ["opsapi:admin", "opsapi-auditor"]},
            "roles",
            {Role.ADMIN, Role.AUDITOR},
            id="prefixed",
        ),
        pytest.param(
            {"roles": "opsapi:operator opsapi-viewer"},
            "roles",
            {Role.OPERATOR, Role.VIEWER},
            id="prefixed-string",
        ),
        pytest.param(
            {"roles": ["opsapi:opsapi:admin", "other:admin", "opsapiadmin"]},
            "roles",
            set(),
            id="bad-prefixes",
        ),
        pytest.param(
            {"roles": ["Admin", "OPSAPI-Viewer"]},
            "roles",
            {Role.ADMIN, Role.VIEWER},
            id="case-insensitive",
        ),
        pytest.param(
            {"roles": ["admin", 7, None, {"x": 1}]}, "roles", {Role.ADMIN}, id="non-strings-ignored"
        ),
        pytest.param({}, "roles", set(), id="missing"),
        pytest.param({"roles": 42}, "roles", set(), id="wrong-type"),
        pytest.param({"roles": {"admin": True}}, "roles", set(), id="object"),
        pytest.param(
            {"realm_access": ["admin"]}, "realm_access.roles", set(), id="path-through-list"
        ),
        pytest.param({"realm_access": {}}, "realm_access.roles", set(), id="path-missing-leaf"),
    ],
)
def test_roles_from_claims(claims: dict[str, Any], roles_claim: str, expected: set[Role]) -> None:
    assert roles_from_claims(claims, roles_claim) == frozenset(expected)


# --- embedded local mode --------------------------------------------------------------------


@pytest.mark.asyncio
async def test_local_key_file_is_private_and_reloads(tmp_path: Path) -> None:
    path = tmp_path / "state" / "keys" / "signing-key.json"
    signer = LocalSigner.load_or_create(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # No temp file left behind.
    assert sorted(p.name for p in path.parent.iterdir()) == ["signing-key.json"]
    stored = json.loads(path.read_text())
    assert (stored["kty"], stored["crv"]) == ("EC", "P-256")
    assert "d" in stored  # the private part
    assert stored["kid"] == signer.kid

    token = signer.mint(subject="ops-admin", roles=[Role.ADMIN, "auditor"])
    reloaded = LocalSigner.load_or_create(path)
    assert reloaded.kid == signer.kid
    identity = await reloaded.verifier().verify(token)
    assert identity == Identity(subject="ops-admin", roles=frozenset({Role.ADMIN, Role.AUDITOR}))


def test_local_token_claims(tmp_path: Path) -> None:
    signer = LocalSigner.load_or_create(tmp_path / "key.json")
    token = signer.mint(
        subject="bob", roles=["viewer", Role.VIEWER, "operator"], ttl_seconds=60, now=T0
    )
    decoded = jwt.decode(token, ECKey.import_key(json.loads((tmp_path / "key.json").read_text())))
    assert decoded.header == {"alg": "ES256", "kid": signer.kid, "typ": "JWT"}
    claims = decoded.claims
    assert (claims["iss"], claims["aud"], claims["sub"]) == (LOCAL_ISSUER, LOCAL_AUDIENCE, "bob")
    assert (claims["iat"], claims["nbf"], claims["exp"]) == (int(T0), int(T0), int(T0) + 60)
    assert claims["roles"] == ["operator", "viewer"]
    assert isinstance(claims["jti"], str)
    assert len(claims["jti"]) >= 16


def test_local_mint_refuses_unknown_roles(tmp_path: Path) -> None:
    signer = LocalSigner.load_or_create(tmp_path / "key.json")
    with pytest.raises(ValueError, match="root"):
        signer.mint(subject="bob", roles=["root"])


@pytest.mark.asyncio
async def test_token_from_another_local_signer_is_rejected(tmp_path: Path) -> None:
    ours = LocalSigner.load_or_create(tmp_path / "ours.json")
    theirs = LocalSigner.load_or_create(tmp_path / "theirs.json")
    assert (
        await rejected(ours.verifier(), theirs.mint(subject="eve", roles=["admin"]))
        == "unknown signing key"
    )

    # Same kid, different key: the signature, not the kid, decides.
    impostor = LocalSigner(
        ECKey.generate_key("P-256", parameters={"kid": ours.kid, "alg": "ES256", "use": "sig"})
    )
    assert (
        await rejected(ours.verifier(), impostor.mint(subject="eve", roles=["admin"]))
        == "invalid signature"
    )


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("mint_at", "ttl", "message"),
    [
        pytest.param(T0 - 3600, 60, "token expired", id="expired"),
        pytest.param(T0 + 3600, 60, "token not yet valid", id="not-yet-valid"),
    ],
)
async def test_local_token_time_limits(
    tmp_path: Path, mint_at: float, ttl: int, message: str
) -> None:
    signer = LocalSigner.load_or_create(tmp_path / "key.json")
    token = signer.mint(subject="bob", roles=["viewer"], ttl_seconds=ttl, now=mint_at)
    assert await rejected(signer.verifier(clock=FakeClock(T0)), token) == message


@pytest.mark.asyncio
async def test_local_verifier_and_jwks_verifier_do_not_accept_each_others_tokens(
    tmp_path: Path, idp: TestIdP, verifier: JwksVerifier, clock: FakeClock
) -> None:
    signer = LocalSigner.load_or_create(tmp_path / "key.json")
    assert await rejected(signer.verifier(clock=clock), idp.token(clock.now)) in {
        "unknown signing key",
        "invalid issuer",
    }
    assert await rejected(verifier, signer.mint(subject="eve", roles=["admin"], now=clock.now)) == (
        "unknown signing key"
    )


def test_allowed_algorithms_are_asymmetric_only() -> None:
    assert not {"none", "HS256", "HS384", "HS512"} & set(ALLOWED_ALGORITHMS)
