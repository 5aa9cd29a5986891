"""`opsctl` end to end: a real `opsapi serve` process on PostgreSQL, `opsctl` as a real process."""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from opsapi.auth.tokens import LocalSigner
from tests.support.databases import unavailable
from tests.support.processes import free_port, start_server, stop
from tests.support.proxies import backends, find_binary, running_nginx, split

API = "/internal/ops"
OPSCTL = [sys.executable, "-m", "opsapi.opsctl.main"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
FAST_STEPS = [
    {"weight": 10, "wait": "1s"},
    {"weight": 25, "wait": "1s"},
    {"weight": 50, "wait": "1s"},
    {"weight": 100, "wait": "1s"},
]


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@dataclass
class Edge:
    """A real nginx, the server's router instance `edge`, in front of one backend per slot."""

    port: int
    slots: dict[str, str]  # slot name -> the backend's address
    answers: dict[str, str]  # what each slot's backend answers -> slot name

    def traffic(self, requests: int = 200) -> dict[str, int]:
        """Where `requests` requests through nginx went, per slot."""
        return {self.answers[answer]: n for answer, n in split(self.port, requests).items()}


@dataclass
class Server:
    url: str
    signer: LocalSigner
    config_home: Path
    edge: Edge | None = None
    log: Path | None = None

    def require_edge(self) -> Edge:
        """The nginx router instance (skipped locally, failed in CI, without nginx)."""
        if self.edge is None:
            unavailable("nginx")
        assert self.edge is not None
        return self.edge

    def token(self, role: str, subject: str | None = None) -> str:
        return self.signer.mint(subject=subject or f"{role}-user", roles=[role])

    def env(self, role: str | None = "operator", url: str | None = None) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR", "OPSAPI_TOKEN")
            and not k.startswith("OPSCTL_")
        }
        env.update(OPSAPI_URL=url or self.url, COLUMNS="120", TERM="xterm-256color")
        # No `opsctl login` of the person running the tests may stand in for a missing token.
        env["XDG_CONFIG_HOME"] = str(self.config_home)
        if role is not None:
            env["OPSAPI_TOKEN"] = self.token(role)
        return env

    def opsctl(
        self, *args: str, role: str | None = "operator", token: str | None = None,
        url: str | None = None,
    ) -> Result:  # fmt: skip
        env = self.env(role, url)
        if token is not None:
            env["OPSAPI_TOKEN"] = token
        done = subprocess.run(
            [*OPSCTL, *args], env=env, capture_output=True, text=True, timeout=30, check=False
        )
        return Result(done.returncode, done.stdout, done.stderr)

    def parallel(
        self, *calls: tuple[str, ...] | tuple[tuple[str, ...], dict[str, Any]]
    ) -> list[Result]:
        """Several independent `opsctl` runs at once (each is a whole process start)."""

        def run(call: Any) -> Result:
            if len(call) == 2 and isinstance(call[0], tuple):
                return self.opsctl(*call[0], **call[1])
            return self.opsctl(*call)

        with ThreadPoolExecutor(max_workers=4) as pool:
            return list(pool.map(run, calls))

    def start(self, service: str, version: str = "v2", **body: Any) -> dict[str, Any]:
        """Start a rollout through the API (setup, when opsctl is not what is tested)."""
        body = {"service": service, "version": version, **body}
        response = self.api("POST", "/canary/promote", role="operator", json=body)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def api(self, method: str, path: str, role: str = "admin", **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token(role)}"}
        return httpx.request(method, self.url + API + path, headers=headers, timeout=10, **kwargs)

    def put_policy(self, service: str, **policy: Any) -> None:
        response = self.api("PUT", f"/services/{service}", json=policy)
        assert response.status_code == 200, response.text

    def rollout(self, service: str) -> dict[str, Any]:
        response = self.api("GET", f"/canary/{service}", role="viewer")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def wait_until(self, service: str, predicate: Any, timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            rollout = self.rollout(service)
            if predicate(rollout):
                return rollout
            if time.monotonic() >= deadline:
                # What the server said meanwhile (a failed background write is only logged).
                said = self.log.read_text()[-3000:] if self.log is not None else ""
                raise AssertionError(f"gave up waiting; last: {rollout}\nserver log:\n{said}")
            time.sleep(0.1)

    def require_route(self, method: str, path: str, role: str) -> None:
        """Skip (only) when the route is not built yet on this server."""
        response = self.api(method, path, role=role, json={} if method == "POST" else None)
        if response.status_code in (404, 405) and response.json().get("detail") in (
            "Not Found",
            "Method Not Allowed",
        ):
            pytest.skip(
                f"{method} {API}{path} does not exist on this server yet (being built by a "
                "colleague): the opsctl command is written but cannot be tested"
            )


@pytest.fixture(scope="module")
def edge_nginx(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Edge, dict[str, Any]] | None]:
    """nginx in front of two backends (blue answers "stable", green "canary"), and its entry in
    the routers file. Absent without an nginx binary: only the tests needing it are skipped."""
    binary = find_binary("nginx")
    if binary is None:
        yield None
        return
    directory = tmp_path_factory.mktemp("nginx")
    with backends() as running, running_nginx(binary, directory, upstream="shop") as nginx:
        instance = {
            "type": "nginx", "conf": str(nginx.conf), "prefix": str(nginx.directory),
            "upstreams_dir": str(nginx.upstreams_dir), "binary": nginx.binary,
            "probe": nginx.probe, "confirm_timeout": 3,
        }  # fmt: skip
        slots = {"blue": running.stable, "green": running.canary}
        yield Edge(nginx.port, slots, {"stable": "blue", "canary": "green"}), instance


