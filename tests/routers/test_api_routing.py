"""Weights through the API to real nginx, HAProxy and webhook receivers: desired vs applied,
router errors on the rollout, reconcile with back-off, drift repair.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from opsapi.routers.base import RouteTarget
from opsapi.routers.haproxy import HaproxyRouter
from tests.support.app import Harness, running_app
from tests.support.databases import unavailable
from tests.support.proxies import (
    Backends,
    Haproxy,
    Nginx,
    backends,
    canary_percent,
    find_binary,
    running_haproxy,
    running_nginx,
    split,
)
from tests.support.statements import logged_statements


@pytest.fixture(scope="module")
def servers() -> Iterator[Backends]:
    with backends() as running:
        yield running


def _binary(name: str) -> str:
    binary = find_binary(name)
    if binary is None:
        unavailable(name)
        raise AssertionError("unreachable")
    return binary


@dataclass
class Proxy:
    """A running proxy, the routers-file entry for it and the service's policy parameters."""

    kind: str
    port: int
    instance: dict[str, Any]
    params: dict[str, Any]
    server: Nginx | Haproxy


@pytest.fixture(params=["nginx", "haproxy"])
def proxy(request: pytest.FixtureRequest, tmp_path: Path, servers: Backends) -> Iterator[Proxy]:
    if request.param == "nginx":
        with running_nginx(_binary("nginx"), tmp_path / "nginx") as nginx:
            instance = {
                "type": "nginx", "conf": str(nginx.conf), "prefix": str(nginx.directory),
                "upstreams_dir": str(nginx.upstreams_dir), "binary": nginx.binary,
                "probe": nginx.probe, "confirm_timeout": 3,
            }  # fmt: skip
            slots = {"blue": servers.stable, "green": servers.canary}
            params = {"upstream": "checkout", "slots": slots}
            yield Proxy("nginx", nginx.port, instance, params, nginx)
    else:
        with running_haproxy(_binary("haproxy"), servers.stable, servers.canary) as haproxy:
            instance = {"type": "haproxy", "socket": haproxy.socket, "timeout": 1}
            params = {"backend": "checkout", "slots": {"blue": "stable", "green": "canary"}}
            yield Proxy("haproxy", haproxy.port, instance, params, haproxy)


@pytest.fixture
async def routed(
    pg_url: str, key_file: Path, tmp_path: Path, proxy: Proxy
) -> AsyncIterator[Harness]:
    """The API with a routers file naming the proxy as instance `edge`."""
    routers_file = tmp_path / "routers.json"
    routers_file.write_text(json.dumps({"edge": proxy.instance}))
    async with running_app(
        pg_url, key_file, real_time=True, controller_enabled=False, routers_file=routers_file
    ) as api:
        policy = {
            "steps": [{"weight": w, "wait": "1h"} for w in (10, 25, 50, 75)]
            + [{"weight": 100, "wait": "1h"}],
            "interval": "1s",
            "router": {"name": "edge", **proxy.params},
        }
        response = await api.put("/services/checkout", policy)
        assert response.status_code == 200, response.text
        yield api


async def test_promote_applies_each_weight_before_answering(routed: Harness, proxy: Proxy) -> None:
    started = await routed.post("/canary/promote", {"service": "checkout", "version": "v2"})
    assert started.status_code == 200, started.text
    assert started.json()["applied_weight"] == 10
    assert abs(canary_percent(await asyncio.to_thread(split, proxy.port, 1000)) - 10) <= 3

    jumped = await routed.post(
        "/canary/promote", {"service": "checkout", "force": True, "target_percent": 50}, "admin"
    )

    assert jumped.json()["desired_weight"] == jumped.json()["applied_weight"] == 50
    assert abs(canary_percent(await asyncio.to_thread(split, proxy.port, 1000)) - 50) <= 3
    applies = await routed.audit_events(action="router.apply")
    assert [(e.outcome, e.details["weight"]) for e in applies] == [("success", 10), ("success", 50)]


async def test_rollback_answer_arrives_after_traffic_is_at_zero(
    routed: Harness, proxy: Proxy
) -> None:
    # given a canary at 75 %
    await routed.post("/canary/promote", {"service": "checkout", "version": "v2"})
    body = {"service": "checkout", "force": True, "target_percent": 75}
    await routed.post("/canary/promote", body, "admin")

    # when an operator rolls back
    response = await routed.post("/canary/rollback", {"service": "checkout", "reason": "5xx"})

    # then the answer says traffic is at 0, and none of the next 500 requests reach the canary
    assert response.status_code == 200
    assert response.json()["traffic_at_zero"] is True
    assert response.json()["applied_weight"] == 0
    counts = await asyncio.to_thread(split, proxy.port, 500)
    assert counts["canary"] == 0
    assert counts["stable"] == 500


