"""The console in process, on real PostgreSQL: headers, escaping, sessions, CSRF, roles, the
actions as API calls with the user as actor, live fragments, sign-in rules, audit pages.

The browser-level journey (real Chromium against `opsapi serve`) is in test_browser.py.
"""

from __future__ import annotations

import json
import time

import pytest

from opsapi.console.headers import CONTENT_SECURITY_POLICY
from tests.console.support import CONSOLE, browser, csrf_of, key_of
from tests.support.app import Harness

SERVICE = "checkout"
HOSTILE = '<script>window.__pwned = 1</script><img src=x onerror="alert(1)">'


async def start(api: Harness, reason: str = "release v2", version: str = "v2") -> None:
    body = {"service": SERVICE, "version": version, "stable_version": "v1", "reason": reason}
    answer = await api.post("/canary/promote", body, subject="deploy-bot")
    assert answer.status_code == 200, answer.text


async def latest_state(api: Harness) -> str:
    return str((await api.get(f"/canary/{SERVICE}")).json()["state"])


# --- headers -------------------------------------------------------------------------------

# (path, role signed in as or None, expected status)
PAGES = [
    pytest.param("/auth/signin", None, 200, id="sign-in"),
    pytest.param("/", "viewer", 200, id="overview"),
    pytest.param("/live", "viewer", 200, id="overview live fragment"),
    pytest.param(f"/services/{SERVICE}", "viewer", 200, id="service"),
    pytest.param(f"/services/{SERVICE}/live", "viewer", 200, id="service live fragment"),
    pytest.param("/freezes", "viewer", 200, id="freezes"),
    pytest.param("/audit", "auditor", 200, id="audit"),
    pytest.param("/audit", "operator", 403, id="audit refused to an operator"),
    pytest.param("/audit/verify", "auditor", 200, id="audit verify"),
    pytest.param("/audit/export?format=csv", "auditor", 200, id="audit export"),
    pytest.param("/static/console.js", None, 200, id="script"),
    pytest.param("/static/console.css", None, 200, id="style sheet"),
    pytest.param("/no/such/page", None, 404, id="not found"),
    pytest.param("/services/Not_A_Name", "viewer", 404, id="bad service name"),
]


