"""Applies of one service's weight never overlap, within a replica or across replicas: the
router sees one call at a time (the apply lock is a PostgreSQL session lock)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.support.app import running_app


class _SlowReceiver(BaseHTTPRequestHandler):
    """A webhook receiver that takes 0.1 s per apply and counts how many it holds at once."""

    guard = threading.Lock()
    in_flight = 0
    most = 0
    calls = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        cls = type(self)
        with cls.guard:
            cls.in_flight += 1
            cls.calls += 1
            cls.most = max(cls.most, cls.in_flight)
        time.sleep(0.1)
        with cls.guard:
            cls.in_flight -= 1
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[str]:
    _SlowReceiver.in_flight = _SlowReceiver.most = _SlowReceiver.calls = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowReceiver)
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    ).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/weights"
    finally:
        server.shutdown()
        server.server_close()


async def test_two_replicas_never_apply_one_service_at_once(
    pg_url: str, key_file: Path, tmp_path: Path, receiver: str
) -> None:
    # given two replicas on one database, with a webhook router that is slow to answer
    routers = tmp_path / "routers.json"
    secret = "s3cret-for-the-webhook-router"
    routers.write_text(json.dumps({"hook": {"type": "webhook", "url": receiver, "secret": secret}}))
    settings = {"routers_file": routers, "controller_enabled": False}
    async with (
        running_app(pg_url, key_file, **settings) as first,
        running_app(pg_url, key_file, **settings) as second,
    ):
        policy = {"steps": [{"weight": 10, "wait": "1h"}, {"weight": 100, "wait": "1h"}],
                  "router": {"name": "hook"}}  # fmt: skip
        assert (await first.put("/services/checkout", policy)).status_code == 200
        started = await first.post("/canary/promote", {"service": "checkout", "version": "v2"})
        assert started.json()["applied_weight"] == 10
        rollout_id = started.json()["id"]

        # when each replica re-applies the weight three times, all at once
        outcomes = await asyncio.gather(
            *(
                replica.runtime.traffic.apply(rollout_id, "checkout", reason="sync", force=True)
                for replica in (first, second, first, second, first, second)
            )
        )

    # then every apply reached the router, one at a time
    assert all(outcome.ok and outcome.applied_weight == 10 for outcome in outcomes)
    assert _SlowReceiver.calls == 7  # the start's, then the six
    assert _SlowReceiver.most == 1