@pytest.fixture(scope="module")
def running_server(
    pg_database: tuple[str, str],
    key_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
    edge_nginx: tuple[Edge, dict[str, Any]] | None,
) -> Iterator[Server]:
    """One `opsapi serve` process for the module (starting one per test would double its time),
    with the nginx router instance `edge` when nginx is installed."""
    signer = LocalSigner.load_or_create(key_file)  # before the server, so both use one key
    directory = tmp_path_factory.mktemp("opsctl")
    env = {
        "OPSAPI_DATABASE_URL": pg_database[1],
        "OPSAPI_LOCAL_KEY_FILE": str(key_file),
        "OPSAPI_CONTROLLER_POLL_SECONDS": "0.2",
        "OPSAPI_ENV": "test",
    }
    edge = None
    if edge_nginx is not None:
        edge, instance = edge_nginx
        routers = directory / "routers.json"
        routers.write_text(json.dumps({"edge": instance}))
        env["OPSAPI_ROUTERS_FILE"] = str(routers)
    port = free_port()
    process = start_server(port, env, directory / "server.log")
    try:
        yield Server(
            f"http://127.0.0.1:{port}", signer, directory / "config", edge, directory / "server.log"
        )
    finally:
        stop(process)


@pytest.fixture
def server(running_server: Server, pg_url: str) -> Server:
    """The server, on the test database that `pg_url` has just emptied for this test."""
    assert pg_url
    return running_server


def plain(text: str) -> str:
    return ANSI.sub("", text)


def flat(text: str) -> str:
    """The words of opsctl's output in order, without colours, borders or line breaks."""
    return " ".join(plain(text).replace("│", " ").split())


# ---------------------------------------------------------------------------------------------


def test_promote_starts_a_rollout_and_status_shows_the_ladder(server: Server) -> None:
    started = server.opsctl("promote", "checkout", "--version", "v2", "--reason", "release 2")

    assert started.code == 0, started.err
    assert "progressing at 10%" in started.out
    assert "10% ▶ → 25% → 50% → 75% → 100%" in started.out
    assert "30m left" in started.out

    shown, listed = server.parallel(
        (("status", "checkout"), {"role": "viewer"}), (("status",), {"role": "viewer"})
    )
    assert shown.code == 0, shown.err
    for expected in ("checkout", "v2 (canary)", "progressing", "release 2", "triggered by"):
        assert expected.lower() in shown.out.lower(), expected
    assert "10% ▶ → 25% → 50% → 75% → 100%" in shown.out
    assert "of 30m wait" in shown.out
    assert "left" in shown.out
    assert "desired 10% · applied — (no client has fetched it yet)" in flat(shown.out)
    assert listed.code == 0, listed.err
    assert "checkout" in listed.out
    assert "progressing" in listed.out
    assert "1/5" in listed.out
    # once a pull client has fetched the weight, it is applied
    assert server.api("GET", "/canary/checkout/weight", role="viewer").json()["weight"] == 10
    server.wait_until("checkout", lambda r: r["applied_weight"] == 10)
    fetched = server.opsctl("status", "checkout", role="viewer")
    assert "desired 10% · applied 10% router pull" in flat(fetched.out), fetched.out


def test_promote_too_early_is_a_conflict_with_the_time_left(server: Server) -> None:
    server.start("checkout")

    early = server.opsctl("promote", "checkout")

    assert early.code == 6
    assert early.err.startswith("opsctl: conflict:")
    assert "left" in early.err
    assert len(early.err.strip().splitlines()) == 1
    assert server.rollout("checkout")["desired_weight"] == 10


def test_policy_with_short_waits_lets_promote_reach_25(server: Server) -> None:
    server.put_policy("fast", steps=FAST_STEPS, interval="1s")
    assert server.opsctl("promote", "fast", "--version", "v2").code == 0
    server.wait_until("fast", lambda r: r["ready"])

    promoted = server.opsctl("promote", "fast", "--from", "10", "--reason", "looks good")

    assert promoted.code == 0, promoted.err
    assert "at 25%" in promoted.out
    assert "10% ✓ → 25% ▶ → 50% → 100%" in promoted.out
    assert server.rollout("fast")["desired_weight"] == 25
    # a repeat guarded by --from acts at most once
    stale = server.opsctl("promote", "fast", "--from", "10")
    assert stale.code == 6
    assert "conflict" in stale.err


def test_a_retried_command_with_one_idempotency_key_acts_once(server: Server) -> None:
    server.put_policy("retry", steps=FAST_STEPS, interval="1s")
    server.start("retry")
    server.wait_until("retry", lambda r: r["ready"])

    first = server.opsctl("promote", "retry", "--idempotency-key", "ticket-42", "--json")
    server.wait_until("retry", lambda r: r["ready"])
    again = server.opsctl("promote", "retry", "--idempotency-key", "ticket-42", "--json")

    assert first.code == 0, first.err
    assert again.code == 0, again.err
    assert first.json()["desired_weight"] == again.json()["desired_weight"] == 25
    assert "already used" in again.err
    assert server.rollout("retry")["desired_weight"] == 25


def test_rollback_sets_the_weight_to_zero(server: Server) -> None:
    server.start("checkout")

    rolled = server.opsctl("rollback", "checkout", "--reason", "error rate up")

    assert rolled.code == 0, rolled.err
    assert "rolled_back" in rolled.out
    assert "weight 0%" in rolled.out
    assert "10% ✗ → 25%" in rolled.out
    rollout = server.rollout("checkout")
    assert (rollout["state"], rollout["desired_weight"]) == ("rolled_back", 0)
    # a second rollback is refused and changes nothing; --json prints the problem document
    again = server.opsctl("rollback", "checkout", "--reason", "again", "--json")
    assert again.code == 6
    assert "already been rolled back" in again.err
    assert again.json()["reason_code"] == "terminal"


