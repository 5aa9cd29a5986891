"""`opsctl login`, `whoami`, `logout` end to end: a real OpenID provider process
(`oidc-provider-mock`), a real `opsapi serve` verifying its tokens through its JWKS on
PostgreSQL, and `opsctl` as a real process whose browser is played with httpx on the provider's
own login form."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.support.processes import free_port, start_server, stop

OPSCTL = [sys.executable, "-m", "opsapi.opsctl.main"]
CLIENT_ID = "opsctl"
# Long enough for a login, a whoami and a command well before opsctl's renewal margin (a
# quarter of the life) on a busy machine, short enough to wait for the expiry.
TOKEN_SECONDS = 16
ROLES_CLAIM = "realm_access.roles"
USERS = {
    "alice": {"realm_access": {"roles": ["opsapi:operator"]}, "email": "alice@example.test"},
    "bob": {"realm_access": {"roles": ["viewer"]}},
}


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The OpenID provider process; answers its issuer URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("oidc") / "provider.log"
    command = [sys.executable, "-m", "tests.opsctl.oidc_provider", "--port", str(port),
               "--token-seconds", str(TOKEN_SECONDS)]  # fmt: skip
    with log.open("ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=out)
    issuer = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log.read_text()[-2000:]
            try:
                if httpx.get(issuer + "/.well-known/openid-configuration").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        for subject, claims in USERS.items():
            assert httpx.put(f"{issuer}/users/{subject}", json=claims).status_code == 204
        yield issuer
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def opsapi_url(
    provider: str, pg_database: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """`opsapi serve` trusting the provider: its JWKS, its issuer, opsctl's client id as the
    audience, roles from a nested claim."""
    env = {
        "OPSAPI_DATABASE_URL": pg_database[1],
        "OPSAPI_ENV": "test",
        "OPSAPI_JWKS_URL": provider + "/jwks",
        "OPSAPI_JWT_ISSUER": provider,
        "OPSAPI_JWT_AUDIENCE": CLIENT_ID,
        "OPSAPI_ROLES_CLAIM": ROLES_CLAIM,
        "OPSAPI_CONTROLLER_POLL_SECONDS": "0.5",
    }
    port = free_port()
    process = start_server(port, env, tmp_path_factory.mktemp("opsapi") / "server.log")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


@dataclass
class Opsctl:
    """opsctl as one user runs it: their own config directory, no OPSAPI_TOKEN."""

    issuer: str
    url: str
    home: Path
    settings: dict[str, str]

    @property
    def cache(self) -> Path:
        return self.home / "opsctl" / "credentials.json"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("OPSCTL_", "OPSAPI_")) and k != "NO_COLOR"}  # fmt: skip
        env.update(
            XDG_CONFIG_HOME=str(self.home), OPSAPI_URL=self.url, OPSCTL_ISSUER=self.issuer,
            OPSCTL_CLIENT_ID=CLIENT_ID, OPSCTL_ROLES_CLAIM=ROLES_CLAIM, COLUMNS="100",
        )  # fmt: skip
        env.update(self.settings)
        env.update(extra)
        return env

    def parallel(self, *calls: tuple[str, ...]) -> list[Result]:
        """Several opsctl runs at once (each is a whole process start)."""
        with ThreadPoolExecutor(max_workers=4) as pool:
            return list(pool.map(lambda args: self.run(*args), calls))

    def run(self, *args: str, **extra: str) -> Result:
        done = subprocess.run([*OPSCTL, *args], env=self.env(**extra), capture_output=True,
                              text=True, timeout=60, check=False)  # fmt: skip
        return Result(done.returncode, done.stdout, done.stderr)

    def start_login(self, *args: str, **extra: str) -> tuple[subprocess.Popen[str], str]:
        """`opsctl login --no-browser` running; answers it and the URL it asks to open."""
        process = subprocess.Popen(
            [*OPSCTL, "login", "--no-browser", *args], env=self.env(**extra),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert process.stderr is not None
        for line in process.stderr:
            if line.strip().startswith(self.issuer):
                return process, line.strip()
        process.wait(timeout=10)
        raise AssertionError(f"opsctl login printed no URL (exit {process.returncode})")

    def login(self, subject: str, **extra: str) -> Result:
        """Log in as `subject`, through the provider's form, as a person in a browser would."""
        process, url = self.start_login(**extra)
        browser_lands_on = sign_in(url, subject)
        page = httpx.get(browser_lands_on)  # the browser follows the redirect to opsctl
        assert page.status_code == 200, page.text
        assert "Logged in" in page.text
        out, err = process.communicate(timeout=30)
        return Result(process.returncode, out, err)

    def cached(self) -> dict[str, Any]:
        return dict(json.loads(self.cache.read_text()))


