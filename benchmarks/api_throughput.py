"""The hot path of one `opsapi serve` process on PostgreSQL, against the bare floor.

Two servers run side by side, each on a fresh database migrated by opsapi and seeded with
the same rollouts, served the same way (granian in process, uvloop): `opsapi serve`
(controller off) and `benchmarks/floor_app.py` (Starlette + raw asyncpg doing the same durable
work per request; see its docstring). wrk (32 connections, Lua scripts for headers, bodies
and per-service state) drives them in turns, floor then opsapi, for several rounds, and this
prints per workload req/s, p50 and p99 of each, and the ratio opsapi/floor per round:

- status read: `GET /canary/{service}` by one caller, round robin over the services: the
  floor commits an audit row per read; opsapi audits each caller's first read of a service in
  a minute on its own and counts the repeats into one event per minute (DESIGN §11);
- status read, audited each: the same reads, each by a caller that has not read that service
  this minute (many viewer tokens), so that opsapi too commits one audit event per read: the
  like-for-like comparison with the floor, and the audited read the weight read is set against;
- weight read: `GET /canary/{service}/weight`, 200 with a token (the data plane);
- weight 304: the same with `If-None-Match` of the current tag;
- audited writes: rollback / start pairs on many services (each a real transition with its
  audit event; never two requests in flight for one service);
- long poll: pollers hold `?wait=30s` while an admin changes the weight; how soon each
  poll answers after the change is sent.

Then a profile of opsapi under status reads and writes (py-spy, top frames by cumulative time
grouped by module), and a count of database work per request on a third, instrumented opsapi
process whose database connections go through a PostgreSQL wire-protocol proxy: round trips
(ReadyForQuery), transactions, statements by text, prepares, pool checkouts, ORM sessions and
audit group commits, per request at 1 connection and at 32.

    .venv/bin/python benchmarks/api_throughput.py [--seconds 10] [--rounds 3] [--clients 32]
        [--threads 2] [--services 96] [--skip-profile] [--skip-count] [--json out.json]

Needs wrk (Debian package) and, for the profile, py-spy (PyPI; root or CAP_SYS_PTRACE).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.processes import free_port

ROOT = Path(__file__).resolve().parent.parent

ADMIN_DSN = os.environ.get("OPSAPI_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
API = "/internal/ops"
OPEN_STATES = {"progressing", "paused", "awaiting_promotion", "baking"}
LONG_POLL_SERVICE = "lp-0"


# Processes ---------------------------------------------------------------------------------


def start_process(
    command: list[str], env: dict[str, str], log: Path, port: int, cwd: Path = ROOT
) -> subprocess.Popen[bytes]:
    """Start a server; return once its /readyz answers 200."""
    with log.open("ab") as out:
        process = subprocess.Popen(command, env={**os.environ, **env}, stdout=out, stderr=out,
                                   cwd=cwd)  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[1]} exited: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as sock:
            sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if sock.recv(64).startswith(b"HTTP/1.1 200"):
                return process
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"{command[1]} did not become ready: {log.read_text()[-2000:]}")


def stop_process(process: subprocess.Popen[bytes] | None) -> None:
    """Terminate (then kill) one process this script started."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def sqlalchemy_url(dsn: str) -> str:
    return dsn.replace("postgresql://", "postgresql+asyncpg://", 1)


def dsn_of(database: str, port: int | None = None) -> str:
    base = ADMIN_DSN.rsplit("/", 1)[0]
    if port is not None:
        base = f"postgresql://postgres@127.0.0.1:{port}"
    return f"{base}/{database}"


# A keep-alive HTTP/1.1 client for seeding, long polls and sequential counts ------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class RawClient:
    """A minimal keep-alive HTTP/1.1 client (httpx costs the shared CPU more than a server)."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.token = token
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def request(self, method: str, path: str, body: Any = None,
                      headers: dict[str, str] | None = None) -> Answer:  # fmt: skip
        if self.streams is None:
            self.streams = await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = self.streams
        payload = json.dumps(body).encode() if body is not None else b""
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        head = (
            f"{method} {API}{path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {self.token}"
            f"\r\n{extra}Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        writer.write(head.encode() + payload)
        status_line = await reader.readline()
        answer_headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            answer_headers[name.strip().lower()] = value.strip()
        content = await reader.readexactly(int(answer_headers.get("content-length", "0")))
        return Answer(int(status_line.split()[1]), answer_headers, content)

    async def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


# wrk ---------------------------------------------------------------------------------------

_LUA_COMMON = r"""
token = "%(token)s"
services = {%(services)s}
etags = {%(etags)s}
nthreads = %(threads)d
tag = "%(tag)s"
auth = "Bearer " .. token
threads = {}
function setup(thread)
  thread:set("tid", #threads)
  threads[#threads + 1] = thread
end
function count(status)
  local key = "s" .. status .. "_n"
  _G[key] = (_G[key] or 0) + 1
end
function done(summary, latency, requests)
  local seen = {}
  for _, thread in ipairs(threads) do
    for _, key in ipairs({"s200", "s304", "s401", "s404", "s409", "s422", "s500", "s503"}) do
      seen[key] = (seen[key] or 0) + (thread:get(key .. "_n") or 0)
    end
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%%d,"duration_us":%%d,"connect":%%d,"read":%%d,"write":%%d,' ..
    '"status_errors":%%d,"timeout":%%d,"p50":%%.1f,"p90":%%.1f,"p99":%%.1f,"max":%%.1f,' ..
    '"mean":%%.1f,"s200":%%d,"s304":%%d,"s401":%%d,"s404":%%d,"s409":%%d,"s422":%%d,' ..
    '"s500":%%d,"s503":%%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean, seen.s200, seen.s304, seen.s401, seen.s404, seen.s409, seen.s422, seen.s500,
    seen.s503))
end
"""

# GET of one path per service, round robin (threads start at different services).
_LUA_GET = r"""
function init(args)
  n = 0
  headers = {["Authorization"] = auth}