def test_pause_and_resume(server: Server) -> None:
    server.start("checkout")

    paused = server.opsctl("pause", "checkout", "--reason", "investigating")
    assert paused.code == 0, paused.err
    assert "paused at 10%" in paused.out
    assert "frozen" in paused.out
    assert server.rollout("checkout")["state"] == "paused"

    shown, refused, twice = server.parallel(
        ("status", "checkout"),
        (("promote", "checkout", "--force"), {"role": "admin"}),
        ("pause", "checkout"),
    )
    assert "10% ⏸" in shown.out
    assert "clock frozen" in shown.out
    assert refused.code == 6
    assert "paused" in refused.err
    assert twice.code == 6

    resumed = server.opsctl("resume", "checkout")
    assert resumed.code == 0, resumed.err
    assert "progressing at 10%" in resumed.out
    assert server.rollout("checkout")["state"] == "progressing"


def test_exit_codes_by_class_of_failure(server: Server) -> None:
    server.start("checkout")

    bad_token, no_token, viewer, forced, missing, invalid, target, unreachable, usage = (
        server.parallel(
            (("status", "checkout"), {"token": "not-a-token"}),
            (("status", "checkout"), {"role": None}),
            (("promote", "checkout"), {"role": "viewer"}),
            (("promote", "checkout", "--force"), {"role": "operator"}),
            ("status", "nothing-here"),
            ("status", "Not_A_Service"),
            (("promote", "checkout", "--to", "30"), {"role": "admin"}),
            (("--retries", "0", "status"), {"url": f"http://127.0.0.1:{free_port()}"}),
            ("rollback", "checkout"),  # --reason is required
        )
    )

    assert bad_token.code == 3
    assert bad_token.err.startswith("opsctl: not authenticated: set OPSAPI_TOKEN")
    assert no_token.code == 3
    assert "no token was sent" in no_token.err
    assert viewer.code == 4
    assert viewer.err.startswith("opsctl: forbidden:")
    assert "requires the operator role" in viewer.err
    assert forced.code == 4
    assert "force requires the admin role" in forced.err
    assert missing.code == 5
    assert "not found" in missing.err
    assert "nothing-here" in missing.err
    assert invalid.code == 7
    assert invalid.err.startswith("opsctl: invalid:")
    assert target.code == 7
    assert unreachable.code == 9
    assert "cannot reach opsapi at http://127.0.0.1:" in unreachable.err
    assert usage.code == 2
    for result in (bad_token, no_token, viewer, forced, missing, invalid, target, unreachable):
        assert len(result.err.strip().splitlines()) == 1, result.err
        assert "Traceback" not in result.err
    assert server.rollout("checkout")["desired_weight"] == 10


def test_help_documents_the_exit_codes() -> None:
    done = subprocess.run(
        [*OPSCTL, "--help"], capture_output=True, text=True, check=False,
        env={**os.environ, "COLUMNS": "120"},
    )  # fmt: skip

    assert done.returncode == 0
    for line in ("0: success", "3: not authenticated", "6: conflict", "9: opsapi unreachable"):
        assert line in done.stdout


def test_watch_refreshes_the_view(server: Server) -> None:
    server.put_policy(
        "watched", steps=[{"weight": 10, "wait": "4s"}, {"weight": 100, "wait": "1s"}]
    )
    server.start("watched")
    watch = ("status", "watched", "--watch", "--interval", "0.5", "--count", "3")

    with ThreadPoolExecutor(max_workers=1) as pool:
        on_terminal = pool.submit(run_in_terminal, [*OPSCTL, *watch], server.env("viewer"))
        started = time.monotonic()
        piped = server.opsctl(*watch)
        took = time.monotonic() - started
        code, output = on_terminal.result()

    # piped (a log, a pipe): every frame is printed, one after the other
    assert piped.code == 0, piped.err
    assert took >= 1.0  # two sleeps of 0.5 s between three frames
    assert [f"refresh {n}" in piped.out for n in (1, 2, 3, 4)] == [True, True, True, False]
    assert piped.out.count("10% ▶ → 100%") == 3
    assert piped.out.count("of 4s wait") == 3
    assert slots_in(piped.out) == {
        "blue": ["unknown", "stable", "90%"],
        "green": ["v2", "canary", "10%"],
    }
    assert "━" in piped.out
    assert "─" in piped.out
    # on a terminal, rich.live redraws the frame in place
    assert code == 0, output
    assert "\x1b[1A" in output  # cursor up
    text = plain(output)
    assert "refresh 3" in text
    assert text.count("10% ▶ → 100%") >= 3
    assert "━" in text
    assert "of 4s wait" in text


def test_watch_stops_when_the_rollout_is_finished(server: Server) -> None:
    server.start("checkout")
    assert server.api("POST", "/canary/rollback", json={"service": "checkout", "reason": "x"})

    watched = server.opsctl("status", "checkout", "--watch", "--interval", "0.2", "--json")

    assert watched.code == 0, watched.err
    frames = [json.loads(line) for line in watched.out.splitlines()]
    assert [frame["state"] for frame in frames] == ["rolled_back"]