def sign_in(url: str, subject: str, action: dict[str, str] | None = None) -> str:
    """The provider's login form, filled in and submitted; answers where it redirects."""
    form = httpx.get(url)
    assert form.status_code == 200, form.text
    assert 'name="sub"' in form.text
    answer = httpx.post(url, data=action or {"sub": subject})
    assert answer.status_code == 302, answer.text
    return str(answer.headers["location"])


@pytest.fixture
def opsctl(provider: str, opsapi_url: str, pg_url: str, tmp_path: Path) -> Opsctl:
    assert pg_url  # the test's database, emptied
    return Opsctl(provider, opsapi_url, tmp_path / "config", {"OPSCTL_CLIENT_SECRET": "native"})


def wait_for_expiry(opsctl: Opsctl) -> None:
    """Sleep until opsctl's renewal margin (a quarter of the token's life) is reached."""
    expires_at = float(opsctl.cached()["token"]["expires_at"])
    time.sleep(max(0.0, expires_at - TOKEN_SECONDS / 4 - time.time() + 0.5))


def no_secret_in(text: str, cache: dict[str, Any]) -> None:
    for name in ("access_token", "refresh_token", "id_token"):
        secret = cache["token"].get(name)
        if secret:
            assert secret not in text
            assert secret.split(".")[-1] not in text


# ---------------------------------------------------------------------------------------------


def test_login_whoami_commands_renewal_and_logout(opsctl: Opsctl) -> None:
    opsctl.settings["OPSCTL_BEARER"] = "access_token"

    # when alice logs in through the provider
    logged_in = opsctl.login("alice")

    # then opsctl says who she is, and her tokens are cached for her alone
    assert logged_in.code == 0, logged_in.err
    assert f"Logged in to {opsctl.issuer} as alice" in logged_in.out
    assert stat.S_IMODE(opsctl.cache.stat().st_mode) == 0o600
    assert stat.S_IMODE(opsctl.cache.parent.stat().st_mode) == 0o700
    first = opsctl.cached()
    no_secret_in(logged_in.out + logged_in.err, first)

    # and whoami shows the subject, the roles as opsapi maps them, and the expiry
    shown, raw = opsctl.parallel(("whoami",), ("whoami", "--json"))
    assert shown.code == 0, shown.err
    assert "alice" in shown.out
    assert "operator (implies viewer)" in shown.out
    assert '["opsapi:operator"]' in shown.out
    assert "renewed with the refresh token" in shown.out
    identity = raw.json()
    assert (identity["subject"], identity["roles"], identity["source"]) == (
        "alice", ["operator"], "login"
    )  # fmt: skip
    assert 0 < identity["expires_in_seconds"] <= TOKEN_SECONDS
    no_secret_in(shown.out + raw.out, first)

    # when she starts a rollout with no OPSAPI_TOKEN set
    started = opsctl.run("promote", "checkout", "--version", "v2", "--json")

    # then opsapi accepted her cached token, as alice the operator, without a renewal
    assert started.code == 0, started.err
    assert started.json()["created_by"] == "alice"
    assert opsctl.cached()["token"] == first["token"]

    # when the token expires
    wait_for_expiry(opsctl)
    shown_after = opsctl.run("status", "checkout", "--json")

    # then the next command renews it with the refresh token and works
    assert shown_after.code == 0, shown_after.err
    assert shown_after.json()["canary_version"] == "v2"
    renewed = opsctl.cached()
    assert renewed["token"]["access_token"] != first["token"]["access_token"]
    assert renewed["token"]["expires_at"] > first["token"]["expires_at"]
    assert stat.S_IMODE(opsctl.cache.stat().st_mode) == 0o600
    assert opsctl.run("whoami", "--json").json()["expires_in_seconds"] > TOKEN_SECONDS
    paused = opsctl.run("pause", "checkout", "-r", "after renewal")
    assert paused.code == 0, paused.err

    # and OPSAPI_TOKEN, when set, wins over the login
    overridden = opsctl.run("status", "checkout", OPSAPI_TOKEN="not-a-token")
    assert overridden.code == 3
    assert "OPSAPI_TOKEN" in overridden.err

    # when she logs out
    out = opsctl.run("logout")

    # then the cache is gone and every command says to log in
    assert out.code == 0, out.err
    assert "logged out" in out.out
    assert not opsctl.cache.exists()
    for args in (("status", "checkout"), ("whoami",)):
        refused = opsctl.run(*args)
        assert refused.code == 3, refused
        assert "run `opsctl login`" in refused.err
        assert len(refused.err.strip().splitlines()) == 1
    assert opsctl.run("logout").out.startswith("not logged in")