async def test_a_rollbacks_apply_is_recorded_in_one_transaction_with_its_audit_events(
    routed: Harness, proxy: Proxy
) -> None:
    # given a canary at 10 %
    await routed.post("/canary/promote", {"service": "checkout", "version": "v2"})

    # when an operator rolls back, the SQL sent on the way logged
    async with logged_statements(routed) as statements:
        response = await routed.post("/canary/rollback", {"service": "checkout", "reason": "5xx"})

    # then the applied 0 % is written by the statement that appends the apply's audit event
    # (one round trip fewer before the answer), after the time-to-safe event
    assert response.status_code == 200, response.text
    updates = [sql for sql in statements if "UPDATE rollout " in sql]
    assert len(updates) == 2, updates  # the rollback's own, then the apply's
    assert "audit_append" in updates[0]
    assert "audit_append" in updates[1]
    assert "applied_weight" in updates[1]
    # and the apply's lock and its read of the rollout are statements on their own (no
    # transaction begun and rolled back around either)
    assert "SELECT pg_advisory_lock($1, hashtext($2))" in statements
    assert "ROLLBACK;" not in statements
    # and what the answer says is what is stored, with both events chained
    shown = await routed.get("/canary/checkout")
    assert response.json()["applied_weight"] == shown.json()["applied_weight"] == 0
    assert response.json()["time_to_safe"] == shown.json()["time_to_safe"]
    assert shown.json()["time_to_safe"]["applied_at"] is not None
    safe = await routed.audit_events(action="rollout.safe")
    applies = await routed.audit_events(action="router.apply")
    assert [e.details["weight"] for e in applies] == [10, 0]
    assert len(safe) == 1
    assert safe[0].id < applies[-1].id
    assert (await routed.get("/audit/verify", role="auditor")).json()["intact"] is True


async def test_router_down_never_blocks_a_rollback_and_reconcile_finishes_it(
    routed: Harness, proxy: Proxy
) -> None:
    # given a canary at 25 %, then the proxy's control channel goes away
    await routed.post("/canary/promote", {"service": "checkout", "version": "v2"})
    body = {"service": "checkout", "force": True, "target_percent": 25}
    await routed.post("/canary/promote", body, "admin")
    _break(proxy)
    try:
        # when an operator rolls back
        response = await routed.post("/canary/rollback", {"service": "checkout", "reason": "x"})

        # then the rollback is recorded, and the answer says traffic is not at 0 yet, and why
        assert response.status_code == 200
        rollout = response.json()
        assert rollout["state"] == "rolled_back"
        assert rollout["desired_weight"] == 0
        assert rollout["applied_weight"] == 25
        assert rollout["traffic_at_zero"] is False
        assert rollout["router_error"]
        [failed] = await routed.audit_events(action="router.apply", outcome="error")
        assert failed.details["weight"] == 0
    finally:
        _repair(proxy)

    # and once the router is back, reconcile applies 0 (after the back-off)
    await asyncio.sleep(1.1)
    assert await routed.runtime.traffic.reconcile() == 1
    rollout = (await routed.get("/canary/checkout")).json()
    assert rollout["applied_weight"] == 0
    assert rollout["router_error"] is None
    assert (await asyncio.to_thread(split, proxy.port, 300))["canary"] == 0


def _break(proxy: Proxy) -> None:
    if isinstance(proxy.server, Nginx):
        # An invalid file next to the generated ones: `nginx -t` fails, the old config serves.
        (proxy.server.upstreams_dir / "broken.conf").write_text("this is not nginx config;\n")
    else:
        proxy.server.stop()


def _repair(proxy: Proxy) -> None:
    if isinstance(proxy.server, Nginx):
        (proxy.server.upstreams_dir / "broken.conf").unlink()
    else:
        proxy.server.start()


@pytest.mark.parametrize("proxy", ["nginx"], indirect=True)
async def test_nginx_failure_keeps_the_old_config_serving(routed: Harness, proxy: Proxy) -> None:
    await routed.post("/canary/promote", {"service": "checkout", "version": "v2"})
    _break(proxy)
    try:
        forced = await routed.post(
            "/canary/promote", {"service": "checkout", "force": True}, "admin"
        )
        assert forced.json()["desired_weight"] == 25
        assert forced.json()["applied_weight"] == 10
        assert "nginx" in forced.json()["router_error"]
        # the previous configuration is still the one serving
        assert abs(canary_percent(await asyncio.to_thread(split, proxy.port, 1000)) - 10) <= 3
    finally:
        _repair(proxy)