def test_history_lists_rollouts_newest_first(server: Server) -> None:
    server.start("checkout", "v2")
    server.api("POST", "/canary/rollback", json={"service": "checkout", "reason": "broken"})
    server.start("checkout", "v3")

    shown, listed, one = server.parallel(
        (("history", "checkout"), {"role": "viewer"}),
        (("history", "checkout", "--json"), {"role": "viewer"}),
        (("history", "checkout", "--limit", "1", "--json"), {"role": "viewer"}),
    )

    assert shown.code == 0, shown.err
    assert "rolled_back" in shown.out
    assert "broken" in shown.out
    assert shown.out.index("v3") < shown.out.index("v2")
    assert [item["canary_version"] for item in listed.json()["items"]] == ["v3", "v2"]
    assert [item["canary_version"] for item in one.json()["items"]] == ["v3"]
    assert one.json()["next_cursor"] is not None


def test_json_output_is_the_raw_answer(server: Server) -> None:
    promoted = server.opsctl("promote", "checkout", "--version", "v2", "--json")
    paused = server.opsctl("pause", "checkout", "--json")
    resumed = server.opsctl("resume", "checkout", "--json")
    status, listed, refused = server.parallel(
        (("status", "checkout", "--json"), {"role": "viewer"}),
        (("status", "--json"), {"role": "viewer"}),
        ("promote", "checkout", "--json"),
    )

    assert promoted.json()["canary_version"] == "v2"
    assert promoted.json()["steps"][0] == {"weight": 10, "wait": "30m"}
    assert paused.json()["state"] == "paused"
    assert resumed.json()["state"] == "progressing"
    assert status.json()["id"] == promoted.json()["id"]
    assert [item["service"] for item in listed.json()["items"]] == ["checkout"]
    # a refusal with --json also prints the problem document, for scripts
    assert refused.code == 6
    assert refused.json()["reason_code"] == "not_ready"


def test_gates_evaluations_and_forced_promotion(server: Server) -> None:
    gate = {
        "name": "error-rate",
        "query": 'sum(rate(http_requests_total{service="{service}",code=~"5.."}[1m]))',
        "op": "<",
        "threshold": 0.01,
    }
    server.put_policy("gated", steps=FAST_STEPS, interval="1s", gates=[gate])
    rollout_id = server.start("gated")["id"]
    server.wait_until(
        "gated", lambda r: r["time_left"] == "0s" and r["gates"][0]["phase"] != "pending"
    )

    shown, evaluations, limited, unknown, blocked = server.parallel(
        ("status", "gated"),
        ("evaluations", str(rollout_id), "--gate", "error-rate"),
        ("evaluations", str(rollout_id), "--limit", "1", "--json"),
        ("evaluations", "99999"),
        ("promote", "gated"),
    )

    assert "Gates" in shown.out
    assert "error-rate" in shown.out
    assert "no_data" in shown.out
    assert "0.01" in shown.out
    assert "blocked by error-rate" in shown.out
    assert evaluations.code == 0, evaluations.err
    assert "error-rate" in evaluations.out
    assert "no_data" in evaluations.out
    assert len(limited.json()["items"]) == 1
    assert unknown.code == 5
    assert blocked.code == 6
    assert "error-rate" in blocked.err
    forced = server.opsctl("promote", "gated", "--force", "-r", "metrics are down", role="admin")
    assert forced.code == 0, forced.err
    assert "at 25%" in forced.out


def test_execute_runs_named_operations(server: Server) -> None:
    server.require_route("POST", "/execute", "viewer")
    server.start("checkout")

    health, dry, unknown, denied, invalid, bad_param = server.parallel(
        (("execute", "health-check"), {"role": "viewer"}),
        (("execute", "set-weight", "-p", "service=checkout", "-p", "weight:=30",
          "-p", "reason=incident 42", "--dry-run", "--json"), {"role": "admin"}),
        ("execute", "no-such-operation"),
        (("execute", "set-weight", "-p", "service=checkout"), {"role": "viewer"}),
        (("execute", "set-weight", "-p", "service=checkout", "-p", "weight=lots"),
         {"role": "admin"}),
        ("execute", "health-check", "-p", "oops"),
    )  # fmt: skip

    assert health.code == 0, health.err
    assert "health-check" in health.out
    assert "database" in health.out
    assert dry.code == 0, dry.err
    assert dry.json()["dry_run"] is True
    assert dry.json()["result"]["to_weight"] == 30
    assert server.rollout("checkout")["desired_weight"] == 10
    assert unknown.code == 5
    assert denied.code == 4
    assert invalid.code == 7
    assert "params.weight" in invalid.err
    assert bad_param.code == 2


def test_audit_query_and_export(server: Server) -> None:
    server.require_route("GET", "/audit", "auditor")
    server.start("checkout")  # as operator-user
    refused = server.api("POST", "/canary/promote", role="viewer", json={"service": "checkout"})
    assert refused.status_code == 403

    table, denied, one, recent, older, bogus, forbidden = server.parallel(
        (("audit", "--service", "checkout"), {"role": "auditor"}),
        (("audit", "--outcome", "denied", "--format", "json"), {"role": "auditor"}),
        (("audit", "--limit", "1", "--format", "json"), {"role": "auditor"}),
        (("audit", "--since", "1h", "--actor", "operator-user", "-f", "json"),
         {"role": "auditor"}),
        (("audit", "--until", "1h", "--format", "json"), {"role": "auditor"}),
        (("audit", "--outcome", "bogus"), {"role": "auditor"}),
        (("audit",), {"role": "operator"}),
    )  # fmt: skip

    assert table.code == 0, table.err
    assert "canary.promote" in table.out
    assert "operator-user" in table.out
    assert denied.code == 0, denied.err
    assert [(item["actor"], item["action"]) for item in denied.json()["items"]] == [
        ("viewer-user", "canary.promote")
    ]
    assert len(one.json()["items"]) == 1
    assert one.json()["next_cursor"]
    assert recent.json()["items"]
    assert all(item["actor"] == "operator-user" for item in recent.json()["items"])
    assert older.json()["items"] == []
    assert bogus.code == 7
    assert forbidden.code == 4

    server.require_route("GET", "/audit/export?format=csv", "auditor")
    exported, limited = server.parallel(
        (("audit", "--service", "checkout", "--format", "csv"), {"role": "auditor"}),
        (("audit", "--format", "csv", "--limit", "5"), {"role": "auditor"}),
    )
    assert exported.code == 0, exported.err
    # The module's one server aggregates weight polls per minute and writes them when the minute
    # is over: an earlier test's polls of checkout may land during this one. Only this test's
    # own events are looked at.
    rows = [
        row
        for row in csv.DictReader(io.StringIO(exported.out))
        if row["action"] not in ("canary.weight.polls", "canary.get.repeats")
    ]
    assert rows[0]["action"] == "canary.promote"
    assert {"id", "at", "actor", "outcome", "hash"} <= set(rows[0])
    assert limited.code == 2