@pytest.mark.parametrize(("path", "role", "status"), PAGES)
async def test_every_console_response_carries_strict_headers(
    api: Harness, path: str, role: str | None, status: int
) -> None:
    await start(api)
    async with browser(api) as client:
        if role is not None:
            await client.sign_in(f"{role}-1", role)
        answer = await client.get(path)
    assert answer.status_code == status, answer.text
    csp = answer.headers["content-security-policy"]
    assert csp == CONTENT_SECURITY_POLICY
    directives = dict(part.strip().split(" ", 1) for part in csp.split(";"))
    assert directives["script-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert directives["default-src"] == "'none'"
    assert "unsafe-inline" not in csp
    assert "unsafe-eval" not in csp
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["referrer-policy"] == "no-referrer"
    assert answer.headers["x-frame-options"] == "DENY"
    if answer.headers["content-type"].startswith("text/html"):
        # no inline script or handler: the only script is the static file
        assert "<script>" not in answer.text
        assert " on" + "click=" not in answer.text
        assert answer.headers["cache-control"] in ("no-store", "no-cache")


async def test_the_root_and_the_bare_console_path_lead_to_the_console(api: Harness) -> None:
    async with browser(api) as client:
        for path in ("/", CONSOLE):
            answer = await client.client.get(path)
            assert answer.status_code == 308
            assert answer.headers["location"] == CONSOLE + "/"


# --- escaping ------------------------------------------------------------------------------


async def test_text_from_the_api_is_escaped_on_every_page(api: Harness) -> None:
    # Given a rollout, a freeze window and audit events whose free text is markup
    await start(api, reason=HOSTILE)
    freeze = {
        "name": "weekend",
        "services": [SERVICE],
        "reason": HOSTILE,
        "starts_at": "2026-11-22T00:00:00Z",
        "ends_at": "2026-11-23T00:00:00Z",
    }
    assert (await api.post("/freezes", freeze, role="admin")).status_code == 201
    async with browser(api) as client:
        await client.sign_in("ada", "auditor")
        # When each page that shows that text is rendered
        pages = {
            path: (await client.get(path)).text
            for path in (
                "/",
                "/live",
                f"/services/{SERVICE}",
                f"/services/{SERVICE}/live",
                "/freezes",
                "/audit",
            )
        }
    escaped = "&lt;script&gt;window.__pwned = 1&lt;/script&gt;"
    for path, page in pages.items():
        # Then the markup is shown as text, never as markup
        assert "<script>window" not in page, path
        assert "<img src=x" not in page, path
        assert escaped in page or "&#34;" in page, path
    assert escaped in pages[f"/services/{SERVICE}"]
    assert escaped in pages["/freezes"]


# --- sessions and sign-in ------------------------------------------------------------------


async def test_the_session_cookie_is_httponly_strict_scoped_and_signed(api: Harness) -> None:
    async with browser(api) as client:
        answer = await client.sign_in("alice", "operator")
        cookie = answer.headers["set-cookie"]
        attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
        assert {"httponly", "path", "samesite", "max-age"} <= attributes
        assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
        assert f"Path={CONSOLE}" in cookie
        # a cookie altered by hand is no session at all
        value = client.client.cookies["opsapi_console"]
        client.client.cookies.set("opsapi_console", value[:-3] + "AAA", path=CONSOLE)
        answer = await client.get("/")
        assert answer.status_code == 303
        assert answer.headers["location"].startswith(CONSOLE + "/auth/signin")


async def test_a_signed_out_browser_is_sent_to_sign_in_and_back(api: Harness) -> None:
    async with browser(api) as client:
        answer = await client.get(f"/services/{SERVICE}")
        assert answer.status_code == 303
        target = answer.headers["location"]
        assert (
            target
            == f"{CONSOLE}/auth/signin?next=%2Finternal%2Fops%2Fconsole%2Fservices%2F{SERVICE}"
        )
        page = await client.client.get(target)
        signed_in = await client.post(
            "/auth/signin/local",
            {
                "csrf": csrf_of(page.text),
                "subject": "alice",
                "role": "viewer",
                "next": f"{CONSOLE}/services/{SERVICE}",
            },
        )
        assert signed_in.status_code == 303
        assert signed_in.headers["location"] == f"{CONSOLE}/services/{SERVICE}"


@pytest.mark.parametrize(
    "target",
    [
        "https://evil.example/",
        "//evil.example/",
        "/elsewhere",
        f"{CONSOLE}//evil.example",
        f"{CONSOLE}/auth/signout",
        "javascript:alert(1)",
        f"{CONSOLE}/\\evil",
    ],
)
async def test_sign_in_never_sends_the_browser_off_the_console(api: Harness, target: str) -> None:
    async with browser(api) as client:
        page = await client.get("/auth/signin")
        answer = await client.post(
            "/auth/signin/local",
            {"csrf": csrf_of(page.text), "subject": "alice", "role": "viewer", "next": target},
        )
        assert answer.status_code == 303
        assert answer.headers["location"] == CONSOLE + "/"


async def test_local_sign_in_is_offered_only_to_loopback_browsers(api: Harness) -> None:
    # Given a browser on another machine (the harness's client address is 198.51.100.7)
    async with browser(api, address="198.51.100.7") as client:
        page = await client.get("/auth/signin")
        # Then the form is not offered, only a token can be pasted
        assert "signin/local" not in page.text
        assert "signin/token" in page.text
        # and a hand-made local sign-in is refused and audited
        answer = await client.post(
            "/auth/signin/local",
            {"csrf": csrf_of(page.text), "subject": "mallory", "role": "admin"},
        )
        assert answer.status_code == 403
        assert (await client.get("/")).status_code == 303  # still signed out
    [event] = await api.audit_events(action="console.signin")
    assert event.outcome == "denied"
    assert event.actor == "anonymous"
    assert event.client_address == "198.51.100.7"


async def test_a_pasted_token_signs_in_and_a_refused_one_is_audited(api: Harness) -> None:
    token = api.token("operator", "bob")
    expired = api.signer.mint(subject="bob", roles=["operator"], now=time.time() - 10 * 3600)
    async with browser(api, address="198.51.100.7") as client:
        page = await client.get("/auth/signin")
        refused = await client.post(
            "/auth/signin/token", {"csrf": csrf_of(page.text), "token": expired}
        )
        assert refused.status_code == 401
        assert "token expired" in refused.text
        answer = await client.post(
            "/auth/signin/token", {"csrf": csrf_of(refused.text), "token": f"Bearer {token}"}
        )
        assert answer.status_code == 303
        overview = await client.get("/")
        assert overview.status_code == 200
        assert "bob" in overview.text
    events = await api.audit_events(action="console.signin")
    assert [(e.actor, e.outcome) for e in events] == [("anonymous", "denied"), ("bob", "success")]
    text = json.dumps([e.model_dump(mode="json") for e in await api.audit_events()])
    assert token not in text
    assert expired not in text


async def test_signing_out_forgets_the_token(api: Harness) -> None:
    async with browser(api) as client:
        await client.sign_in("alice", "operator")
        page = await client.get("/")
        answer = await client.post("/auth/signout", {"csrf": csrf_of(page.text)})
        assert answer.status_code == 303
        assert (await client.get("/")).status_code == 303
    assert [e.actor for e in await api.audit_events(action="console.signout")] == ["alice"]


# --- actions -------------------------------------------------------------------------------


async def test_a_console_action_is_the_api_call_with_the_user_as_actor(api: Harness) -> None:
    async with browser(api) as client:
        await client.sign_in("alice", "operator")
        # When alice starts a release and rolls it back from the service page
        page = (await client.get(f"/services/{SERVICE}")).text
        started = await client.act(
            "start",
            SERVICE,
            "release v2",
            page,
            version="v2",
            stable_version="v1",
            idempotency_key=key_of(page),
        )
        assert started.status_code == 303
        assert started.headers["location"] == f"{CONSOLE}/services/{SERVICE}"
        page = (await client.get(f"/services/{SERVICE}")).text
        assert "Started checkout: progressing, v2 at 10 %" in page
        answer = await client.act("rollback", SERVICE, "error rate up")
        assert answer.status_code == 303
        page = (await client.get(f"/services/{SERVICE}")).text
    # Then the rollout is rolled back, and the page said so
    assert await latest_state(api) == "rolled_back"
    assert "Rolled back checkout: rolled_back" in page
    # (the pull router: applied when a client fetches the 0 %, none has yet)
    assert "0 % published: applied when a client fetches it" in page
    # and the audit log holds the API's own events, with alice as the actor
    [event] = await api.audit_events(action="canary.rollback")
    assert event.actor == "alice"
    assert event.roles == ["operator"]
    assert event.source == "api"
    assert event.outcome == "success"
    assert event.details["reason"] == "error rate up"
    assert event.request_id is not None
    assert event.request_id.startswith("console-")
    assert event.client_address == "127.0.0.1"
    [start_event] = await api.audit_events(action="canary.promote")
    assert start_event.actor == "alice"


async def given(api: Harness, state: str) -> None:
    """The rollout in `state`, reached through the API."""
    if state == "succeeded":
        body = {"service": SERVICE, "version": "v2", "stable_version": "v1", "target_percent": 100}
        assert (await api.post("/canary/promote", body, role="admin")).status_code == 200
        done = await api.post("/canary/promote", {"service": SERVICE, "force": True}, role="admin")
        assert done.json()["state"] == "succeeded", done.text
        return
    await start(api)
    if state == "paused":
        assert (await api.post("/canary/pause", {"service": SERVICE})).status_code == 200
    if state == "ready":
        api.clock.advance(minutes=31)


# (state before, button, extra form fields, state after, canary weight after)
BUTTONS = [
    pytest.param("progressing", "pause", {}, "paused", 10, id="pause"),
    pytest.param("paused", "resume", {}, "progressing", 10, id="resume"),
    pytest.param("ready", "promote", {"from_percent": 10}, "progressing", 25, id="promote"),
    pytest.param("progressing", "rollback", {}, "rolled_back", 0, id="roll back"),
    pytest.param("succeeded", "revert", {}, "reverted", 0, id="revert"),
]


@pytest.mark.parametrize(("before", "button", "extra", "after", "weight"), BUTTONS)
async def test_each_button_is_its_api_call(
    api: Harness, before: str, button: str, extra: dict[str, int], after: str, weight: int
) -> None:
    await given(api, before)
    async with browser(api) as client:
        await client.sign_in("alice", "operator")
        page = (await client.get(f"/services/{SERVICE}")).text
        # the page offers the button for this state
        assert f"actions/{button}" in page
        answer = await client.act(button, SERVICE, f"{button} from the console", page, **extra)
        assert answer.status_code == 303
        shown = (await client.get(f"/services/{SERVICE}")).text
    rollout = (await api.get(f"/canary/{SERVICE}")).json()
    assert (rollout["state"], rollout["desired_weight"]) == (after, weight)
    assert "Refused" not in shown
    [event] = await api.audit_events(action=f"canary.{button}", actor="alice")
    assert (event.outcome, event.source, event.service) == ("success", "api", SERVICE)


async def test_a_form_sent_twice_acts_once(api: Harness) -> None:
    await start(api)
    async with browser(api) as client:
        await client.sign_in("alice", "operator")
        page = (await client.get(f"/services/{SERVICE}")).text
        # the pause form of this page, submitted twice (a double click, a resubmitted form)
        form = page[page.index("actions/pause") :]
        key = key_of(form)
        for _ in range(2):
            answer = await client.act("pause", SERVICE, "investigating", page, idempotency_key=key)
            assert answer.status_code == 303
        after = (await client.get(f"/services/{SERVICE}")).text
    assert await latest_state(api) == "paused"
    assert "Refused" not in after
    events = await api.audit_events(action="canary.pause")
    assert [e.outcome for e in events] == ["success", "success"]
    assert "idempotent_replay" not in events[0].details
    assert events[1].details["idempotent_replay"] is True


async def test_a_refusal_of_the_api_is_shown_and_changes_nothing(api: Harness) -> None:
    await start(api)
    async with browser(api) as client:
        await client.sign_in("alice", "operator")
        answer = await client.act("promote", SERVICE, "looks fine", from_percent=10)
        assert answer.status_code == 303
        page = (await client.get(f"/services/{SERVICE}")).text
    assert "Refused: step 10% is not ready" in page
    assert (await api.get(f"/canary/{SERVICE}")).json()["desired_weight"] == 10
    [event] = await api.audit_events(action="canary.promote", actor="alice")
    assert event.outcome == "conflict"


async def test_an_action_needs_a_reason(api: Harness) -> None:
    await start(api)
    async with browser(api) as client:
        await client.sign_in("alice", "operator")
        answer = await client.act("rollback", SERVICE, "   ")
        assert answer.status_code == 303
        page = (await client.get(f"/services/{SERVICE}")).text
    assert "every action needs a reason" in page
    assert await latest_state(api) == "progressing"


# (what is wrong with the request, form changes, extra headers)
FORGERIES = [
    pytest.param({"csrf": None}, {}, id="no CSRF token"),
    pytest.param({"csrf": "x" * 43}, {}, id="a wrong CSRF token"),
    pytest.param({}, {"Sec-Fetch-Site": "cross-site"}, id="sent from another site"),
    pytest.param({}, {"Sec-Fetch-Site": "same-site"}, id="sent from a sibling origin"),
]


@pytest.mark.parametrize(("change", "headers"), FORGERIES)
async def test_a_state_change_without_the_sessions_csrf_token_is_refused(
    api: Harness, change: dict[str, str | None], headers: dict[str, str]
) -> None:
    await start(api)
    async with browser(api) as client:
        await client.sign_in("alice", "operator")
        page = (await client.get(f"/services/{SERVICE}")).text
        form = {"csrf": csrf_of(page), "service": SERVICE, "reason": "forged"}
        form.update({k: v for k, v in change.items() if v is not None})
        form = {k: v for k, v in form.items() if not (k in change and change[k] is None)}
        answer = await client.post("/actions/rollback", form, **headers)
    assert answer.status_code == 403
    assert "Refused" in answer.text
    assert await latest_state(api) == "progressing"
    assert await api.audit_events(action="canary.rollback") == []
    [event] = await api.audit_events(action="console.rollback")
    assert (event.actor, event.outcome) == ("alice", "denied")


async def test_another_sessions_csrf_token_does_not_pass(api: Harness) -> None:
    await start(api)
    async with browser(api) as mallory, browser(api) as alice:
        await mallory.sign_in("mallory", "viewer")
        stolen = csrf_of((await mallory.get("/")).text)
        await alice.sign_in("alice", "operator")
        answer = await alice.post(
            "/actions/rollback", {"csrf": stolen, "service": SERVICE, "reason": "forged"}
        )
    assert answer.status_code == 403
    assert await latest_state(api) == "progressing"


async def test_a_viewer_sees_no_action_and_the_api_refuses_a_forged_one(api: Harness) -> None:
    await start(api)
    async with browser(api) as client:
        await client.sign_in("victor", "viewer")
        # Then no page offers an action
        for path in ("/", "/live", f"/services/{SERVICE}", f"/services/{SERVICE}/live"):
            page = (await client.get(path)).text
            assert "/actions/" not in page, path
            assert "Roll back" not in page, path
        # and a form made by hand (with the session's own CSRF token) is refused by the API
        answer = await client.act("rollback", SERVICE, "forged", page=(await client.get("/")).text)
    assert answer.status_code == 403
    assert "requires the operator role" in answer.text
    assert await latest_state(api) == "progressing"
    [event] = await api.audit_events(action="canary.rollback")
    assert (event.actor, event.outcome, event.roles) == ("victor", "denied", ["viewer"])


async def test_an_operator_sees_the_actions_of_the_rollouts_state(api: Harness) -> None:
    await start(api)
    async with browser(api) as client:
        await client.sign_in("alice", "operator")
        page = (await client.get(f"/services/{SERVICE}")).text
        assert all(f"actions/{a}" in page for a in ("promote", "pause", "rollback"))
        assert "actions/resume" not in page
        await client.act("pause", SERVICE, "looking")
        page = (await client.get(f"/services/{SERVICE}")).text
        assert "actions/resume" in page
        assert "actions/promote" not in page
        # the audit page is for auditors
        assert f'href="{CONSOLE}/audit"' not in page


# --- live updates --------------------------------------------------------------------------


async def test_the_live_fragment_is_304_until_the_rollout_changes(api: Harness) -> None:
    await start(api)
    async with browser(api) as client:
        await client.sign_in("alice", "operator")
        first = await client.get(f"/services/{SERVICE}/live")
        assert first.status_code == 200
        etag = first.headers["etag"]
        assert "X-Console-Now".lower() in first.headers
        # the wait running down alone is no change (the page counts it down itself)
        api.clock.advance(seconds=30)
        again = await client.get(f"/services/{SERVICE}/live", **{"If-None-Match": etag})
        assert again.status_code == 304
        assert again.content == b""
        # a promotion is
        api.clock.advance(minutes=30)
        assert (await api.post("/canary/promote", {"service": SERVICE})).status_code == 200
        changed = await client.get(f"/services/{SERVICE}/live", **{"If-None-Match": etag})
        assert changed.status_code == 200
        assert changed.headers["etag"] != etag
        assert 'aria-current="step"><span class="pct">25 %' in changed.text
        # signed out, the poller is told so
        client.client.cookies.clear()
        assert (await client.get(f"/services/{SERVICE}/live")).status_code == 401


async def test_each_poll_is_the_users_audited_read(api: Harness) -> None:
    await start(api)
    async with browser(api) as client:
        await client.sign_in("alice", "viewer")
        await client.get(f"/services/{SERVICE}/live")
    [event] = await api.audit_events(action="canary.get")
    assert (event.actor, event.outcome) == ("alice", "success")


# --- audit ---------------------------------------------------------------------------------


async def test_an_auditor_filters_the_log_and_exports_it(api: Harness) -> None:
    await start(api)
    assert (
        await api.post(
            "/canary/rollback", {"service": SERVICE, "reason": "p95 up"}, subject="oncall"
        )
    ).status_code == 200
    async with browser(api) as client:
        await client.sign_in("ada", "auditor")
        page = await client.get("/audit?action=canary.rollback")
        assert page.status_code == 200
        assert '<td class="actor">oncall</td>' in page.text
        assert "p95 up" in page.text
        assert '<td class="action">canary.promote</td>' not in page.text
        assert f"{CONSOLE}/audit/export?action=canary.rollback&amp;format=csv" in page.text
        csv = await client.get("/audit/export?action=canary.rollback&format=csv")
        assert csv.status_code == 200
        assert csv.headers["content-type"].startswith("text/csv")
        assert csv.headers["content-disposition"].startswith("attachment;")
        assert "oncall" in csv.text
        assert "p95 up" in csv.text
        ndjson = await client.get("/audit/export?action=canary.rollback&format=ndjson")
        [line] = ndjson.text.strip().splitlines()
        assert json.loads(line)["actor"] == "oncall"
        bad = await client.get("/audit?since=yesterday")
        assert bad.status_code == 200
        assert "since must be" in bad.text


async def test_the_audit_page_is_refused_to_others(api: Harness) -> None:
    async with browser(api) as client:
        await client.sign_in("alice", "admin")
        page = await client.get("/audit")
        assert page.status_code == 403
        assert "requires the auditor role" in page.text
        export = await client.get("/audit/export?format=csv")
        assert export.status_code == 403


async def test_an_allowlist_applies_to_the_console(pg_url: str, key_file: object) -> None:
    from pathlib import Path

    from tests.support.app import running_app

    assert isinstance(key_file, Path)
    async with running_app(pg_url, key_file, allowed_cidrs="10.0.0.0/8") as api:
        async with browser(api) as client:
            answer = await client.get("/auth/signin")
        assert answer.status_code == 403


async def test_forms_must_be_forms(api: Harness) -> None:
    async with browser(api) as client:
        await client.sign_in("alice", "operator")
        answer = await client.client.post(
            CONSOLE + "/actions/rollback",
            json={"service": SERVICE, "reason": "x"},
            headers={"Sec-Fetch-Site": "same-origin"},
        )
        assert answer.status_code == 415


async def test_a_request_from_another_site_never_replaces_the_session(api: Harness) -> None:
    await start(api)
    async with browser(api) as client:
        await client.sign_in("alice", "operator")
        cookie = client.client.cookies["opsapi_console"]
        # a cross-site navigation carries no SameSite=Strict cookie, as a browser sends it
        client.client.cookies.clear()
        posted = await client.post(
            "/actions/rollback",
            {"service": SERVICE, "reason": "x"},
            **{"Sec-Fetch-Site": "cross-site"},
        )
        linked = await client.get(f"/services/{SERVICE}", **{"Sec-Fetch-Site": "cross-site"})
        signin = await client.get("/auth/signin", **{"Sec-Fetch-Site": "cross-site"})
    assert posted.status_code == 403
    # the link is loaded again from the console itself, which then carries the cookie
    for answer in (linked, signin):
        assert answer.status_code == 200
        assert '<meta http-equiv="refresh"' in answer.text
    for answer in (posted, linked, signin):
        assert "set-cookie" not in answer.headers
    assert cookie
