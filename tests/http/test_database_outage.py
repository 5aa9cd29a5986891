"""A database that stops or restarts under a real `opsapi serve` (issue "Hardening" 14).

Every request that needs the database while it is away — reads, writes, Idempotency-Key
lookups and replays, audit queries — is answered 503 problem+json with Retry-After, never 500,
and the client's keep-alive connection stays usable (before: an Idempotency-Key lookup that
failed escaped as a plain 500 and the connection was closed; a restart under load gave 500s).
Once the database is back, a request retried with the same key acts once.

The server runs as a subprocess on a private PostgreSQL cluster that the test stops and
starts (pg_ctl), with tight database bounds.
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import os
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from opsapi.auth.tokens import LocalSigner
from tests.storage.test_database_faults import _binaries, private_cluster
from tests.support.processes import free_port, start_server, stop

pytestmark = pytest.mark.postgres

API = "/internal/ops"


@dataclass
class Cluster:
    """The private cluster: stop it, start it again."""

    port: int
    data: Path

    def _pg_ctl(self, *args: str) -> None:
        binaries = _binaries()
        assert binaries is not None
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, str(binaries / "pg_ctl"), "-D", str(self.data), *args],
                       check=True, capture_output=True, timeout=60)  # fmt: skip

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "-w", "stop")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data.parent} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._pg_ctl("-o", options, "-w", "-l", str(self.data.parent / "server.log"), "start")

    def restart(self) -> None:
        # `pg_ctl restart` cannot take a log file: its server would hold our pipe open.
        self.stop()
        self.start()


@dataclass
class Server:
    port: int
    cluster: Cluster
    tokens: dict[str, str]
    log: Path


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """`opsapi serve` on a private cluster; the test may stop and start the cluster."""
    with private_cluster() as (pg_port, postmaster):
        data = Path(os.readlink(f"/proc/{postmaster}/cwd"))

        async def create() -> None:
            admin = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{pg_port}/postgres")
            await admin.execute("CREATE DATABASE opsapi")
            await admin.close()

        asyncio.run(create())
        key_file = tmp_path / "signing-key.json"
        signer = LocalSigner.load_or_create(key_file)
        port = free_port()
        env = {
            "OPSAPI_DATABASE_URL": f"postgresql+asyncpg://postgres@127.0.0.1:{pg_port}/opsapi",
            "OPSAPI_LOCAL_KEY_FILE": str(key_file),
            "OPSAPI_DATA_DIR": str(tmp_path),
            "OPSAPI_ENV": "test",
            "OPSAPI_CONTROLLER_ENABLED": "false",
            "OPSAPI_PAGERDUTY_WORKER_ENABLED": "false",
            "OPSAPI_DATABASE_CONNECT_TIMEOUT_SECONDS": "1",
            "OPSAPI_DATABASE_POOL_TIMEOUT_SECONDS": "1",
            "OPSAPI_DATABASE_STATEMENT_TIMEOUT_SECONDS": "2",
            "OPSAPI_DATABASE_LOCK_TIMEOUT_SECONDS": "1",
        }
        log = tmp_path / "server.log"
        process = start_server(port, env, log)
        tokens = {
            role: signer.mint(subject=f"{role}-user", roles=[role])
            for role in ("operator", "admin", "auditor")
        }
        try:
            yield Server(port, Cluster(pg_port, data), tokens, log)
        finally:
            stop(process)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any
    kept: bool  # the server kept the connection open

    @property
    def outcome(self) -> str:
        """How the request was answered, for tallies: the status and what was wrong with it."""
        label = str(self.status)
        problem = self.headers.get("content-type", "").startswith("application/problem+json")
        if self.status >= 400 and not problem:
            label += " not problem+json"
        if self.status == 503 and "retry-after" not in self.headers:
            label += " without Retry-After"
        return label if self.kept else label + ", connection closed"


class Connection:
    """One keep-alive HTTP/1.1 connection to the server."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.http = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)

    def send(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        role: str = "operator",
        key: str | None = None,
    ) -> Reply:
        headers = {"Authorization": f"Bearer {self.server.tokens[role]}"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if key is not None:
            headers["Idempotency-Key"] = key
        self.http.request(method, API + path, body=payload, headers=headers)
        response = self.http.getresponse()
        raw = response.read()
        answer = {name.lower(): value for name, value in response.getheaders()}
        kept = not response.will_close and answer.get("connection", "").lower() != "close"
        return Reply(response.status, answer, json.loads(raw) if raw else None, kept)

    def attempt(self, method: str, path: str, body: Any = None, **options: Any) -> str:
        """Send, and tell how it went; a connection the server dropped is opened anew."""
        try:
            return self.send(method, path, body, **options).outcome
        except (OSError, http.client.HTTPException) as error:
            self.http.close()
            return f"no answer ({type(error).__name__})"

    def close(self) -> None:
        self.http.close()


def assert_no_pipeline_traceback(log: Path) -> None:
    lines = log.read_text().splitlines()
    for line, following in itertools.pairwise(lines):
        assert not (" opsapi.http " in line and following.startswith("Traceback")), line
    assert "unhandled error" not in log.read_text()


def wait_ready(server: Server, deadline: float = 30) -> None:
    until = time.monotonic() + deadline
    while time.monotonic() < until:
        probe = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        try:
            probe.request("GET", "/readyz")
            if probe.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            probe.close()
        time.sleep(0.3)
    raise AssertionError("the server did not become ready again")


# What every request needing the database gets while it is away.
UNAVAILABLE = "503"  # problem+json, Retry-After, the connection kept


def test_a_stopped_database_gives_503_with_retry_after_on_a_kept_connection(
    server: Server,
) -> None:
    client = Connection(server)
    # given a rollout started with an Idempotency-Key, on one keep-alive connection
    first = client.send(
        "POST", "/canary/promote", {"service": "checkout", "version": "v2"}, key="start-1"
    )
    assert (first.status, first.kept) == (200, True), first.body
    socket_name = client.http.sock.getsockname() if client.http.sock else None

    # when the database is stopped
    server.cluster.stop()
    try:
        # then every request that needs it is 503 + Retry-After, and the connection stays open
        requests: list[tuple[str, str, Any, str, str | None]] = [
            ("GET", "/canary/checkout", None, "operator", None),
            ("GET", "/canary/checkout/history", None, "operator", None),
            ("GET", "/audit?limit=5", None, "auditor", None),
            ("POST", "/canary/pause", {"service": "checkout"}, "operator", "pause-1"),  # new key
            ("POST", "/canary/promote", {"service": "checkout", "version": "v2"}, "operator",
             "start-1"),  # a replay: its lookup needs the database
            ("POST", "/canary/resume", {"service": "checkout"}, "operator", None),  # no key
            ("PUT", "/services/checkout", {"interval": "30s"}, "admin", None),
        ]  # fmt: skip
        outcomes: Counter[str] = Counter()
        for _ in range(3):
            for method, path, body, role, key in requests:
                outcomes[client.attempt(method, path, body, role=role, key=key)] += 1
        print(f"answers while the database is stopped: {dict(outcomes)}")
        assert outcomes == Counter({UNAVAILABLE: 3 * len(requests)})
        assert client.http.sock is not None
        assert client.http.sock.getsockname() == socket_name  # one connection all along
        # and the process's own metrics still answer (that is when they matter)
        metrics = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=10)
        assert metrics.status_code == 200
        assert "opsapi_http_requests_total" in metrics.text
    finally:
        server.cluster.start()

    # when the database is back
    wait_ready(server)
    # then, on the same connection, nothing was done while it was away (still progressing),
    # and the pause retried with its key acts once
    view = client.send("GET", "/canary/checkout")
    assert (view.status, view.body["state"]) == (200, "progressing")
    paused = client.send("POST", "/canary/pause", {"service": "checkout"}, key="pause-1")
    assert (paused.status, paused.body["state"]) == (200, "paused")
    again = client.send("POST", "/canary/pause", {"service": "checkout"}, key="pause-1")
    assert (again.status, again.headers.get("idempotent-replayed")) == (200, "true")
    # and the first start's replay answers its first answer
    replay = client.send(
        "POST", "/canary/promote", {"service": "checkout", "version": "v2"}, key="start-1"
    )
    assert (replay.status, replay.headers.get("idempotent-replayed")) == (200, "true")
    assert replay.body["id"] == first.body["id"]
    assert client.http.sock is not None
    assert client.http.sock.getsockname() == socket_name
    client.close()
    # and the pipeline logged one line per failed request, no traceback
    assert_no_pipeline_traceback(server.log)