def test_audit_verify(server: Server) -> None:
    server.require_route("GET", "/audit/verify", "auditor")
    server.start("checkout")

    verified, raw = server.parallel(
        (("audit", "verify"), {"role": "auditor"}),
        (("audit", "verify", "--json"), {"role": "auditor"}),
    )

    assert verified.code == 0, verified.err
    assert "audit chain intact" in verified.out
    assert raw.json()["intact"] is True

    # an anchor kept earlier: the chain still holds it; a forged one is reported, exit 10
    head = raw.json()["head"]
    anchor = f"{head['id']}:{head['hash']}"
    forged = f"{head['id']}:{'0' * 64}"
    held, lost = server.parallel(
        (("audit", "verify", "--expect-head", anchor), {"role": "auditor"}),
        (("audit", "verify", "--expect-head", forged), {"role": "auditor"}),
    )
    assert held.code == 0, held.err
    assert f"holds the expected head, event {head['id']}" in flat(held.out)
    assert lost.code == 10
    assert f"audit chain BROKEN at event {head['id']}: expected head differs" in lost.err


# --- the release lifecycle: slots, success, revert; policies as files -------------------------


def slots_in(out: str) -> dict[str, list[str]]:
    """The `Slots` lines of opsctl's output: slot name -> version, role, share (, target)."""
    rows: dict[str, list[str]] = {}
    for line in plain(out).splitlines():
        words = line.replace("│", " ").split()
        if words[:1] == ["Slots"]:
            words = words[1:]
        if words[:1] in (["blue"], ["green"]) and len(words) >= 3:
            rows[words[0]] = words[1:]
    return rows


def test_a_release_lives_through_start_success_and_revert(server: Server, tmp_path: Path) -> None:
    edge = server.require_edge()
    blue, green = edge.slots["blue"], edge.slots["green"]
    # given a short policy on the nginx router with two slots, applied with opsctl
    policy_file = tmp_path / "shop.yaml"
    policy_file.write_text(
        yaml.safe_dump({
            "service": "shop",
            "steps": [{"weight": 50, "wait": "1s"}, {"weight": 100, "wait": "1s"}],
            "interval": "1s",
            "gates": [],
            "router": {"name": "edge", "upstream": "shop", "slots": edge.slots},
        })
    )  # fmt: skip
    applied = server.opsctl("policy", "apply", "-f", str(policy_file), role="admin")
    assert applied.code == 0, applied.err
    assert "+interval: 1s" in applied.out
    assert "policy applied" in applied.out

    # when a first release starts, declaring the version that ran before opsapi knew the service
    started = server.opsctl(
        "promote", "shop", "--version", "v2", "--stable-version", "v1", "-r", "release 2"
    )

    # then opsctl says which version runs where: v1 stable in blue, v2 canary in green
    assert started.code == 0, started.err
    expected = {"blue": ["v1", "stable", "50%", blue], "green": ["v2", "canary", "50%", green]}
    assert slots_in(started.out) == expected
    shown = server.opsctl("status", "shop", role="viewer")
    assert slots_in(shown.out) == expected
    assert "v2 (canary) vs v1 (stable)" in shown.out
    assert "Revert" not in shown.out  # nothing to go back to while a rollout is open
    listed = server.opsctl("status", role="viewer")
    assert re.search(r"shop #\d+\s+v2\s+v1\s", plain(listed.out)), listed.out
    assert re.search(r"^\s+green\s+blue\s", plain(listed.out), re.MULTILINE), listed.out
    # and a revert is refused while the rollout is open
    early = server.opsctl("revert", "shop", "--reason", "too soon")
    assert early.code == 6
    assert "open rollout" in early.err

    # when it is promoted to 100 % and its bake ends
    server.wait_until("shop", lambda r: r["ready"])
    promoted = server.opsctl("promote", "shop", "--from", "50")
    assert promoted.code == 0, promoted.err
    server.wait_until("shop", lambda r: r["state"] == "succeeded")

    # then v2 is stable in green, v1 in blue is what a revert goes back to, and traffic agrees
    succeeded = server.opsctl("status", "shop", role="viewer")
    assert slots_in(succeeded.out) == {
        "blue": ["v1", "previous", "0%", blue],
        "green": ["v2", "stable", "100%", green],
    }
    assert "would go back to v1 in slot blue" in succeeded.out
    assert edge.traffic() == {"green": 200}

    # when an operator reverts
    reverted = server.opsctl("revert", "shop", "--reason", "v2 leaks memory")

    # then opsctl says where traffic goes and that it is there; nginx sends everything to blue
    assert reverted.code == 0, reverted.err
    assert "reverted — v1 is stable again at 100% in slot blue" in reverted.out
    assert "100% to blue (v1), 0% to green (v2)" in reverted.out
    assert "already there" in reverted.out
    assert edge.traffic() == {"blue": 200}
    after = server.opsctl("status", "shop", role="viewer")
    assert slots_in(after.out) == {
        "blue": ["v1", "stable", "100%", blue],
        "green": ["v2", "reverted", "0%", green],
    }
    assert "v1 (stable again)" in after.out

    # and a second revert is a conflict with a clear one-line message, changing nothing
    again = server.opsctl("revert", "shop", "--reason", "again")
    assert again.code == 6
    assert again.err.startswith("opsctl: conflict: shop has no previous version to revert to")
    assert len(again.err.strip().splitlines()) == 1
    assert server.rollout("shop")["stable_slot"] == "blue"
    assert edge.traffic() == {"blue": 200}


