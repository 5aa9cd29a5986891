"""Time to safe through real routers, as the rollout records it (DESIGN §12).

    .venv/bin/python benchmarks/time_to_safe.py [--rollbacks 100] [--warmup 3]

One `opsapi serve` process on PostgreSQL; real nginx (file router), nginx with the Lua module
(nginx-lua router, 2 workers), HAProxy, each in front of two tiny backends, and a webhook router
posting to a local receiver that checks the signature and answers 204. Each round starts a canary
at 25 % through the API (the answer comes once the router applied it), rolls it back through the
API, timing the request (sent → answer received), then reads the rollout's `time_to_safe`:

- decision → confirmed at 0: `confirmed_at - decided_at` (the webhook router cannot confirm:
  `applied_at - decided_at`, labelled so);
- cause seen → safe: `seconds`, what `opsapi_rollback_time_to_safe_seconds` observes;
- the API's answer latency, measured by this client.

nginx-lua, HAProxy and the webhook take turns round by round, so the machine's load at any moment
weighs on each alike; the file router runs after them, apart, because each reload's new and
retiring nginx workers load the cores during the next rollbacks. Percentiles are nearest-rank
(p99 of 100 samples is the 99th smallest); the load average is printed before, during and after,
since the machine is shared. The Prometheus histogram is read at the end as a cross-check: it must
have counted every rollback, per router.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opsapi.auth.tokens import LocalSigner
from opsapi.routers.nginx_lua import NginxLuaRouter
from tests.support.databases import create_pg_database, drop_pg_database
from tests.support.nginx_lua import admin_addresses, lua_nginx_binary, running_lua_nginx
from tests.support.processes import free_port, start_server, stop
from tests.support.proxies import backends, find_binary, running_haproxy, running_nginx

API = "/internal/ops"
LUA_SECRET = "benchmark-secret-" + "x" * 24
HOOK_SECRET = "benchmark-webhook-secret-0123456789"
CANARY_PERCENT = 25
GOAL_MS = 50.0
GOAL_ROUTERS = ("nginx-lua", "HAProxy")


@dataclass(frozen=True)
class Subject:
    """A router under test: its label, the service using it and its policy's router part."""

    label: str
    service: str
    instance: str
    router: dict[str, Any]
    confirms: bool = True


@dataclass
class Samples:
    """Per rollback, in seconds: decision → confirmed (or applied), cause → safe, the answer."""

    decided_to_safe: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    answer: list[float] = field(default_factory=list)
    # decided_at - detected_at: for a rollback through the API both are the request's arrival.
    detected_to_decided: list[float] = field(default_factory=list)


# --- the webhook receiver ---------------------------------------------------------------------


