"""The console in a real headless Chromium (Selenium, Debian's chromedriver) against a real
`opsapi serve` on PostgreSQL with its controller running.

One journey, as people would take it: an operator signs in (embedded mode) and starts a
release whose reason is markup; the page follows the controller's promotions without a reload;
a viewer sees no button, and a hand-made request of theirs is refused; a form posted from
another site is refused; the operator rolls back with a reason; an auditor finds both in the
audit page. Screenshots of each page are kept in tests/console/artifacts/ (ignored by git).
"""

from __future__ import annotations

import http.server
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from opsapi.auth.tokens import LocalSigner
from tests.support.databases import unavailable
from tests.support.processes import free_port, start_server, stop

API = "/internal/ops"
SERVICE = "checkout"
ARTIFACTS = Path(__file__).parent / "artifacts"
HOSTILE = "<script>window.__pwned = 1</script> release v2"
# Chromium is told not to call home: the machine has no internet, and refused connections in
# bulk slow it down.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1100",
)
WAIT_SECONDS = 20

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def chrome(tmp_path: Path) -> Iterator[Any]:
    chromium = shutil.which("chromium")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        unavailable("chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(chromium)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(str(driver_path)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def server(pg_url: str, key_file: Path, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {
        "OPSAPI_DATABASE_URL": pg_url,
        "OPSAPI_LOCAL_KEY_FILE": str(key_file),
        "OPSAPI_ENV": "test",
        "OPSAPI_CONTROLLER_POLL_SECONDS": "0.2",
    }
    process = start_server(port, env, tmp_path / "server.log")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