def test_revert_and_stable_version_arguments(server: Server) -> None:
    no_reason, stable_alone = server.parallel(
        ("revert", "shop"), ("promote", "shop", "--stable-version", "v1")
    )

    assert no_reason.code == 2
    assert "--reason" in no_reason.err
    assert stable_alone.code == 2
    assert "--version" in stable_alone.err


FULL_POLICY: dict[str, Any] = {
    "steps": [{"weight": 20, "wait": "10m"}, {"weight": 100, "wait": "1h"}],
    "interval": "30s",
    "auto_promote": True,
    "gates": [
        {"name": "errors", "query": 'sum(rate(http_requests_total{service="{service}"}[1m]))',
         "op": "<", "threshold": 0.02, "for": "2m", "on_no_data": "fail"},
        {"name": "latency", "query": 'avg(latency{version="{canary_version}"})',
         "baseline_query": 'avg(latency{version="{stable_version}"})',
         "op": "<=", "threshold": 1.1, "for": "0s", "on_no_data": "hold"},
    ],
    "min_sample": {"query": 'sum(increase(http_requests_total{service="{service}"}[1m]))',
                   "min": 100.0},
    "router": {"name": "pull"},
    "pagerduty": {"service_ids": ["PABC123"], "priorities": ["P1", "P2"], "urgencies": ["high"],
                  "routing_key": "R0123456789abcdefR0123456789abcd"},
}  # fmt: skip


def stored_policy(server: Server, service: str) -> dict[str, Any]:
    response = server.api("GET", f"/services/{service}", role="viewer")
    assert response.status_code == 200, response.text
    return {k: v for k, v in response.json().items() if k != "status"}


def test_policy_get_edit_apply_round_trip_keeps_everything(server: Server, tmp_path: Path) -> None:
    # given a policy using every field, routing key included
    server.put_policy("shop", **FULL_POLICY)
    server.start("shop", "v2", stable_version="v1")
    original = stored_policy(server, "shop")

    # when it is read as YAML, edited as text, checked with --dry-run and applied
    got = server.opsctl("policy", "get", "shop", role="viewer")
    assert got.code == 0, got.err
    assert "# Status (read-only; apply ignores it):" in got.out
    assert "#   stable_slot: blue" in got.out
    assert "R0123456789abcd" not in got.out  # the routing key stays secret
    edited = tmp_path / "shop.yaml"
    edited.write_text(got.out.replace("interval: 30s", "interval: 45s"))
    dry = server.opsctl("policy", "apply", "-f", str(edited), "--dry-run", role="admin")
    assert stored_policy(server, "shop") == original
    applied = server.opsctl("policy", "apply", "-f", str(edited), role="admin")

    # then both show the one change as a diff, and exactly that one change is stored
    for result in (dry, applied):
        assert result.code == 0, result.err
        changes = [line for line in plain(result.out).splitlines() if line[:1] in "+-"]
        assert changes[2:] == ["-interval: 30s", "+interval: 45s"], result.out
    assert "dry run, nothing applied" in dry.out
    assert "policy applied · changed as above" in applied.out
    assert stored_policy(server, "shop") == {**original, "interval": "45s"}
    # and the file as read applies unchanged, as YAML or as JSON (the service as an argument)
    unchanged = tmp_path / "unchanged.yaml"
    unchanged.write_text(server.opsctl("policy", "get", "shop").out)
    as_json = tmp_path / "shop.json"
    as_json.write_text(server.opsctl("policy", "get", "shop", "-o", "json").out)
    assert "status" not in json.loads(as_json.read_text())
    for path, args in ((unchanged, ()), (as_json, ("shop",))):
        again = server.opsctl("policy", "apply", "-f", str(path), *args, role="admin")
        assert again.code == 0, again.err
        assert "no change" in again.out
        assert "---" not in again.out
    assert stored_policy(server, "shop") == {**original, "interval": "45s"}


# A valid gate; each bad case below spoils one field of it.
BASE_GATE = {"name": "errors", "query": "sum(rate(x[5m]))", "op": "<", "threshold": 0.01}