class _Hook(BaseHTTPRequestHandler):
    server: _HookServer

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        timestamp = self.headers.get("X-Opsapi-Timestamp", "")
        expected = hmac.new(HOOK_SECRET.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
        given = self.headers.get("X-Opsapi-Signature", "")
        # A receiver that did not check would make the webhook look cheaper than a real one.
        ok = hmac.compare_digest(given, "sha256=" + expected.hexdigest())
        self.server.count(ok)
        self.send_response(204 if ok else 401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


class _HookServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Hook)
        self.lock = threading.Lock()
        self.accepted = 0
        self.rejected = 0

    def count(self, ok: bool) -> None:
        with self.lock:
            if ok:
                self.accepted += 1
            else:
                self.rejected += 1


@contextmanager
def hook_receiver() -> Iterator[_HookServer]:
    """A signed-webhook receiver answering 204, in a thread, on a loopback port."""
    server = _HookServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --- measuring --------------------------------------------------------------------------------


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile, in milliseconds."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1000


def instant(safe: dict[str, Any], name: str) -> datetime:
    value = safe.get(name)
    assert value, f"time_to_safe has no {name}: {safe}"
    return datetime.fromisoformat(value)


def rollback(client: httpx.Client, subject: Subject, version: str, into: Samples | None) -> None:
    """Start a canary at 25 %, roll it back; keep the rollback's figures in `into`."""
    started = client.post("/canary/promote", json={"service": subject.service, "version": version})
    assert started.status_code == 200, started.text
    view = started.json()
    assert view["applied_weight"] == CANARY_PERCENT, started.text
    assert not view["router_error"], started.text
    body = {"service": subject.service, "reason": "time-to-safe benchmark"}
    sent = time.perf_counter()
    answer = client.post("/canary/rollback", json=body)
    answered = time.perf_counter() - sent
    assert answer.status_code == 200, answer.text
    assert answer.json()["applied_weight"] == 0, answer.text
    rollout = client.get(f"/canary/{subject.service}")
    assert rollout.status_code == 200, rollout.text
    view = rollout.json()
    assert view["state"] == "rolled_back", rollout.text
    assert view["id"] == answer.json()["id"], rollout.text
    safe = view["time_to_safe"]
    assert safe["router"] == subject.instance, safe
    assert safe["trigger"] == "user", safe
    if into is None:
        return
    end = "confirmed_at" if subject.confirms else "applied_at"
    if not subject.confirms:
        assert safe["confirmed_at"] is None, safe
    decided = instant(safe, "decided_at")
    into.decided_to_safe.append((instant(safe, end) - decided).total_seconds())
    into.detected_to_decided.append((decided - instant(safe, "detected_at")).total_seconds())
    into.seconds.append(float(safe["seconds"]))
    into.answer.append(answered)


def run_rounds(
    client: httpx.Client,
    subjects: list[Subject],
    rounds: int,
    warmup: int,
    results: dict[str, Samples],
    loads: list[float],
) -> None:
    """`warmup` unmeasured then `rounds` measured rollbacks per subject, taking turns."""
    for i in range(warmup + rounds):
        for subject in subjects:
            measured = results[subject.label] if i >= warmup else None
            rollback(client, subject, f"v{i}", measured)
        loads.append(os.getloadavg()[0])


def histogram_counts(metrics_text: str) -> dict[str, float]:
    """Rollbacks by users observed in `opsapi_rollback_time_to_safe_seconds`, per router."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name != "opsapi_rollback_time_to_safe_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_count") and sample.labels.get("trigger") == "user":
                counts[sample.labels["router"]] = sample.value
    return counts


def load_line(when: str) -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {when}: {one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} cores)"


def table(subjects: list[Subject], results: dict[str, Samples]) -> list[str]:
    """The figures, one row per router: p50, p99 and max of each span, in milliseconds."""
    titles = (
        "decision → confirmed at 0",
        "cause seen → safe: seconds",
        "API answer (sent → recv)",
    )
    lines = [f"{'':<10}" + "".join(f" | {title:^26}" for title in titles)]
    lines.append(f"{'router':<10}" + f" | {'p50':>8}{'p99':>9}{'max':>9}" * 3 + "   (ms)")
    for subject in subjects:
        samples = results[subject.label]
        row = f"{subject.label:<10}"
        for values in (samples.decided_to_safe, samples.seconds, samples.answer):
            row += (
                f" | {percentile(values, 0.5):8.1f}{percentile(values, 0.99):9.1f}"
                f"{max(values) * 1000:9.1f}"
            )
        note = "" if subject.confirms else "  first span: decision → applied (cannot confirm)"
        lines.append(f"{row}   n={len(samples.answer)}{note}")
    return lines


# --- the run ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rollbacks", type=int, default=100, help="measured, per router")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured, per router, first")
    args = parser.parse_args()
    nginx_binary, haproxy_binary = find_binary("nginx"), find_binary("haproxy")
    assert nginx_binary, "apt-get install -y nginx"
    assert haproxy_binary, "apt-get install -y haproxy"
    lua_binary = lua_nginx_binary()
    work = Path(tempfile.mkdtemp(prefix="opsapi-timetosafe-"))
    name, url = asyncio.run(create_pg_database())
    server = None
    (lua_admin,) = admin_addresses(1)
    (work / "lua-state").mkdir(parents=True)
    lua_router = NginxLuaRouter("edge-lua", [lua_admin], LUA_SECRET, work / "lua-state" / "s")
    try:
        with (
            backends() as apps,
            running_nginx(nginx_binary, work / "nginx") as nginx,
            running_lua_nginx(lua_binary, work / "nginx-lua", lua_router, lua_admin),
            running_haproxy(haproxy_binary, apps.stable, apps.canary) as haproxy,
            hook_receiver() as hook,
        ):
            routers = {
                "edge": {"type": "nginx", "conf": str(nginx.conf), "prefix": str(nginx.directory),
                         "upstreams_dir": str(nginx.upstreams_dir), "binary": nginx_binary,
                         "probe": nginx.probe},
                "edge-lua": {"type": "nginx-lua", "admin": lua_admin, "secret": LUA_SECRET,
                             "state_file": str(lua_router.state_file)},
                "lb": {"type": "haproxy", "socket": haproxy.socket},
                "hook": {"type": "webhook", "secret": HOOK_SECRET,
                         "url": f"http://127.0.0.1:{hook.server_address[1]}/opsapi/weights"},
            }  # fmt: skip
            (work / "routers.json").write_text(json.dumps(routers))
            env = {
                "OPSAPI_DATABASE_URL": url,
                "OPSAPI_LOCAL_KEY_FILE": str(work / "key.json"),
                "OPSAPI_ROUTERS_FILE": str(work / "routers.json"),
                "OPSAPI_ENV": "test",
            }
            port = free_port()
            server = start_server(port, env, work / "server.log")
            token = LocalSigner.load_or_create(work / "key.json").mint(
                subject="bench", roles=["admin"]
            )
            slots = {"blue": apps.stable, "green": apps.canary}
            subjects = [
                Subject("nginx-lua", "via-nginx-lua", "edge-lua",
                        {"name": "edge-lua", "upstream": "checkout", "slots": slots}),
                Subject("HAProxy", "via-haproxy", "lb",
                        {"name": "lb", "backend": "checkout",
                         "slots": {"blue": "stable", "green": "canary"}}),
                Subject("webhook", "via-webhook", "hook", {"name": "hook"}, confirms=False),
                Subject("nginx", "via-nginx", "edge",
                        {"name": "edge", "upstream": "checkout", "slots": slots}),
            ]  # fmt: skip
            headers = {"Authorization": f"Bearer {token}"}
            base = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=base + API, headers=headers, timeout=60) as client:
                for subject in subjects:
                    policy = {"steps": [{"weight": CANARY_PERCENT, "wait": "1h"},
                                        {"weight": 100, "wait": "1h"}],
                              "router": subject.router}  # fmt: skip
                    answer = client.put(f"/services/{subject.service}", json=policy)
                    assert answer.status_code == 200, answer.text
                print(f"time to safe: {args.rollbacks} rollbacks per router (after {args.warmup} "
                      f"unmeasured), canary at {CANARY_PERCENT} % then rolled back through the "
                      "API; one `opsapi serve` on PostgreSQL", flush=True)  # fmt: skip
                print(load_line("before"), flush=True)
                results = {subject.label: Samples() for subject in subjects}
                loads: list[float] = []
                began = time.monotonic()
                run_rounds(client, subjects[:3], args.rollbacks, args.warmup, results, loads)
                run_rounds(client, subjects[3:], args.rollbacks, args.warmup, results, loads)
                took = time.monotonic() - began
                metrics = httpx.get(f"{base}/metrics", timeout=30)
            assert metrics.status_code == 200, metrics.text
            print(load_line("after"))
            print(f"1-minute load average during the run: min {min(loads):.2f}, "
                  f"mean {statistics.fmean(loads):.2f}, max {max(loads):.2f}; "
                  f"{took:.0f} s in all")  # fmt: skip
            print()
            for row in table(subjects, results):
                print(row)
            print()
            gaps = [gap for samples in results.values() for gap in samples.detected_to_decided]
            print(f"decided_at - detected_at over every API rollback: max "
                  f"{max(gaps) * 1000:.3f} ms (both are the request's arrival: the decision "
                  "span and `seconds` are the same span here)")  # fmt: skip
            for label in GOAL_ROUTERS:
                p99 = percentile(results[label].decided_to_safe, 0.99)
                verdict = "met" if p99 <= GOAL_MS else "NOT met"
                print(f"goal decision → confirmed at 0 ≤ {GOAL_MS:.0f} ms p99 on {label}: "
                      f"{p99:.1f} ms, {verdict}")  # fmt: skip
            counts = histogram_counts(metrics.text)
            expected = args.rollbacks + args.warmup
            print("opsapi_rollback_time_to_safe_seconds_count{trigger=user}: " + ", ".join(
                f"{s.instance} {counts.get(s.instance, 0):.0f}" for s in subjects
            ) + f" (expected {expected} each)")  # fmt: skip
            assert all(counts.get(s.instance) == expected for s in subjects), counts
            print(f"webhook receiver: {hook.accepted} signed posts accepted (204), "
                  f"{hook.rejected} rejected")  # fmt: skip
    finally:
        if server is not None:
            stop(server)
        asyncio.run(drop_pg_database(name))
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