def test_id_tokens_carry_the_roles_and_a_renewal_without_one_asks_to_log_in(
    opsctl: Opsctl,
) -> None:
    # given bob, a viewer, logged in with the default bearer: the ID token
    logged_in = opsctl.login("bob")
    assert logged_in.code == 0, logged_in.err
    assert opsctl.cached()["bearer"] == "id_token"

    # then opsapi reads his role from the ID token: he may look, not act
    listed, refused = opsctl.parallel(("services",), ("promote", "checkout", "--version", "v2"))
    assert listed.code == 0, listed.err
    assert refused.code == 4
    assert "(token of bob, roles: viewer)" in refused.err
    who = opsctl.run("whoami", "--json").json()
    assert (who["subject"], who["roles"], who["audience"]) == ("bob", ["viewer"], [CLIENT_ID])

    # when the ID token expires, and this provider renews without a new ID token
    wait_for_expiry(opsctl)
    after = opsctl.run("services")

    # then opsctl says so and asks for a new login instead of sending an expired token
    assert after.code == 3
    assert "without a new ID token" in after.err
    assert after.err.rstrip().endswith("run `opsctl login`")
    assert opsctl.login("bob").code == 0
    assert opsctl.run("services").code == 0


def test_the_redirect_takes_only_this_logins_answer(opsctl: Opsctl) -> None:
    # given a login waiting for the browser
    process, url = opsctl.start_login()
    redirect = parse_qs(urlsplit(url).query)["redirect_uri"][0]

    # when something else calls the redirect first, with another state and its own code
    forged = httpx.get(redirect, params={"code": "attacker", "state": "not-this-login"})

    # then it is ignored, and the real sign-in completes the login
    assert forged.status_code == 400
    assert httpx.get(sign_in(url, "alice")).status_code == 200
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "as alice" in out


def test_a_refused_sign_in_caches_nothing(opsctl: Opsctl) -> None:
    process, url = opsctl.start_login()

    lands_on = sign_in(url, "alice", action={"action": "deny"})
    httpx.get(lands_on)
    _, err = process.communicate(timeout=30)

    assert process.returncode == 3
    assert "refused the login: access_denied" in err
    assert not opsctl.cache.exists()


@pytest.mark.parametrize(
    ("settings", "code", "message"),
    [
        pytest.param({"OPSCTL_ISSUER": ""}, 2, "set OPSCTL_ISSUER", id="no-issuer"),
        pytest.param({"OPSCTL_CLIENT_ID": ""}, 2, "OPSCTL_CLIENT_ID", id="no-client-id"),
        pytest.param({"OPSCTL_ISSUER": "http://idp.example.test"}, 2, "must be an https:// URL",
                     id="plain-http-elsewhere"),
        pytest.param({"OPSCTL_ISSUER": "http://127.0.0.1:{closed}"}, 9,
                     "cannot reach the identity provider", id="unreachable"),
        pytest.param({"OPSCTL_ISSUER": "http://127.0.0.1:{port}/realms/ops"}, 1,
                     "is OPSCTL_ISSUER the issuer URL?", id="not-an-issuer"),
        pytest.param({"OPSCTL_BEARER": "both"}, 2, "OPSCTL_BEARER", id="bad-bearer"),
        pytest.param({"OPSCTL_AUTH_PARAMS": "state=x"}, 2, "may not set state",
                     id="reserved-param"),
    ],
)  # fmt: skip
def test_login_settings_that_cannot_work(
    opsctl: Opsctl, settings: dict[str, str], code: int, message: str
) -> None:
    port = str(urlsplit(opsctl.issuer).port)
    values = {k: v.format(port=port, closed=free_port()) for k, v in settings.items()}

    refused = opsctl.run("login", "--no-browser", "--wait", "5", **values)

    assert refused.code == code, refused
    assert message in refused.err
    assert len(refused.err.strip().splitlines()) == 1
    assert "Traceback" not in refused.err
    assert not opsctl.cache.exists()


def test_extra_parameters_reach_the_provider_and_an_unanswered_login_gives_up(
    opsctl: Opsctl,
) -> None:
    extra = {"OPSCTL_AUTH_PARAMS": "prompt=consent&access_type=offline",
             "OPSCTL_SCOPES": "openid email"}  # fmt: skip

    process, url = opsctl.start_login("--wait", "2", **extra)
    _, err = process.communicate(timeout=30)

    query = parse_qs(urlsplit(url).query)
    assert query["prompt"] == ["consent"]
    assert query["access_type"] == ["offline"]
    assert query["scope"] == ["openid email"]
    assert query["code_challenge_method"] == ["S256"]
    assert process.returncode == 3
    assert "no login within 2s" in err