end
function request()
  n = n + 1
  local i = ((n * nthreads + tid) %% #services) + 1
  local h = headers
  if etags[i] then h = {["Authorization"] = auth, ["If-None-Match"] = etags[i]} end
  return wrk.format("GET", "%(prefix)s/canary/" .. services[i] .. "%(suffix)s", h)
end
function response(status, headers, body)
  count(status)
end
"""

# GET of each service by caller after caller: request k (counted from `offset`, which each run
# moves on) reads service k mod #services as reader k div #services, so that no reader reads
# one service twice in the runs of a few minutes.
_LUA_GET_EACH = r"""
readers = {%(readers)s}
offset = %(offset)d
function init(args)
  n = 0
end
function request()
  n = n + 1
  local k = offset + n * nthreads + tid
  local service = services[(k %% #services) + 1]
  local reader = readers[math.floor(k / #services) %% #readers + 1]
  return wrk.format("GET", "%(prefix)s/canary/" .. service,
                    {["Authorization"] = "Bearer " .. reader})
end
function response(status, headers, body)
  count(status)
end
"""

# Rollback / start pairs: each thread owns a share of the services and keeps a queue of those
# with no request in flight, so one service never has two (the X-Request-Id, echoed by both
# servers, says which service an answer is about).
_LUA_WRITES = r"""
function init(args)
  mine, queue, open = {}, {}, {}
  for i = 1, #services do
    if (i - 1) %% nthreads == tid then mine[#mine + 1] = i end
  end
  for k, i in ipairs(mine) do queue[k] = i; open[i] = true end
  head, tail, n = 1, #mine + 1, 0
end
function request()
  local i
  if head < tail then
    i = queue[head]; queue[head] = nil; head = head + 1
  else
    i = mine[(n %% #mine) + 1]  -- not expected: more services than connections per thread
  end
  n = n + 1
  local h = {["Authorization"] = auth, ["Content-Type"] = "application/json",
             ["X-Request-Id"] = "w" .. i .. "." .. n}
  local service = services[i]
  if open[i] then
    return wrk.format("POST", "%(prefix)s/canary/rollback", h,
                      '{"service":"' .. service .. '","reason":"bench"}')
  end
  local version = tag .. "-" .. tid .. "-" .. n
  return wrk.format("POST", "%(prefix)s/canary/promote", h,
                    '{"service":"' .. service .. '","version":"' .. version .. '"}')
end
function response(status, headers, body)
  count(status)
  local rid = headers["X-Request-Id"] or headers["x-request-id"]
  local i = rid and tonumber(string.match(rid, "^w(%%d+)%%."))
  if i == nil then return end
  if status == 200 then open[i] = not open[i] end
  queue[tail] = i; tail = tail + 1
end
"""


def lua_script(kind: str, *, token: str, services: Sequence[str], threads: int,
               etags: Sequence[str] | None = None, readers: Sequence[str] = (),
               offset: int = 0) -> str:  # fmt: skip
    """The wrk script of one workload ("status", "status_each", "weight", "weight304",
    "writes"); "status_each" reads as `readers` (tokens), from request `offset` on."""
    suffix = "" if kind == "status" else "/weight"
    body = {"writes": _LUA_WRITES, "status_each": _LUA_GET_EACH}.get(kind, _LUA_GET)
    values = {
        "readers": ",".join(f'"{reader}"' for reader in readers),
        "offset": offset,
        "token": token,
        "services": ",".join(f'"{name}"' for name in services),
        "etags": ",".join(_lua_string(tag) for tag in etags) if etags else "",
        "threads": threads,
        "tag": f"b{uuid.uuid4().hex[:8]}",
        "prefix": API,
        "suffix": suffix,
    }
    return _LUA_COMMON % values + body % values


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class Run:
    """One wrk run's figures (latencies in ms)."""

    rate: float
    p50: float
    p90: float
    p99: float
    max: float
    requests: int
    statuses: dict[str, int]
    errors: int
    # CPU time per request of the server process and of its database's backends (ms): what a
    # request costs, whatever share of the shared cores each process got meanwhile.
    app_cpu_ms: float = float("nan")
    db_cpu_ms: float = float("nan")

    def line(self) -> str:
        odd = {k: v for k, v in self.statuses.items() if v and k not in ("s200", "s304")}
        mix = " ".join(f"{k[1:]}:{v}" for k, v in self.statuses.items() if v)
        warn = f"  UNEXPECTED {odd}" if odd or self.errors else ""
        return (f"{self.rate:8.0f} req/s  p50 {self.p50:7.1f} ms  p99 {self.p99:7.1f} ms  "
                f"cpu/req app {self.app_cpu_ms:5.2f} ms db {self.db_cpu_ms:5.2f} ms  "
                f"n={self.requests} [{mix}]{warn}")  # fmt: skip


async def run_wrk(port: int, script: str, *, seconds: float, connections: int, threads: int,
                  workdir: Path) -> Run:  # fmt: skip
    """Run wrk against 127.0.0.1:port with `script`; its figures."""
    path = workdir / f"wrk-{uuid.uuid4().hex[:8]}.lua"
    path.write_text(script)
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
               "--timeout", "10s", "-s", str(path), f"http://127.0.0.1:{port}"]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    path.unlink()
    for line in out.decode().splitlines():
        if line.startswith("WRK_RESULT "):
            data = json.loads(line.removeprefix("WRK_RESULT "))
            seconds_run = data["duration_us"] / 1e6
            return Run(
                rate=data["requests"] / seconds_run,
                p50=data["p50"] / 1000, p90=data["p90"] / 1000, p99=data["p99"] / 1000,
                max=data["max"] / 1000, requests=data["requests"],
                statuses={k: data[k] for k in data if k.startswith("s") and k[1:].isdigit()},
                errors=data["connect"] + data["read"] + data["write"] + data["timeout"],
            )  # fmt: skip
    raise RuntimeError(f"wrk gave no result: {out.decode()[-1000:]} {err.decode()[-1000:]}")


_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def backends_cpu(database: str) -> dict[int, float]:
    """CPU seconds used so far by each live PostgreSQL backend connected to `database` (their
    process title names it)."""
    found: dict[int, float] = {}
    needle = f" {database} ".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            title = (entry / "cmdline").read_bytes()
            if title.startswith(b"postgres: ") and needle in title:
                found[int(entry.name)] = process_cpu(int(entry.name))
    return found


class DatabaseCpu:
    """CPU used by a database's backends over a window, those that exit meanwhile included
    (SQLAlchemy closes overflow connections on return): sampled every 0.2 s."""

    def __init__(self, database: str) -> None:
        self.database = database
        self.first = backends_cpu(database)
        self.last = dict(self.first)
        self._task = asyncio.get_running_loop().create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            self.last.update(backends_cpu(self.database))

    def stop(self) -> float:
        """CPU seconds used since the start."""
        self._task.cancel()
        self.last.update(backends_cpu(self.database))
        return sum(cpu - self.first.get(pid, 0.0) for pid, cpu in self.last.items())


async def measured_run(target: Target, script: str, *, seconds: float,
                       args: argparse.Namespace, workdir: Path) -> Run:  # fmt: skip
    """One wrk run against `target`, with the CPU its process and its backends used."""
    await asyncio.sleep(1)  # what the warm-up left in flight is done
    app0, db = process_cpu(target.process.pid), DatabaseCpu(target.database)
    run = await run_wrk(target.port, script, seconds=seconds, connections=args.clients,
                        threads=args.threads, workdir=workdir)  # fmt: skip
    # When wrk stops, each connection has one request in flight, which the server finishes
    # (its CPU is in the window): wait for them and count them.
    await asyncio.sleep(min(5.0, max(1.0, 1.5 * run.p99 / 1000)))
    app1, db_seconds = process_cpu(target.process.pid), db.stop()
    served = run.requests + args.clients
    run.app_cpu_ms = (app1 - app0) * 1000 / served
    run.db_cpu_ms = db_seconds * 1000 / served
    return run


# The two servers ---------------------------------------------------------------------------


@dataclass
class Target:
    """One server under test."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    token: str
    admin_token: str
    database: str

    def client(self, *, admin: bool = False) -> RawClient:
        return RawClient(self.port, self.admin_token if admin else self.token)


async def etags_of(target: Target, services: Sequence[str]) -> list[str]:
    """Each service's current weight ETag on `target`."""
    client = target.client()
    try:
        tags = []
        for name in services:
            answer = await client.request("GET", f"/canary/{name}/weight")
            tags.append(answer.headers["etag"])
        return tags
    finally:
        await client.close()


async def reopen(target: Target, services: Sequence[str]) -> None:
    """Leave every service with an open rollout (the writes' Lua script starts from that)."""
    client = target.client()
    try:
        for name in services:
            answer = await client.request("GET", f"/canary/{name}")
            if answer.status == 200 and answer.json()["state"] in OPEN_STATES:
                continue
            version = f"r{uuid.uuid4().hex[:10]}"
            started = await client.request("POST", "/canary/promote",
                                           {"service": name, "version": version})  # fmt: skip
            if started.status != 200:
                raise RuntimeError(f"{target.name}: cannot reopen {name}: {started.body[:300]!r}")
    finally:
        await client.close()


# Viewer tokens of the "status_each" workload: 2,000 readers x 96 services are 192,000 pairs,
# more than the reads of its runs (a few thousand a second, 10 s a run, three rounds).
READERS = 2000


async def audit_events(target: Target, action: str) -> int:
    """How many audit rows of `action` the target's database holds (aggregates count one)."""
    connection = await asyncpg.connect(dsn_of(target.database))
    try:
        return int(await connection.fetchval(
            "SELECT count(*) FROM audit_event WHERE action = $1", action))  # fmt: skip
    finally:
        await connection.close()


async def prepare(target: Target, kind: str, services: Sequence[str], settle: float = 1) -> None:
    """Before a run: let the last run's requests finish; for writes, open every rollout."""
    await asyncio.sleep(settle)
    if kind == "writes":
        await reopen(target, services)


async def create_database(admin: asyncpg.Connection, name: str) -> None:
    await admin.execute(f'CREATE DATABASE "{name}"')


def migrate(database: str, checkout: Path) -> None:
    """Bring `database` to opsapi's schema (what `opsapi migrate` does)."""
    env = {**os.environ, "OPSAPI_DATABASE_URL": sqlalchemy_url(dsn_of(database))}
    subprocess.run([sys.executable, "-m", "opsapi", "migrate"], env=env, cwd=checkout, check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip


async def copy_rows(source: str, target: str, tables: Iterable[str]) -> None:
    """Copy every row of `tables` from one database to another (same schema)."""
    src = await asyncpg.connect(dsn_of(source))
    dst = await asyncpg.connect(dsn_of(target))
    try:
        for table in tables:
            rows = await src.fetch(f"SELECT * FROM {table}")
            if rows:
                await dst.copy_records_to_table(
                    table, records=[tuple(row) for row in rows], columns=list(rows[0].keys())
                )
        await dst.execute("SELECT setval('rollout_id_seq', (SELECT max(id) FROM rollout))")
    finally:
        await src.close()
        await dst.close()


def opsapi_env(database: str, workdir: Path, *, port: int | None = None,
               extra: dict[str, str] | None = None) -> dict[str, str]:  # fmt: skip
    return {
        "OPSAPI_DATABASE_URL": sqlalchemy_url(dsn_of(database, port)),
        "OPSAPI_LOCAL_KEY_FILE": str(workdir / "key.json"),
        "OPSAPI_ENV": "test",
        "OPSAPI_CONTROLLER_ENABLED": "false",
        **(extra or {}),
    }


async def seed(port: int, token: str, services: Sequence[str]) -> None:
    """One open rollout per service, started through the API."""
    client = RawClient(port, token)
    try:
        for name in services:
            answer = await client.request("POST", "/canary/promote",
                                          {"service": name, "version": "v1"})  # fmt: skip
            if answer.status != 200:
                raise RuntimeError(f"seeding {name}: {answer.status} {answer.body[:300]!r}")
    finally:
        await client.close()


# Long poll ---------------------------------------------------------------------------------


@dataclass
class LongPoll:
    changes: int
    answered: int
    timeouts: int
    errors: int
    delays_ms: list[float]
    write_ms: list[float]

    def line(self) -> str:
        d = sorted(self.delays_ms)
        w = sorted(self.write_ms)
        if not d:
            return f"no poll answered ({self.errors} errors, {self.timeouts} timeouts)"
        return (
            f"{self.changes} changes, {self.answered} polls answered 200, {self.timeouts} 304s, "
            f"{self.errors} errors; change sent → poll answered: p50 {_pct(d, 0.5):.1f} ms, "
            f"p99 {_pct(d, 0.99):.1f} ms, max {d[-1]:.1f} ms (the change's own write: "
            f"p50 {_pct(w, 0.5):.1f} ms)"
        )


def _pct(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def long_poll(target: Target, *, pollers: int, changes: int, gap: float) -> LongPoll:
    """`pollers` long polls (`?wait=30s`) on one service while an admin changes its weight
    `changes` times, `gap` seconds apart; how soon each poll answers after a change is sent."""
    service = LONG_POLL_SERVICE
    sent: list[float] = []
    delays: list[float] = []
    writes: list[float] = []
    counts = Counter[str]()
    stop = asyncio.Event()
    first = await etags_of(target, [service])

    async def poll(client: RawClient) -> None:
        etag = first[0]
        while not stop.is_set():
            try:
                answer = await client.request("GET", f"/canary/{service}/weight?wait=30s",
                                              headers={"If-None-Match": etag})  # fmt: skip
            except (OSError, asyncio.IncompleteReadError):
                counts["errors"] += 0 if stop.is_set() else 1
                return
            at = time.perf_counter()
            if answer.status == 200:
                counts["answered"] += 1
                etag = answer.headers["etag"]
                if sent and not stop.is_set():
                    delays.append((at - sent[-1]) * 1000)
            elif answer.status == 304:
                counts["timeouts"] += 1
            else:
                counts["errors"] += 1

    clients = [target.client() for _ in range(pollers)]
    tasks = [asyncio.create_task(poll(client)) for client in clients]
    admin = target.client(admin=True)
    await asyncio.sleep(1.0)  # every poll is waiting
    try:
        for index in range(changes):
            params = {"service": service, "weight": 20 + 10 * (index % 2), "reason": "bench"}
            body = {"operation": "set-weight", "params": params}
            sent.append(time.perf_counter())
            answer = await admin.request("POST", "/execute", body)
            writes.append((time.perf_counter() - sent[-1]) * 1000)
            if answer.status != 200:
                raise RuntimeError(f"set-weight: {answer.status} {answer.body[:300]!r}")
            await asyncio.sleep(gap)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in [*clients, admin]:
            await client.close()
    return LongPoll(changes, counts["answered"], counts["timeouts"], counts["errors"], delays,
                    writes)  # fmt: skip


# Profile (py-spy) --------------------------------------------------------------------------

_GROUPS = (
    ("opsapi/http/endpoint.py", "endpoint pipeline"),
    ("opsapi/audit/", "audit (chain, writer, event rows)"),
    ("opsapi/auth/", "token verification"),
    ("opsapi/canary/", "canary handlers and domain"),
    ("opsapi/http/", "opsapi http (app, clients, problems)"),
    ("opsapi/metrics", "metrics"),
    ("opsapi/", "opsapi, other"),
    ("floor_app", "floor app"),
    ("sqlmodel/", "SQLModel"),
    ("sqlalchemy/orm/", "SQLAlchemy ORM"),
    ("sqlalchemy/sql/", "SQLAlchemy SQL (statements, compile)"),
    ("sqlalchemy/dialects/", "SQLAlchemy asyncpg dialect"),
    ("sqlalchemy/engine/", "SQLAlchemy engine (connection, result)"),
    ("sqlalchemy/pool/", "SQLAlchemy pool"),
    ("sqlalchemy/util/_concurrency", "SQLAlchemy greenlet bridge"),
    ("sqlalchemy/", "SQLAlchemy, other (util, events)"),
    ("asyncpg/", "asyncpg"),
    ("json/", "JSON"),
    ("pydantic", "pydantic"),
    ("starlette/", "Starlette"),
    ("granian/", "granian"),
    ("prometheus_client/", "metrics"),
    ("authlib/", "token verification"),
    ("joserfc/", "token verification"),
    ("asyncio/", "asyncio"),
    ("uvloop/", "event loop"),
)


def group_of(frame: str) -> str:
    for needle, name in _GROUPS:
        if needle in frame:
            return name
    return "other (stdlib: " + frame.rsplit("(", 1)[-1].split(":")[0].rsplit("/", 1)[-1] + ")"


def _short(frame: str) -> str:
    function, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "/work/main/", "python3.11/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{function} ({where})"


# Frames every sample passes through (the process, the loop, the framework's routing layers):
# left out of the top list, which is about where the time goes below them.
_SCAFFOLDING = (
    "<frozen runpy>", "opsapi/__main__.py", "opsapi/cli.py", "asyncio/runners.py",
    "asyncio/base_events.py", "asyncio/events.py", "granian/", "starlette/routing.py",
    "starlette/middleware/", "starlette/_exception_handler.py", "starlette/applications.py",
    "endpoint.<locals>.wrap.<locals>.run",
)  # fmt: skip


@dataclass
class Profile:
    samples: int
    top: list[tuple[float, str, str]]
    groups_self: list[tuple[float, str]]
    groups_total: list[tuple[float, str]]
    roots: list[tuple[float, str]]
    leaves: list[tuple[float, str, str]]


def _root(frames: Sequence[str]) -> str:
    """Which part of the process a sample is in."""
    if not frames[0].startswith("_run_module_as_main"):
        # A greenlet's stack ends at its own start: SQLAlchemy's sync ORM/Core code run by
        # greenlet_spawn for an awaiting caller that the sampler cannot see.
        return f"SQLAlchemy greenlet, caller not visible (root {_short(frames[0])})"
    if any(frame.startswith("_Request.serve ") for frame in frames):
        return "request pipeline (_Request.serve)"
    if any(frame.startswith("AuditWriter.") for frame in frames):
        return "audit writer task (group commits)"
    return "event loop, other tasks and callbacks"


def read_profile(raw: str, top: int = 25) -> Profile:
    """py-spy's raw (folded) stacks → top frames by cumulative time, and time per module group
    (self: the innermost Python frame's group; total: any frame of the group on the stack)."""
    inclusive = Counter[str]()
    self_groups = Counter[str]()
    total_groups = Counter[str]()
    roots = Counter[str]()
    leaves = Counter[str]()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame for frame in stack.split(";") if "(" in frame]
        if not frames:
            continue
        samples += count
        roots[_root(frames)] += count
        for frame in set(frames):
            inclusive[frame] += count
        self_groups[group_of(frames[-1])] += count
        leaves[frames[-1]] += count
        for name in {group_of(frame) for frame in frames}:
            total_groups[name] += count
    if not samples:
        return Profile(0, [], [], [], [], [])
    ranked = [(frame, n) for frame, n in inclusive.most_common()
              if not any(needle in frame for needle in _SCAFFOLDING)]  # fmt: skip
    return Profile(
        samples,
        [(100 * n / samples, group_of(frame), _short(frame)) for frame, n in ranked[:top]],
        [(100 * n / samples, name) for name, n in self_groups.most_common()],
        [(100 * n / samples, name) for name, n in total_groups.most_common()],
        [(100 * n / samples, name) for name, n in roots.most_common()],
        [
            (100 * n / samples, group_of(frame), _short(frame))
            for frame, n in leaves.most_common(12)
        ],
    )


async def profile(target: Target, kind: str, services: Sequence[str], *, seconds: float,
                  args: argparse.Namespace, workdir: Path) -> Profile | None:  # fmt: skip
    """py-spy samples the server while wrk drives workload `kind`."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("  (py-spy not installed: pip install py-spy)")
        return None
    await prepare(target, kind, services)
    out = workdir / f"profile-{kind}.txt"
    etags = await etags_of(target, services) if kind == "weight304" else None
    script = lua_script(kind, token=target.token, services=services, threads=args.threads,
                        etags=etags)  # fmt: skip
    load = asyncio.create_task(run_wrk(target.port, script, seconds=seconds + 2,
                                       connections=args.clients, threads=args.threads,
                                       workdir=workdir))  # fmt: skip
    await asyncio.sleep(1)
    spy_process = await asyncio.create_subprocess_exec(
        spy, "record", "--pid", str(target.process.pid), "--duration", str(round(seconds)),
        "--rate", "100", "--format", "raw", "--function", "-o", str(out),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await spy_process.communicate()
    run = await load
    print(f"  under load: {run.line()}")
    if not out.exists():
        print(f"  py-spy failed: {err.decode()[-500:]}")
        return None
    return read_profile(out.read_text())


def print_profile(title: str, result: Profile) -> None:
    print(f"\n{title}: {result.samples} samples (busy Python time; idle waits excluded)")
    print("  where the samples are:")
    for share, name in result.roots:
        print(f"    {share:5.1f}%  {name}")
    print("  top frames by cumulative time (process, loop and routing layers left out):")
    for share, group, frame in result.top:
        print(f"    {share:5.1f}%  {group:<36} {frame}")
    print("  top frames by self time (the innermost Python frame of a sample):")
    for share, group, frame in result.leaves:
        print(f"    {share:5.1f}%  {group:<36} {frame}")
    print("  by module group: self (innermost Python frame) / total (anywhere on the stack):")
    totals = {name: share for share, name in result.groups_total}
    for share, name in result.groups_self:
        if share >= 0.5:
            print(f"    self {share:5.1f}%  total {totals.get(name, 0):5.1f}%  {name}")


# Round trips: a PostgreSQL wire-protocol proxy and an instrumented server -------------------

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102


class WireCounter:
    """Forwards PostgreSQL connections and counts what crosses: round trips (each
    ReadyForQuery ends one), transactions, statements by text, prepares."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.counts = Counter[str]()
        self.statements = Counter[str]()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    def snapshot(self) -> tuple[Counter[str], Counter[str]]:
        return Counter(self.counts), Counter(self.statements)

    async def _connection(self, client_r: asyncio.StreamReader,
                          client_w: asyncio.StreamWriter) -> None:  # fmt: skip
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        try:
            message = await _untyped(client_r)
            code = struct.unpack("!I", message[4:8])[0]
            if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                server_w.write(message)
                answer = await server_r.readexactly(1)
                client_w.write(answer)
                if answer != b"N":
                    raise RuntimeError("the proxy cannot count an encrypted connection")
                message = await _untyped(client_r)
                code = struct.unpack("!I", message[4:8])[0]
            server_w.write(message)
            if code == _CANCEL_REQUEST:
                return
            self.counts["connections opened"] += 1
            pumps = [asyncio.create_task(self._frontend(client_r, server_w)),
                     asyncio.create_task(self._backend(server_r, client_w))]  # fmt: skip
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for pump in pumps:
                pump.cancel()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for writer in (client_w, server_w):
                writer.close()

    async def _frontend(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        names: dict[bytes, str] = {}
        current = "?"
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readexactly(5)
                body = await reader.readexactly(struct.unpack("!I", head[1:])[0] - 4)
                kind = head[:1]
                if kind == b"Q":
                    self._simple(body[:-1].decode(errors="replace"))
                elif kind == b"P":
                    name, rest = body.split(b"\0", 1)
                    names[name] = _statement(rest.split(b"\0", 1)[0].decode(errors="replace"))
                    self.counts["prepares (Parse)"] += 1
                elif kind == b"B":
                    statement = body.split(b"\0", 2)[1]
                    current = names.get(statement, "? (prepared before counting)")
                elif kind == b"E":
                    self.counts["statements"] += 1
                    self.statements[current] += 1
                writer.write(head + body)
                await writer.drain()

    async def _backend(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readexactly(5)
                body = await reader.readexactly(struct.unpack("!I", head[1:])[0] - 4)
                if head[:1] == b"Z":
                    self.counts["round trips"] += 1
                elif head[:1] == b"E":
                    self.counts["server errors"] += 1
                writer.write(head + body)
                await writer.drain()

    def _simple(self, text: str) -> None:
        word = text.strip().split(None, 1)[0].upper().rstrip(";") if text.strip() else ""
        if word in ("BEGIN", "START"):
            self.counts["transactions (BEGIN)"] += 1
        elif word == "COMMIT":
            self.counts["COMMIT"] += 1
        elif word == "ROLLBACK":
            self.counts["ROLLBACK"] += 1
        else:
            self.counts["statements"] += 1
        self.statements[_statement(text)] += 1


async def _untyped(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readexactly(4)
    return head + await reader.readexactly(struct.unpack("!I", head)[0] - 4)


def _statement(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= 110 else flat[:107] + "..."


def instrumented_serve(port: int, counts_file: Path, checkout: Path) -> int:
    """`opsapi serve` (imported from `checkout`), counting ORM sessions, pool checkouts,
    requests reaching the pipeline and audit group commits; SIGUSR1 writes the counts to
    `counts_file` (JSON)."""
    sys.path.insert(0, str(checkout))
    from sqlalchemy import event
    from sqlalchemy.orm import Session
    from sqlalchemy.pool import Pool

    from opsapi import cli
    from opsapi.audit.writer import AuditWriter
    from opsapi.http import endpoint

    counts = Counter[str]()
    event.listen(Pool, "checkout", lambda *_: counts.update(["pool checkouts"]))
    event.listen(
        Session, "after_begin", lambda *_: counts.update(["sessions that used the database"])
    )
    original_init = Session.__init__

    def init(self: Session, *args: Any, **kwargs: Any) -> None:
        counts["sessions opened"] += 1
        original_init(self, *args, **kwargs)

    Session.__init__ = init  # type: ignore[method-assign]
    original_serve = endpoint._Request.serve

    async def serve(self: Any, handler: Any) -> Any:
        counts["requests"] += 1
        return await original_serve(self, handler)

    endpoint._Request.serve = serve  # type: ignore[method-assign]
    original_commit = AuditWriter._commit

    async def commit(self: AuditWriter, rows: list[dict[str, Any]]) -> Exception | None:
        counts["audit writer groups"] += 1
        counts["audit writer rows"] += len(rows)
        return await original_commit(self, rows)

    AuditWriter._commit = commit  # type: ignore[method-assign]
    import gc

    started: list[float] = []

    def collected(phase: str, info: dict[str, Any]) -> None:
        # Garbage collection stops the event loop: a full (generation 2) pass over a large
        # heap shows up as a latency tail in every request in flight.
        if phase == "start":
            started[:] = [time.perf_counter()]
            return
        pause = (time.perf_counter() - started[0]) * 1000 if started else 0.0
        counts[f"gc gen{info['generation']} collections"] += 1
        counts["gc pause ms"] += pause  # type: ignore[assignment]
        counts["gc longest pause ms"] = max(counts["gc longest pause ms"], pause)  # type: ignore[assignment]

    gc.callbacks.append(collected)

    def dump(*_: Any) -> None:
        counts["dumps"] += 1
        counts["gc objects tracked"] = len(gc.get_objects())
        counts_file.write_text(json.dumps(counts))
        counts["gc longest pause ms"] = 0  # the next dump says the longest since this one

    signal.signal(signal.SIGUSR1, dump)
    return cli.main(["serve", "--port", str(port)])


class Counted:
    """The instrumented opsapi behind the wire counter."""

    def __init__(self, target: Target, wire: WireCounter, counts_file: Path) -> None:
        self.target = target
        self.wire = wire
        self.counts_file = counts_file

    async def snapshot(self) -> tuple[Counter[str], Counter[str]]:
        before = (
            json.loads(self.counts_file.read_text())["dumps"] if self.counts_file.exists() else 0
        )
        os.kill(self.target.process.pid, signal.SIGUSR1)
        for _ in range(100):
            await asyncio.sleep(0.05)
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(self.counts_file.read_text())
                if data["dumps"] > before:
                    wire, statements = self.wire.snapshot()
                    return Counter(data) + wire, statements
        raise RuntimeError("the instrumented server did not write its counts")

    async def measure(
        self, work: Callable[[], Awaitable[Any]]
    ) -> tuple[dict[str, float], list[tuple[float, str]], int]:
        await asyncio.sleep(1)  # the previous phase's audit group commits are done
        counts0, statements0 = await self.snapshot()
        await work()
        await asyncio.sleep(2)  # requests in flight when wrk stopped finish (and are counted)
        counts1, statements1 = await self.snapshot()
        requests = counts1["requests"] - counts0["requests"]
        per = max(1, requests)
        keys = ["round trips", "transactions (BEGIN)", "COMMIT", "ROLLBACK", "statements",
                "prepares (Parse)", "pool checkouts", "sessions opened",
                "sessions that used the database", "audit writer groups", "audit writer rows",
                "connections opened", "server errors", "gc gen0 collections",
                "gc gen1 collections", "gc gen2 collections", "gc pause ms"]  # fmt: skip
        figures = {key: (counts1[key] - counts0[key]) / per for key in keys}
        # Not per request: the longest garbage-collection pause seen so far in the process.
        figures["gc longest pause ms (in the window, not per request)"] = counts1[
            "gc longest pause ms"
        ]
        figures["gc gen2 collections (in the window, not per request)"] = (
            counts1["gc gen2 collections"] - counts0["gc gen2 collections"]
        )
        figures["gc objects tracked (not per request)"] = counts1["gc objects tracked"]
        statements = [((statements1[text] - statements0[text]) / per, text)
                      for text in statements1 if statements1[text] - statements0[text]]  # fmt: skip
        statements.sort(reverse=True)
        return figures, statements, requests


async def count_round_trips(counted: Counted, services: Sequence[str], args: argparse.Namespace,
                            workdir: Path) -> list[str]:  # fmt: skip
    """Database work per request, per workload, at 1 connection and at `args.clients`."""
    target = counted.target
    lines: list[str] = []
    sequential_n = 100

    async def sequential(kind: str) -> None:
        client = target.client()
        etag = (await etags_of(target, services[:1]))[0] if kind != "status" else ""
        try:
            for index in range(sequential_n):
                name = services[0]
                if kind == "status":
                    await client.request("GET", f"/canary/{name}")
                elif kind == "weight":
                    await client.request("GET", f"/canary/{name}/weight")
                elif kind == "weight304":
                    await client.request("GET", f"/canary/{name}/weight",
                                         headers={"If-None-Match": etag})  # fmt: skip
                elif kind == "writes":
                    if index % 2 == 0:
                        body = {"service": name, "reason": "count"}
                        await client.request("POST", "/canary/rollback", body)
                    else:
                        body = {"service": name, "version": f"c{uuid.uuid4().hex[:10]}"}
                        await client.request("POST", "/canary/promote", body)
        finally:
            await client.close()

    answers: list[str] = []

    async def concurrent(kind: str, seconds: float = 5) -> None:
        etags = await etags_of(target, services) if kind == "weight304" else None
        script = lua_script(kind, token=target.token, services=services, threads=args.threads,
                            etags=etags)  # fmt: skip
        run = await run_wrk(target.port, script, seconds=seconds, connections=args.clients,
                            threads=args.threads, workdir=workdir)  # fmt: skip
        answers[:] = [" ".join(f"{k[1:]}:{v}" for k, v in run.statuses.items() if v)]

    async def held_304() -> None:
        etag = (await etags_of(target, [LONG_POLL_SERVICE]))[0]
        clients = [target.client() for _ in range(args.clients)]
        try:
            await asyncio.gather(*(client.request(
                "GET", f"/canary/{LONG_POLL_SERVICE}/weight?wait=2s",
                headers={"If-None-Match": etag}) for client in clients))  # fmt: skip
        finally:
            for client in clients:
                await client.close()

    # (label, work, measured): unmeasured steps warm the pool up (each new connection prepares
    # its statements again) or reopen the rollouts.
    plans: list[tuple[str, Callable[[], Awaitable[Any]], bool]] = []
    for kind, label in (("status", "status read"), ("weight", "weight read 200"),
                        ("weight304", "weight 304"), ("writes", "audited write")):  # fmt: skip
        # The counted server is slower (every statement crosses the proxy): settle longer.
        reopen_all = ("reopen", lambda kind=kind: prepare(target, kind, services, 3), False)
        plans.append((f"{label}, 1 connection", lambda kind=kind: sequential(kind), True))
        plans.append(reopen_all)
        plans.append(("warm-up", lambda kind=kind: concurrent(kind, 2), False))
        plans.append(reopen_all)
        plans.append((f"{label}, {args.clients} connections",
                      lambda kind=kind: concurrent(kind), True))  # fmt: skip
    plans.append((f"long poll held 2 s → 304, {args.clients} polls", held_304, True))

    for label, work, measured in plans:
        if not measured:
            await work()
            continue
        answers[:] = []
        figures, statements, requests = await counted.measure(work)
        mix = f" (wrk saw {answers[0]})" if answers else ""
        block = [f"\n  {label}: {requests} requests{mix}; per request:"]
        block.append("    " + ", ".join(f"{key} {value:.2f}" for key, value in figures.items()
                                          if value))  # fmt: skip
        if figures["audit writer groups"]:
            rows = figures["audit writer rows"] / figures["audit writer groups"]
            block.append(f"    (audit writer: {rows:.1f} events per group commit)")
        block.extend(f"    {share:5.2f}  {text}" for share, text in statements[:14])
        print("\n".join(block))
        lines.extend(block)
    return lines


# The benchmark -----------------------------------------------------------------------------

WORKLOADS = (
    ("status", "status read GET /canary/{s}"),
    ("status_each", "status read, audited each"),
    ("weight", "weight read 200"),
    ("weight304", "weight 304 (If-None-Match)"),
    ("writes", "audited writes (rollback/start)"),
)


@dataclass
class Results:
    runs: dict[tuple[str, str], list[Run]] = field(default_factory=dict)

    def add(self, kind: str, target: str, run: Run) -> None:
        self.runs.setdefault((kind, target), []).append(run)


def _range(values: Sequence[float], fmt: str = "{:.0f}") -> str:
    if not values:
        return "—"
    low, high = min(values), max(values)
    middle = statistics.median(values)
    if len(values) == 1:
        return fmt.format(middle)
    return f"{fmt.format(middle)} ({fmt.format(low)}-{fmt.format(high)})"


def summary(results: Results) -> list[str]:
    lines = ["", "summary: median (min-max) over rounds; ratio = opsapi / floor in the same round",
             "cpu = CPU ms per request of the server process + its database backends",
             f"{'workload':<32} {'floor req/s':>17} {'floor p99 ms':>18} {'opsapi req/s':>17} "
             f"{'opsapi p50 ms':>18} {'opsapi p99 ms':>18} {'ratio':>17} {'floor cpu':>16} "
             f"{'opsapi cpu':>16}"]  # fmt: skip
    for kind, label in WORKLOADS:
        floor = results.runs.get((kind, "floor"), [])
        ops = results.runs.get((kind, "opsapi"), [])
        ratios = [o.rate / f.rate for f, o in zip(floor, ops, strict=False) if f.rate]
        lines.append(
            f"{label[:32]:<32} {_range([r.rate for r in floor]):>17} "
            f"{_range([r.p99 for r in floor], '{:.1f}'):>18} {_range([r.rate for r in ops]):>17} "
            f"{_range([r.p50 for r in ops], '{:.1f}'):>18} "
            f"{_range([r.p99 for r in ops], '{:.1f}'):>18} {_range(ratios, '{:.2f}x'):>17} "
            f"{_range([r.app_cpu_ms + r.db_cpu_ms for r in floor], '{:.2f}'):>16} "
            f"{_range([r.app_cpu_ms + r.db_cpu_ms for r in ops], '{:.2f}'):>16}"
        )
    for read, name in (("status_each", "audited status read"), ("status", "status read")):
        status = results.runs.get((read, "opsapi"), [])
        for kind in ("weight", "weight304"):
            runs = results.runs.get((kind, "opsapi"), [])
            ratios = [w.rate / s.rate for s, w in zip(status, runs, strict=False) if s.rate]
            if ratios:
                lines.append(f"opsapi {kind} / opsapi {name}: {_range(ratios, '{:.1f}x')}"
                             + (" (target >= 5x)" if read == "status_each" else ""))  # fmt: skip
    return lines


def describe_checkout(checkout: Path) -> str:
    """The checkout's commit and whether its opsapi/ has uncommitted changes."""
    try:
        git = ["git", "-C", str(checkout)]
        head = subprocess.run([*git, "log", "-1", "--format=%h %s"], capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run([*git, "status", "--short", "opsapi"], capture_output=True,
                               text=True, check=True).stdout.split("\n")  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return f"{checkout} (not a git checkout)"
    changed = [line[3:] for line in dirty if line.strip()]
    state = f"; uncommitted changes in {', '.join(changed)}" if changed else "; clean"
    return f"{checkout} at {head[:70]}{state}"


async def commit_latency(dsn: str) -> tuple[float, float]:
    """p50 and p99 (ms) of a one-row insert committed alone: the database's commit (WAL
    flush) latency, which bounds anything that commits under one lock."""
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute("CREATE TABLE bench_commit_probe (x int)")
        samples = []
        for _ in range(50):
            started = time.perf_counter()
            async with connection.transaction():
                await connection.execute("INSERT INTO bench_commit_probe VALUES (1)")
            samples.append((time.perf_counter() - started) * 1000)
        await connection.execute("DROP TABLE bench_commit_probe")
    finally:
        await connection.close()
    samples.sort()
    return _pct(samples, 0.5), _pct(samples, 0.99)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--services", type=int, default=96)
    parser.add_argument("--workloads", default=",".join(kind for kind, _ in WORKLOADS))
    parser.add_argument("--checkout", type=Path, default=ROOT,
                        help="the opsapi tree to measure (default: this one)")  # fmt: skip
    parser.add_argument("--label", help="what the checkout is (e.g. the commit it was exported at)")
    parser.add_argument("--async-commit", action="store_true",
                        help="synchronous_commit=off on both databases: no WAL flush wait "
                             "(NOT durable; shows the cost without the disk)")  # fmt: skip
    parser.add_argument("--skip-profile", action="store_true")
    parser.add_argument("--profile-out", type=Path,
                        help="keep py-spy's raw samples in this folder")  # fmt: skip
    parser.add_argument("--skip-count", action="store_true")
    parser.add_argument("--skip-long-poll", action="store_true")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is required (apt-get install wrk)")
    kinds = args.workloads.split(",")
    checkout = args.checkout.resolve()

    tag = uuid.uuid4().hex[:8]
    databases = {"opsapi": f"opsapi_bench_{tag}", "floor": f"opsapi_floor_{tag}",
                 "counted": f"opsapi_count_{tag}"}  # fmt: skip
    admin = await asyncpg.connect(ADMIN_DSN)
    workdir = Path(tempfile.mkdtemp(prefix="opsapi-bench-"))
    processes: list[subprocess.Popen[bytes]] = []
    wire: WireCounter | None = None
    services = [f"svc-{i}" for i in range(args.services)]
    from opsapi.auth.tokens import LocalSigner

    signer = LocalSigner.load_or_create(workdir / "key.json")
    token = signer.mint(subject="bench", roles=["operator"])
    admin_token = signer.mint(subject="bench-admin", roles=["admin"])
    # Enough readers that no run reads a (reader, service) pair read in the last minutes.
    readers = [signer.mint(subject=f"reader-{i}", roles=["viewer"]) for i in range(READERS)]
    reader_offset = 0
    record: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}

    async def new_database(name: str) -> None:
        await admin.execute(f'CREATE DATABASE "{name}"')
        if args.async_commit:
            await admin.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')

    try:
        await new_database(databases["opsapi"])
        port = free_port()
        ops_process = start_process([sys.executable, "-m", "opsapi", "serve", "--port", str(port)],
                                    opsapi_env(databases["opsapi"], workdir),
                                    workdir / "opsapi.log", port, cwd=checkout)  # fmt: skip
        processes.append(ops_process)
        await seed(port, token, [*services, LONG_POLL_SERVICE])
        ops = Target("opsapi", port, ops_process, token, admin_token, databases["opsapi"])

        await new_database(databases["floor"])
        migrate(databases["floor"], checkout)
        await copy_rows(databases["opsapi"], databases["floor"], ("service", "rollout"))
        tokens = workdir / "tokens.json"
        tokens.write_text(json.dumps({
            token: {"subject": "bench", "roles": ["operator"]},
            admin_token: {"subject": "bench-admin", "roles": ["admin"]},
            **{reader: {"subject": f"reader-{i}", "roles": ["viewer"]}
               for i, reader in enumerate(readers)},
        }))  # fmt: skip
        floor_port = free_port()
        floor_process = start_process(
            [sys.executable, str(ROOT / "benchmarks" / "floor_app.py"), "--port",
             str(floor_port), "--dsn", dsn_of(databases["floor"]), "--tokens", str(tokens),
             "--opsapi", str(checkout)],
            {}, workdir / "floor.log", floor_port,
        )  # fmt: skip
        processes.append(floor_process)
        floor = Target("floor", floor_port, floor_process, token, admin_token, databases["floor"])

        commit_p50, commit_p99 = await commit_latency(dsn_of(databases["floor"]))
        record["commit_latency_ms"] = [commit_p50, commit_p99]
        print(f"opsapi: {args.label or describe_checkout(checkout)}")
        print(f"opsapi serve (pid {ops_process.pid}) and the floor app (pid {floor_process.pid}),"
              f" PostgreSQL, wrk -t{args.threads} -c{args.clients}, {args.seconds:.0f} s runs "
              f"after {args.warmup:.0f} s of warm-up, {args.services} services, {os.cpu_count()} "
              f"cores shared with PostgreSQL and wrk; load average "
              f"{os.getloadavg()[0]:.1f} at start")  # fmt: skip
        print(f"commit latency (one-row insert committed alone): p50 {commit_p50:.2f} ms, "
              f"p99 {commit_p99:.2f} ms; synchronous_commit "
              f"{'OFF (not durable)' if args.async_commit else 'on'}")  # fmt: skip
        results = Results()
        for round_index in range(1, args.rounds + 1):
            print(f"\nround {round_index}")
            for kind, label in WORKLOADS:
                if kind not in kinds:
                    continue
                for target in (floor, ops):
                    etags = await etags_of(target, services) if kind == "weight304" else None

                    def script_of(offset: int, target: Target = target, kind: str = kind,
                                  etags: list[str] | None = etags) -> str:  # fmt: skip
                        return lua_script(kind, token=target.token, services=services,
                                          threads=args.threads, etags=etags, readers=readers,
                                          offset=offset)  # fmt: skip

                    if args.warmup:
                        await prepare(target, kind, services)
                        warm = await run_wrk(target.port, script_of(reader_offset),
                                             seconds=args.warmup, connections=args.clients,
                                             threads=args.threads, workdir=workdir)  # fmt: skip
                        reader_offset += warm.requests + 10 * args.clients
                    await prepare(target, kind, services)
                    events = await audit_events(target, "canary.get")
                    run = await measured_run(target, script_of(reader_offset), seconds=args.seconds,
                                             args=args, workdir=workdir)  # fmt: skip
                    reader_offset += run.requests + 10 * args.clients
                    results.add(kind, target.name, run)
                    audited = ""
                    if kind.startswith("status"):
                        written = await audit_events(target, "canary.get") - events
                        audited = f"  audit rows {written / (run.requests + args.clients):.2f}/read"
                    print(f"  {label:<34} {target.name:<7} {run.line()}{audited}  "
                          f"load {os.getloadavg()[0]:.1f}")  # fmt: skip
        lines = summary(results)
        print("\n".join(lines))
        record["runs"] = {f"{k}/{t}": [vars(r) for r in runs]
                          for (k, t), runs in results.runs.items()}  # fmt: skip

        if not args.skip_long_poll:
            print(f"\nlong poll on opsapi ({args.clients} polls of one service, ?wait=30s, "
                  "set-weight every 0.5 s):")  # fmt: skip
            record["long_poll"] = []
            for _ in range(2):
                result = await long_poll(ops, pollers=args.clients, changes=10, gap=0.5)
                record["long_poll"].append(vars(result))
                print(f"  {result.line()}")

        if not args.skip_profile:
            record["profiles"] = {}
            for kind in [k for k in ("status", "writes", "weight", "weight304") if k in kinds]:
                print(f"\nprofiling opsapi under {kind} (py-spy, 100 Hz, {args.seconds:.0f} s):")
                result = await profile(ops, kind, services, seconds=args.seconds, args=args,
                                       workdir=workdir)  # fmt: skip
                if result is not None:
                    if args.profile_out:
                        args.profile_out.mkdir(parents=True, exist_ok=True)
                        shutil.copy(workdir / f"profile-{kind}.txt", args.profile_out)
                    print_profile(f"opsapi profile, {kind}", result)
                    record["profiles"][kind] = vars(result)

        stop_process(floor_process)
        if not args.skip_count:
            print("\ndatabase work per request (instrumented opsapi behind a wire-protocol "
                  "counting proxy; PagerDuty worker off):")  # fmt: skip
            await new_database(databases["counted"])
            wire = WireCounter(int(ADMIN_DSN.rsplit(":", 1)[1].split("/")[0]))
            proxy_port = await wire.start()
            counted_port = free_port()
            counts_file = workdir / "counts.json"
            counted_process = await asyncio.to_thread(
                start_process,
                [sys.executable, str(Path(__file__).resolve()), "--instrumented-serve",
                 str(counted_port), str(counts_file), str(checkout)],
                opsapi_env(databases["counted"], workdir, port=proxy_port,
                           extra={"OPSAPI_PAGERDUTY_WORKER_ENABLED": "false"}),
                workdir / "counted.log", counted_port, checkout,
            )  # fmt: skip
            processes.append(counted_process)
            await seed(counted_port, token, [*services, LONG_POLL_SERVICE])
            counted_target = Target("counted", counted_port, counted_process, token,
                                    admin_token, databases["counted"])  # fmt: skip
            counted = Counted(counted_target, wire, counts_file)
            record["round_trips"] = await count_round_trips(counted, services, args, workdir)
    finally:
        for process in reversed(processes):
            # In a thread: the counted server's shutdown still talks through the proxy here.
            await asyncio.to_thread(stop_process, process)
        if wire is not None:
            await wire.close()
        for name in databases.values():
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        if args.json:
            args.json.write_text(json.dumps(record, indent=1, default=str))
            for log in workdir.glob("*.log"):  # the servers' own lines, for any 5xx seen
                shutil.copy(log, args.json.with_suffix(f".{log.name}"))
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--instrumented-serve"]:
        sys.exit(instrumented_serve(int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])))
    asyncio.run(main())