@pytest.fixture
def other_site(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A page on another site (localhost is not 127.0.0.1's site) that posts a form to us."""
    root = tmp_path / "other-site"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://localhost:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def shot(driver: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / name))


def wait_for(driver: Any, condition: Any, what: str) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    # The page refreshes its live parts by itself: an element found just before a refresh
    # goes stale, and the condition is simply looked at again. Chromedriver reports the same
    # race, when the refresh lands while it reads the element, as an "unknown error" whose
    # node "does not belong to the document".
    def looked_at(d: Any) -> Any:
        try:
            return condition(d)
        except WebDriverException as error:
            if "does not belong to the document" in (error.msg or ""):
                return False
            raise

    wait = WebDriverWait(driver, WAIT_SECONDS, poll_frequency=0.2,
                         ignored_exceptions=(StaleElementReferenceException,))  # fmt: skip
    return wait.until(looked_at, what)


def css(driver: Any, selector: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def all_css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(driver.find_elements(By.CSS_SELECTOR, selector))


def sign_in(driver: Any, base: str, subject: str, role: str, then: str = "/") -> None:
    """The local sign-in form, from a page that needs a session."""
    from selenium.webdriver.support.ui import Select

    driver.get(f"{base}{API}/console{then}")
    wait_for(driver, lambda d: "/auth/signin" in d.current_url, "the sign-in page")
    css(driver, "#local-signin input[name=subject]").send_keys(subject)
    Select(css(driver, "#local-signin select[name=role]")).select_by_value(role)
    css(driver, "#local-signin button[type=submit]").click()
    wait_for(driver, lambda d: subject in css(d, "#who").text, f"signed in as {subject}")


def sign_out(driver: Any) -> None:
    css(driver, "form.signout button").click()
    wait_for(driver, lambda d: "/auth/signin" in d.current_url, "signed out")


def act(driver: Any, action: str, reason: str, **fields: str) -> None:
    """Open an action, say why, press its button."""
    css(driver, f"details.action-{action} summary").click()
    for name, value in fields.items():
        css(driver, f"details.action-{action} input[name={name}]").send_keys(value)
    css(driver, f"details.action-{action} input[name=reason]").send_keys(reason)
    css(driver, f"details.action-{action} button[type=submit]").click()


def current_step(driver: Any) -> str:
    items = all_css(driver, "#live .ladder li.current .pct")
    return str(items[0].text) if items else ""


def test_operator_viewer_and_auditor_in_a_real_browser(
    chrome: Any, server: str, key_file: Path, other_site: tuple[Path, str]
) -> None:
    started = time.monotonic()
    driver = chrome
    console = f"{server}{API}/console"
    admin = {
        "Authorization": "Bearer "
        + LocalSigner.load_or_create(key_file).mint(subject="platform-admin", roles=["admin"])
    }
    # Given a service whose steps promote themselves after 2 s each (a 1 h bake at 100 %)
    policy = {
        "steps": [
            {"weight": 10, "wait": "2s"},
            {"weight": 50, "wait": "2s"},
            {"weight": 100, "wait": "1h"},
        ],
        "interval": "1s",
        "auto_promote": True,
    }
    assert httpx.put(f"{server}{API}/services/{SERVICE}", json=policy, headers=admin).is_success

    # When alice, an operator, signs in from the console's front door
    driver.get(f"{server}/")
    wait_for(driver, lambda d: "/auth/signin" in d.current_url, "sent to sign in")
    shot(driver, "01-sign-in.png")
    sign_in(driver, server, "alice", "operator", then=f"/services/{SERVICE}")
    assert driver.current_url == f"{console}/services/{SERVICE}"
    # and starts v2 with a reason that is markup
    act(driver, "start", HOSTILE, version="v2", stable_version="v1")
    wait_for(driver, lambda d: "Started checkout" in css(d, "main").text, "the start's answer")
    # Then the reason reads as text, and no script of it ran
    assert HOSTILE in css(driver, "#live .reason").text
    assert driver.execute_script("return window.__pwned === undefined") is True
    shot(driver, "02-service-started.png")

    # And the page follows the controller's promotions without a reload
    driver.execute_script("window.__same_page = true")
    assert current_step(driver) in ("10 %", "50 %")
    wait_for(driver, lambda d: current_step(d) == "50 %", "the page to show 50 %")
    assert driver.execute_script("return window.__same_page === true") is True
    assert int(css(driver, "#live").get_attribute("data-updates") or 0) >= 1
    assert "50 %" in css(driver, "#live .desired-weight").text
    shot(driver, "03-service-progressing.png")
    driver.get(console + "/")
    assert SERVICE in css(driver, "#live").text
    shot(driver, "04-overview.png")
    sign_out(driver)

    # When victor, a viewer, opens the same page
    sign_in(driver, server, "victor", "viewer", then=f"/services/{SERVICE}")
    # Then he sees the rollout (at 50 % or, by now, baking at 100 %) but no button to act on it
    assert css(driver, "#live .desired-weight").text in ("50 %", "100 %")
    assert all_css(driver, "form[action*='/actions/']") == []
    assert all_css(driver, "details.action") == []
    shot(driver, "05-viewer.png")
    # and a request he makes by hand, with his own session's CSRF token, is refused by the API
    forged = driver.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        const csrf = document.querySelector("form.signout input[name=csrf]").value;
        const body = new URLSearchParams({csrf: csrf, service: "checkout", reason: "forged"});
        fetch(arguments[0], {method: "POST", body: body, credentials: "same-origin"})
          .then(r => r.text().then(t => done({status: r.status, text: t})))
          .catch(e => done({status: 0, text: String(e)}));
        """,
        f"{console}/actions/rollback",
    )
    assert forged["status"] == 403, forged
    assert "requires the operator role" in forged["text"]
    sign_out(driver)

    # When a page on another site posts a rollback form to the console while alice is signed in
    sign_in(driver, server, "alice", "operator", then=f"/services/{SERVICE}")
    root, origin = other_site
    (root / "attack.html").write_text(
        '<form id="f" method="post" action="' + console + '/actions/rollback">'
        '<input name="service" value="checkout"><input name="reason" value="csrf"></form>'
        "<script>document.getElementById('f').submit()</script>"
    )
    driver.get(f"{origin}/attack.html")
    wait_for(driver, lambda d: "/actions/rollback" in d.current_url, "the forged post")
    # Then the console refuses it (the browser sends no session cookie across sites)
    assert "Refused" in css(driver, "main").text
    shot(driver, "06-cross-site-refused.png")
    rollout = httpx.get(f"{server}{API}/canary/{SERVICE}", headers=admin).json()
    assert rollout["state"] in ("progressing", "awaiting_promotion", "baking")

    # When alice rolls the release back with a reason
    driver.get(f"{console}/services/{SERVICE}")
    act(driver, "rollback", "p95 latency up on v2")
    wait_for(driver, lambda d: "Rolled back checkout" in css(d, "main").text, "the rollback")
    # Then the page says traffic is back on the stable version
    assert "rolled back" in css(driver, "#live .state").text
    assert "0 %" in css(driver, "#live .desired-weight").text
    shot(driver, "07-rolled-back.png")
    sign_out(driver)

    # When ada, an auditor, looks for rollbacks in the audit page
    sign_in(driver, server, "ada", "auditor", then="/audit")
    css(driver, "#audit-filters input[name=action]").send_keys("canary.rollback")
    css(driver, "#audit-filters button[type=submit]").click()
    wait_for(driver, lambda d: "action=canary.rollback" in d.current_url, "the filtered log")
    rows = [
        (css(row, ".actor").text, css(row, ".action").text, row.text)
        for row in all_css(driver, "table.audit tbody tr")
    ]
    # Then alice's rollback is there with its reason, and victor's refused attempt
    assert any(actor == "alice" and "success" in text for actor, _, text in rows), rows
    assert any(actor == "victor" and "denied" in text for actor, _, text in rows), rows
    css(driver, "table.audit tbody tr details summary").click()
    shot(driver, "08-audit.png")
    # and the CSV export link downloads the same events
    exported = driver.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        fetch(document.getElementById("export-csv").href, {credentials: "same-origin"})
          .then(r => r.text().then(t => done({status: r.status, text: t})));
        """
    )
    assert exported["status"] == 200
    assert "p95 latency up on v2" in exported["text"]
    driver.get(f"{console}/freezes")
    shot(driver, "09-freezes.png")

    # And the API's own log says the same, with the console's request ids
    events = httpx.get(
        f"{server}{API}/audit",
        params={"action": "canary.rollback"},
        headers={
            "Authorization": "Bearer "
            + LocalSigner.load_or_create(key_file).mint(subject="reviewer", roles=["auditor"])
        },
    ).json()["items"]
    by_actor = {event["actor"]: event for event in events}
    assert by_actor["alice"]["outcome"] == "success"
    assert by_actor["alice"]["details"]["reason"] == "p95 latency up on v2"
    assert by_actor["alice"]["request_id"].startswith("console-")
    assert by_actor["victor"]["outcome"] == "denied"
    print(
        json.dumps(
            {
                "browser_test_seconds": round(time.monotonic() - started, 1),
                "screenshots": sorted(p.name for p in ARTIFACTS.glob("*.png")),
            }
        )
    )