@pytest.mark.parametrize(
    ("gate", "field"),
    [
        pytest.param({**BASE_GATE, "op": "=="}, "gates.0.op", id="unknown-op"),
        pytest.param({k: v for k, v in BASE_GATE.items() if k != "threshold"},
                     "gates.0.threshold", id="no-threshold"),
        pytest.param({**BASE_GATE, "treshold": 1}, "gates.0.treshold", id="misspelt-field"),
        pytest.param({**BASE_GATE, "on_no_data": "ignore"}, "gates.0.on_no_data",
                     id="bad-on-no-data"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("dry_run", [False, True], ids=["apply", "dry-run"])
def test_policy_apply_with_a_bad_gate_names_the_field(
    server: Server, tmp_path: Path, gate: dict[str, Any], field: str, dry_run: bool
) -> None:
    server.put_policy("shop", interval="30s")
    before = stored_policy(server, "shop")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"service": "shop", "gates": [gate]}))

    refused = server.opsctl(
        "policy", "apply", "-f", str(path), *(["--dry-run"] if dry_run else []), role="admin"
    )

    assert refused.code == 7
    lines = refused.err.strip().splitlines()
    assert lines[0].startswith("opsctl: invalid:")
    assert any(line.strip().startswith(f'{field} (gate "errors"): ') for line in lines[1:]), lines
    assert "Traceback" not in refused.err
    assert stored_policy(server, "shop") == before


def test_a_dry_run_of_a_partial_file_shows_what_the_server_fills_in(
    server: Server, tmp_path: Path
) -> None:
    server.put_policy("shop", steps=FAST_STEPS, interval="1s", gates=[BASE_GATE])
    before = stored_policy(server, "shop")
    partial = tmp_path / "partial.yaml"
    partial.write_text("interval: 30s\n")

    dry = server.opsctl("policy", "apply", "-f", str(partial), "shop", "--dry-run")

    assert dry.code == 0, dry.err
    changes = [line for line in plain(dry.out).splitlines() if line[:1] in "+-"]
    assert "+interval: 30s" in changes
    assert "+- weight: 75" in changes  # the default steps replace the fast ones
    assert "+gates: <left out of the file, so the server default gates apply>" in changes
    assert "dry run, nothing applied" in dry.out
    assert stored_policy(server, "shop") == before


def test_policy_files_that_cannot_be_applied(server: Server, tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("steps:\n  - weight: 10\n wait: 1m\n")
    listed = tmp_path / "list.yaml"
    listed.write_text("- weight: 10\n")
    other = tmp_path / "other.yaml"
    other.write_text("service: payments\ninterval: 30s\n")
    nameless = tmp_path / "nameless.yaml"
    nameless.write_text("interval: 30s\n")

    syntax, not_a_policy, mismatch, no_service, missing, operator = server.parallel(
        (("policy", "apply", "-f", str(broken), "shop"), {"role": "admin"}),
        (("policy", "apply", "-f", str(listed), "shop"), {"role": "admin"}),
        (("policy", "apply", "-f", str(other), "shop"), {"role": "admin"}),
        (("policy", "apply", "-f", str(nameless)), {"role": "admin"}),
        (("policy", "apply", "-f", str(tmp_path / "absent.yaml"), "shop"), {"role": "admin"}),
        (("policy", "apply", "-f", str(nameless), "shop"), {"role": "operator"}),
    )

    assert (syntax.code, not_a_policy.code, mismatch.code, no_service.code) == (7, 7, 2, 2)
    assert "not valid YAML" in syntax.err
    assert "line 3" in syntax.err
    assert "not a policy" in not_a_policy.err
    assert "policy of payments, not shop" in mismatch.err
    assert "which service?" in no_service.err
    assert missing.code == 2
    assert "cannot read" in missing.err
    assert operator.code == 4
    for result in (syntax, not_a_policy, mismatch, no_service, missing, operator):
        assert len(result.err.strip().splitlines()) == 1, result.err
        assert result.out == ""
    assert server.api("GET", "/services/payments", role="viewer").json()["interval"] == "1m"
    assert server.api("GET", "/services/shop", role="viewer").json()["interval"] == "1m"


# ---------------------------------------------------------------------------------------------


def run_in_terminal(
    command: list[str], env: dict[str, str], timeout: float = 30
) -> tuple[int, str]:
    """Run `command` with a pseudo-terminal as its stdout: what a person at a terminal sees."""
    master, slave = pty.openpty()
    process = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif process.poll() is not None:
                break
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
        code = process.wait(timeout=10)
    return code, b"".join(chunks).decode(errors="replace")


# --- what happens next, services, narrow terminals --------------------------------------------


def run_at(server: Server, columns: int, *args: str, role: str = "operator") -> Result:
    env = {**server.env(role), "COLUMNS": str(columns)}
    done = subprocess.run([*OPSCTL, *args], env=env, capture_output=True, text=True, timeout=30,
                          check=False)  # fmt: skip
    return Result(done.returncode, done.stdout, done.stderr)


def test_status_says_what_happens_next(server: Server) -> None:
    # given rollouts in each situation: a wait running, an auto-promoting wait, a paused one,
    # and one whose step is ready for a person
    server.put_policy("auto", auto_promote=True, interval="30s")
    server.put_policy("ready", steps=FAST_STEPS, interval="1s")
    for service in ("waiting", "auto", "paused", "ready"):
        server.start(service)
    assert server.api("POST", "/canary/pause", role="operator", json={"service": "paused"})
    server.wait_until("ready", lambda r: r["state"] == "awaiting_promotion")

    # when each is shown
    waiting, auto, paused, ready = server.parallel(
        ("status", "waiting"), ("status", "auto"), ("status", "paused"), ("status", "ready")
    )

    # then "Next" says when the wait ends, what follows, and how often the gates are measured
    # (never the controller's lease, next_evaluation_at)
    view = flat(waiting.out)
    assert re.search(r"Next wait over at \d\d:\d\d:\d\dZ \(in (29m\d+s|30m)\)", view), view
    assert (
        "then, once every gate passes, a person promotes it to 25% (opsctl promote waiting)" in view
    )
    assert "checked every 1m (no gates)" in view, view[-600:]
    assert "Next check" not in view
    assert "the controller promotes it to 25%" in flat(auto.out)
    assert "every 30s" in flat(auto.out)
    assert re.search(
        r"paused with (29m\d+s|30m) of the wait left: opsctl resume paused", flat(paused.out)
    )
    assert "ready: waiting for opsctl promote ready" in flat(ready.out)
    for result in (waiting, auto, paused, ready):
        assert result.code == 0, result.err


def test_services_lists_every_service(server: Server) -> None:
    server.put_policy("billing", interval="30s")
    server.start("checkout", "v2", stable_version="v1")

    shown, raw = server.parallel(
        (("services",), {"role": "viewer"}), (("services", "--json"), {"role": "viewer"})
    )

    assert shown.code == 0, shown.err
    text = plain(shown.out)
    assert re.search(r"^billing\s+none yet\s+—\s+—\s+—\s+pull", text, re.MULTILINE), text
    assert re.search(r"^checkout\s+v1\s+v2\s+progressing\s+10%\s+pull", text, re.MULTILINE), text
    assert "default policy" in text  # checkout has no policy of its own
    api = server.api("GET", "/services", role="viewer").json()
    assert raw.json() == {"items": api["items"], "next_cursor": None}


LONG_VERSION = "2026.11.30-rc.1+build.5f3a9c1e"


@pytest.mark.parametrize("columns", [80, 46])
def test_tables_stay_readable_on_a_narrow_terminal(server: Server, columns: int) -> None:
    # given a gated rollout with long versions and evaluations, a finished one, audit events
    gate = {"name": "webhook-signature-verification", "query": "sum(up)", "op": ">=",
            "threshold": 0.999, "on_no_data": "hold"}  # fmt: skip
    server.put_policy("payments-gateway", steps=FAST_STEPS, interval="1s", gates=[gate])
    started = server.start("payments-gateway", LONG_VERSION, stable_version=LONG_VERSION[:-1])
    server.start("checkout")
    reason = {"service": "checkout", "reason": "error rate up after the deploy"}
    server.api("POST", "/canary/rollback", role="operator", json=reason)
    server.wait_until("payments-gateway", lambda r: r["gates"][0]["phase"] != "pending")
    commands = {
        "status list": ("status",),
        "status": ("status", "payments-gateway"),
        "history": ("history", "checkout"),
        "evaluations": ("evaluations", str(started["id"])),
        "audit": ("audit", "--limit", "5"),
        "services": ("services",),
    }

    # when each table is printed `columns` wide
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip(commands, pool.map(
            lambda args: run_at(server, columns, *args, role="auditor"), commands.values()
        ), strict=True))  # fmt: skip

    # then no line is wider, nothing is cut short with an ellipsis, every heading is whole
    # (a table that cannot fit stacks its rows instead of squeezing columns)
    for name, result in results.items():
        assert result.code == 0, (name, result.err)
        lines = plain(result.out).splitlines()
        assert max(len(line) for line in lines) <= columns, (name, result.out)
        assert "…" not in result.out, (name, result.out)
    headings = {
        "status list": ("rollout", "canary", "stable", "state", "weight", "step", "gates"),
        "history": ("rollout", "canary / from", "weight", "by / reason"),
        "evaluations": ("gate / step", "phase", "value", "threshold", "detail"),
        "audit": ("event", "who", "action / outcome", "service", "details"),
        "services": ("service", "stable", "latest rollout", "state", "weight", "router"),
        "status": ("gate", "phase", "value", "rule", "detail"),
    }
    for name, words in headings.items():
        text = " ".join(plain(results[name].out).split())
        for word in words:
            assert word in text, (name, word, results[name].out)
    # a long gate name may fold inside its column, never lose characters
    squeezed = "".join(plain(results["status"].out).replace("│", "").split())
    assert "webhook-signature-verification" in squeezed
    assert "no_data" in results["evaluations"].out
    assert "rolled_back" in results["history"].out
    history = plain(results["history"].out).split()
    assert all(word in history for word in ["error", "rate", "up", "after", "the", "deploy"])