def test_a_database_restart_under_load_gives_no_500_and_no_dropped_connection(
    server: Server,
) -> None:
    # given a rollout and 4 clients, each on its own keep-alive connection, sending reads,
    # keyed and unkeyed writes, and audit queries as fast as they are answered
    client = Connection(server)
    started = client.send("POST", "/canary/promote", {"service": "checkout", "version": "v2"})
    assert started.status == 200
    outcomes: Counter[str] = Counter()
    done = threading.Event()

    def load(worker: int) -> None:
        connection = Connection(server)
        sent = 0
        while not done.is_set() and sent < 5000:
            sent += 1
            kind = sent % 4
            if kind == 0:
                outcome = connection.attempt("GET", "/canary/checkout")
            elif kind == 1:
                outcome = connection.attempt(
                    "POST", "/canary/pause", {"service": "checkout"}, key=f"w{worker}-{sent}"
                )
            elif kind == 2:
                outcome = connection.attempt("POST", "/canary/resume", {"service": "checkout"})
            else:
                outcome = connection.attempt("GET", "/audit?limit=3", role="auditor")
            outcomes[outcome] += 1
        connection.close()

    workers = [threading.Thread(target=load, args=(n,)) for n in range(4)]
    for worker in workers:
        worker.start()
    try:
        # when PostgreSQL restarts under that load (twice, with a pause between)
        time.sleep(1)
        server.cluster.restart()
        time.sleep(2)
        server.cluster.restart()
        time.sleep(2)
    finally:
        done.set()
        for worker in workers:
            worker.join(timeout=60)
    print(f"answers during two restarts: {dict(outcomes)}")
    # then no request failed with 500 and no connection was dropped: each got its answer,
    # or 503 with Retry-After while the database was away
    assert set(outcomes) <= {"200", "409", UNAVAILABLE}, outcomes
    assert outcomes["200"] > 10, outcomes
    # and the server serves again, having logged no traceback from the pipeline
    assert_no_pipeline_traceback(server.log)
    wait_ready(server)
    assert client.send("GET", "/canary/checkout").status == 200
    client.close()