@pytest.mark.parametrize("proxy", ["haproxy"], indirect=True)
async def test_drift_is_restored_by_reconcile(routed: Harness, proxy: Proxy) -> None:
    # (nginx drift by hand edit + reload is covered in tests/routers/test_nginx.py)
    await routed.post("/canary/promote", {"service": "checkout", "version": "v2"})
    assert isinstance(proxy.server, Haproxy)
    behind_our_back = HaproxyRouter("manual", proxy.server.socket)
    await behind_our_back.apply(RouteTarget("checkout", None, proxy.params), 100)
    await asyncio.sleep(1.1)  # the drift check runs every interval (1 s here)

    await routed.runtime.traffic.reconcile()

    assert await behind_our_back.read_back(RouteTarget("checkout", None, proxy.params)) == 10
    [drift] = await routed.audit_events(action="router.drift")
    assert drift.details["live_weight"] == 100
    assert drift.details["applied_weight"] == 10


class _Receiver(BaseHTTPRequestHandler):
    secret = b""
    failures_left = 0
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        timestamp = self.headers["X-Opsapi-Timestamp"]
        expected = (
            "sha256="
            + hmac.new(self.secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
        )
        if not hmac.compare_digest(expected, self.headers["X-Opsapi-Signature"]):
            self.send_response(401)
        elif type(self).failures_left > 0:
            type(self).failures_left -= 1
            self.send_response(503)
        else:
            type(self).received.append(json.loads(body))
            self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


async def test_webhook_router_retries_until_the_receiver_recovers(
    pg_url: str, key_file: Path, tmp_path: Path
) -> None:
    secret = "s3cret-for-the-webhook-router"
    _Receiver.secret = secret.encode()
    _Receiver.failures_left = 2
    _Receiver.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    ).start()
    routers_file = tmp_path / "routers.json"
    url = f"http://127.0.0.1:{server.server_address[1]}/weights"
    routers_file.write_text(json.dumps({"hook": {"type": "webhook", "url": url, "secret": secret}}))
    try:
        # the controller (with its reconcile pass) runs inside the app
        async with running_app(pg_url, key_file, real_time=True, routers_file=routers_file) as api:
            policy = {"steps": [{"weight": 10, "wait": "1h"}, {"weight": 100, "wait": "1h"}],
                      "router": {"name": "hook"}}  # fmt: skip
            assert (await api.put("/services/checkout", policy)).status_code == 200
            started = await api.post("/canary/promote", {"service": "checkout", "version": "v2"})
            assert started.json()["applied_weight"] is None
            assert "503" in started.json()["router_error"]

            for _ in range(100):
                rollout = (await api.get("/canary/checkout")).json()
                if rollout["applied_weight"] == 10:
                    break
                await asyncio.sleep(0.1)
            assert rollout["applied_weight"] == 10
            assert rollout["router_error"] is None
            # and the receiver got versions and slots, so that it can route by version, and the
            # fail-safe lease of the weight (3 x the 60 s interval from now)
            [received] = _Receiver.received
            lease = received.pop("valid_until") - time.time()
            assert 170 < lease <= 180
            assert [received] == [
                {"service": "checkout", "rollout_id": started.json()["id"], "canary_percent": 10,
                 "canary_slot": "green", "stable_slot": "blue", "canary_version": "v2",
                 "stable_version": None, "state": "progressing",
                 "weights": {"blue": 90, "green": 10}}
            ]  # fmt: skip
            outcomes = [e.outcome for e in await api.audit_events(action="router.apply")]
            assert outcomes == ["error", "success"]  # repeated failures are not re-audited
            assert "s3cret" not in json.dumps(
                [e.model_dump(mode="json") for e in await api.audit_events()]
            )
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("proxy", ["nginx"], indirect=True)
async def test_unknown_router_instance_and_bad_parameters_are_422(routed: Harness) -> None:
    unknown = await routed.put("/services/other", {"router": {"name": "nope"}})
    assert unknown.status_code == 422
    router = {"name": "edge", "upstream": "x y", "slots": {"blue": "a"}}
    bad = await routed.put("/services/other", {"router": router})
    assert bad.status_code == 422
    assert bad.json()["errors"]


@pytest.mark.parametrize("proxy", ["haproxy"], indirect=True)
async def test_router_sync_reapplies_on_demand(routed: Harness, proxy: Proxy) -> None:
    await routed.post("/canary/promote", {"service": "checkout", "version": "v2"})
    assert isinstance(proxy.server, Haproxy)
    manual = HaproxyRouter("manual", proxy.server.socket)
    await manual.apply(RouteTarget("checkout", None, proxy.params), 60)

    outcome = await routed.runtime.traffic.sync("checkout")

    assert outcome is not None
    assert outcome.ok
    assert outcome.applied_weight == 10
    assert await manual.read_back(RouteTarget("checkout", None, proxy.params)) == 10
    assert await routed.runtime.traffic.sync("never-rolled-out") is None
    view = (await routed.get("/canary/checkout")).json()
    assert view["router_attempts"] == 0