def test_an_admin_breaks_a_freeze_with_a_reason(server: Server) -> None:
    # given a freeze window over the service, set through the API
    now = time.time()
    window = {"name": "release-freeze", "services": ["frozen-svc"], "reason": "quarter end",
              "starts_at": iso(now - 60), "ends_at": iso(now + 3600)}  # fmt: skip
    assert server.api("POST", "/freezes", json=window).status_code == 201
    start = ("promote", "frozen-svc", "--version", "v2")

    # when an operator starts a release, an operator breaks glass, an admin forgets the reason
    held, operator, reasonless = server.parallel(
        start,
        ((*start, "--break-glass", "-r", "hotfix"), {"role": "operator"}),
        ((*start, "--break-glass"), {"role": "admin"}),
    )

    # then the freeze holds, only an admin may override it, and only with a reason
    assert held.code == 6
    assert "held" in held.err
    assert held.err.count("\n") == 1
    assert operator.code == 4
    assert reasonless.code == 2
    assert "--reason" in reasonless.err
    assert server.api("GET", "/canary/frozen-svc", role="viewer").status_code == 404
    broken = server.opsctl(*start, "--break-glass", "-r", "hotfix for INC-42", role="admin")
    assert broken.code == 0, broken.err
    assert server.rollout("frozen-svc")["canary_version"] == "v2"
    audited = server.api("GET", "/audit?action=canary.promote.override", role="auditor").json()
    # the operator's attempt is there too, denied
    assert sorted(event["outcome"] for event in audited["items"]) == ["denied", "success"]
    [event] = [event for event in audited["items"] if event["outcome"] == "success"]
    assert (event["actor"], event["details"]["reason"]) == ("admin-user", "hotfix for INC-42")


def iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
