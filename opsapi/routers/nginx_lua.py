"""nginx-lua router: weights in nginx's shared memory, changed through an authenticated admin
location without a reload; a Lua balancer picks the slot of every request.

How it fits together
--------------------
`opsapi nginx-config --router NAME UPSTREAM...` prints an `http {}` snippet (include it inside
`http { }`) with:

- `lua_shared_dict opsapi_<router>`: one entry per upstream (the service, a generation, both
  slots' addresses and weights, which slot runs the canary and which is stable, an optional
  lease, the sticky header or cookie). The dict is one shared memory zone read by every worker.
- `init_by_lua_block`: the Lua code (`opsapi/routers/lua/opsapi_nginx_lua.lua`) and the loading
  of opsapi's **state file**, at start and at every reload, so that an nginx restarted by
  someone else comes back with the last weights opsapi applied.
- an admin `server` listening only on the instance's loopback address or unix socket, whose
  `/opsapi/weights` sets and reads entries. Every call carries `Authorization: Bearer <secret>`;
  nginx holds no secret, only `verifier` = SHA-256 of the secret salted with the router name,
  compared in constant time, and the admin server keeps no access log.
- per upstream named on the command line, an `upstream` block whose `balancer_by_lua_block`
  picks a slot. The service's `proxy_pass http://<upstream>;` names it.

The Lua module must be loaded by the main configuration (`load_module` lines, outside `http`;
Debian's `libnginx-mod-http-lua` does it in `/etc/nginx/modules-enabled/`).

Applying a weight
-----------------
Under a lock (in-process, plus an `flock` on `<state_file>.lock` across processes), `apply`
writes the new entry into the state file (atomically: temp file and rename; fsynced beside the
call, see `flush_state`) **before** sending it, then POSTs it to every admin address at once.
An instance answers with the entry it reads back from the shared dict after storing it;
`apply` returns when every instance answered with exactly the entry sent (generation and
weights). One read per instance suffices: the dict
is shared memory, so the value read back is what every worker's balancer reads on its next
request (unlike a reload, no old worker keeps old weights). An instance that did not confirm
makes `apply` raise RouterError naming the instances that are live and those that failed; the
next apply (reconcile) sends a new generation to all.

Generations only grow (at least the state file's plus one): an instance refuses an entry older
than the one it has, so a replayed or late call never undoes a newer one.

No weights at all (no state file, or an upstream never applied): requests to that upstream fail
with 500 instead of going to a guessed slot. "The first slot" is the stable one only until the
first success; after that it may hold a rolled-back canary.

Leases: a target with `valid_until` (epoch seconds) sends the lease with the entry; once it has
passed, the balancer sends everything to the entry's stable slot by itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import functools
import hashlib
import ipaddress
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from opsapi.canary.policy import is_service_name
from opsapi.routers.base import (
    RouterError,
    RouteTarget,
    check_slots,
    slot_names,
    slot_weights,
    unknown_parameters,
)
from opsapi.routers.nginx import UPSTREAM_NAME, address_key, split_host_port

T = TypeVar("T")
log = logging.getLogger("opsapi.routers")
KIND = "an nginx-lua router"
PARAMS = ("upstream", "slots", "sticky")
STICKY_NAME = {"header": r"^[A-Za-z0-9-]{1,64}$", "cookie": r"^[A-Za-z0-9_-]{1,64}$"}
ADMIN_UNIX = re.compile(r"^unix:(/[A-Za-z0-9_./-]{1,100})$")
SECRET = re.compile(r"^[\x21-\x7e]{32,4096}$")
WEIGHTS_PATH = "/opsapi/weights"
HEALTH_PATH = "/opsapi/health"
MAX_GENERATION = 10**16 - 1  # 16 digits, as the Lua side accepts
MAX_IDLE = 4  # kept-alive connections per admin address
_ENTRY_FIELD = re.compile(r"^([a-z_]+)=(\S+)$")
_SLOT = re.compile(r"^([a-z0-9][a-z0-9_-]{0,31}):(\d{1,3})@(\S+)$")


def ip_port(value: str) -> tuple[str, int] | None:
    """`(ip, port)` for an IP literal and port (`10.0.0.1:8080`, `[::1]:8080`), else None: the
    balancer connects to addresses, it resolves no names."""
    address = split_host_port(value)
    if address is None:
        return None
    try:
        ipaddress.ip_address(address[0])
    except ValueError:
        return None
    return address


def _address_error(value: object) -> str | None:
    if not isinstance(value, str):
        return "must be a string"
    if len(value) > 64 or ip_port(value) is None:
        return "must be an IP address and port (10.0.0.1:8080 or [::1]:8080): no host names"
    return None


def admin_error(value: str) -> str | None:
    """Why `value` cannot be an admin address (loopback `ip:port` or `unix:/path`), else None."""
    if ADMIN_UNIX.fullmatch(value):
        return None
    address = ip_port(value)
    if address is None or not ipaddress.ip_address(address[0]).is_loopback:
        return "must be a loopback address (127.0.0.1:8098, [::1]:8098) or unix:/absolute/path"
    return None


def verifier(router: str, secret: str) -> str:
    """What nginx stores instead of the secret: SHA-256 of it, salted with the router name."""
    return hashlib.sha256(f"opsapi nginx-lua admin {router}\n{secret}".encode()).hexdigest()


@dataclass(frozen=True)
class Entry:
    """One upstream's weights as nginx holds them (a line of the admin protocol and the state
    file): the canary slot gets its weight, the stable slot everything once `valid_until` has
    passed (0: no lease)."""

    upstream: str
    service: str
    generation: int
    canary: str
    stable: str
    slots: dict[str, tuple[int, str]]  # slot -> (weight, address), in the policy's order
    valid_until: float = 0.0
    sticky: str = "-"  # "-", "header:NAME" or "cookie:NAME"

    def line(self) -> str:
        """The entry as one line."""
        slots = ",".join(f"{name}:{share}@{where}" for name, (share, where) in self.slots.items())
        lease = f"{self.valid_until:.3f}" if self.valid_until > 0 else "0"
        return (
            f"upstream={self.upstream} service={self.service} generation={self.generation} "
            f"canary={self.canary} stable={self.stable} slots={slots} valid_until={lease} "
            f"sticky={self.sticky}"
        )

    @classmethod
    def parse(cls, line: str) -> Entry | None:
        """The entry of a line written by `line()` (or echoed by nginx); None when it is not one."""
        fields: dict[str, str] = {}
        for token in line.split():
            match = _ENTRY_FIELD.fullmatch(token)
            if match is None or match.group(1) in fields:
                return None
            fields[match.group(1)] = match.group(2)
        keys = {"upstream", "service", "generation", "canary", "stable", "slots", "valid_until",
                "sticky"}  # fmt: skip
        if set(fields) != keys or not fields["generation"].isdigit():
            return None
        slots: dict[str, tuple[int, str]] = {}
        for part in fields["slots"].split(","):
            slot = _SLOT.fullmatch(part)
            if slot is None:
                return None
            slots[slot.group(1)] = (int(slot.group(2)), slot.group(3))
        try:
            valid_until = float(fields["valid_until"])
        except ValueError:
            return None
        return cls(
            upstream=fields["upstream"],
            service=fields["service"],
            generation=int(fields["generation"]),
            canary=fields["canary"],
            stable=fields["stable"],
            slots=slots,
            valid_until=valid_until,
            sticky=fields["sticky"],
        )

    def canary_percent(self, slot: str, now: float) -> int | None:
        """The percentage live for `slot` at `now` (an expired lease sends all to the stable)."""
        if slot not in self.slots:
            return None
        if self.valid_until > 0 and now >= self.valid_until:
            return 100 if slot == self.stable else 0
        return self.slots[slot][0]


def read_state(path: Path) -> dict[str, Entry]:
    """The state file's entries by upstream (none when the file does not exist yet)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    entries = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            entry = Entry.parse(line)
            if entry is not None:
                entries[entry.upstream] = entry
    return entries


def write_state(path: Path, router: str, entries: dict[str, Entry]) -> None:
    """Replace the state file atomically (readable by nginx): nginx, restarting at any moment,
    reads the old file or the new one, never half of one. Not fsynced here (see `flush_state`)."""
    lines = [
        f'# opsapi nginx-lua state of router "{router}": the weights opsapi applies, written '
        "before each apply, read by nginx at start and reload. Do not edit.",
        *(entries[upstream].line() for upstream in sorted(entries)),
    ]
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write("\n".join(lines) + "\n")
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def flush_state(path: Path) -> None:
    """fsync the state file and its directory. An nginx restart needs only the rename (the page
    cache is shared); this is for a crash of the whole machine, so it runs beside the apply
    rather than before it (a few ms of disk commit on every weight change otherwise). Should
    the machine crash before it ends, nginx may start with older weights; the drift check
    repairs them."""
    for target, flags in ((path, os.O_RDONLY), (path.parent, os.O_RDONLY)):
        try:
            fd = os.open(target, flags)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def record_state(
    path: Path, router: str, upstream: str, entry_after: Callable[[Entry | None], Entry]
) -> Entry:
    """Read the state file, replace `upstream`'s entry with `entry_after(its current one)` and
    write the file back (one trip to a thread for the whole update); the new entry."""
    state = read_state(path)
    entry = entry_after(state.get(upstream))
    state[upstream] = entry
    write_state(path, router, state)
    return entry


# Threads of their own: the state file is on every apply's path (a rollback's too), so it never
# waits behind other work in the event loop's default executor. One thread flushes every
# router's state file, in order.
_STATE_IO = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="opsapi-state")
_FLUSHER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="opsapi-flush")


def _flush_quietly(path: Path) -> None:
    try:
        flush_state(path)
    except OSError as error:
        log.warning("nginx-lua state file %s not flushed: %s", path, error.strerror or error)


class AdminError(Exception):
    """One admin address failed; the message is safe to show (never the secret)."""


@dataclass(frozen=True)
class Answer:
    """An admin location's answer."""

    status: int
    text: str


class AdminClient:
    """HTTP/1.1 to one admin address (loopback TCP or unix socket), keep-alive connections
    reused; a small hand-rolled client because every apply waits for it."""

    def __init__(self, address: str, secret: str, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self._authorization = f"Bearer {secret}"
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"AdminClient({self.address!r})"

    async def request(self, method: str, path: str, body: str = "") -> Answer:
        """One request; a kept-alive connection the server closed meanwhile is retried once on a
        new one (both calls are safe to repeat)."""
        try:
            async with asyncio.timeout(self.timeout):
                connection, reused = await self._connection()
                try:
                    return await self._exchange(connection, method, path, body)
                except (OSError, asyncio.IncompleteReadError):
                    if not reused:
                        raise
                connection, _ = await self._connection(fresh=True)
                return await self._exchange(connection, method, path, body)
        except TimeoutError:
            raise AdminError(f"no answer within {self.timeout:g}s") from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as error:
            raise AdminError(_reason(error)) from None

    async def _connection(
        self, fresh: bool = False
    ) -> tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter], bool]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # connections belong to the loop that opened them
            self._idle, self._loop = [], loop
        if self._idle and not fresh:
            return self._idle.pop(), True
        if self.address.startswith("unix:"):
            return await asyncio.open_unix_connection(self.address[5:]), False
        host, port = split_host_port(self.address) or ("", 0)
        return await asyncio.open_connection(host, port), False

    async def _exchange(
        self,
        connection: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        method: str,
        path: str,
        body: str,
    ) -> Answer:
        reader, writer = connection
        try:
            data = body.encode()
            writer.write(
                f"{method} {path} HTTP/1.1\r\nHost: opsapi-admin\r\n"
                f"Authorization: {self._authorization}\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(data)}\r\n\r\n".encode()
                + data
            )
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            status_line, *header_lines = head.split("\r\n")
            parts = status_line.split(" ", 2)
            if len(parts) < 2 or not parts[1].isdigit():
                raise AdminError("not an HTTP answer")
            headers = {}
            for header in header_lines:
                name, _, value = header.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = headers.get("content-length", "")
            if not length.isdigit() or int(length) > 65536:
                raise AdminError("answer without a usable Content-Length (is this the admin?)")
            text = (await reader.readexactly(int(length))).decode("utf-8", "replace")
        except BaseException:
            writer.close()
            raise
        if headers.get("connection", "").lower() == "close" or len(self._idle) >= MAX_IDLE:
            writer.close()
        else:
            self._idle.append(connection)
        return Answer(int(parts[1]), text.strip())


def _reason(error: BaseException) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, FileNotFoundError):
        return "no such socket"
    if isinstance(error, asyncio.IncompleteReadError):
        return "connection closed mid-answer"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    return error.__class__.__name__


@dataclass(frozen=True)
class LuaParams:
    """A service's parameters for an nginx-lua router, validated."""

    upstream: str
    slots: dict[str, str]
    sticky: str  # "-", "header:NAME" or "cookie:NAME"


class NginxLuaRouter:
    """Splits a service's traffic through a Lua balancer's shared weights (see the module doc)."""

    # It holds an expiry: past `valid_until`, the balancer sends everything to the stable slot.
    holds_lease = True

    def __init__(
        self,
        name: str,
        admins: Sequence[str],
        secret: str,
        state_file: Path,
        *,
        timeout: float = 2.0,
    ) -> None:
        for admin in admins:
            if admin_error(admin) is not None:
                raise ValueError(f"admin address: {admin_error(admin)}")
        if not admins or len(set(admins)) != len(admins):
            raise ValueError("admins: one or more distinct addresses")
        if not SECRET.fullmatch(secret):
            raise ValueError("secret: 32 to 4096 visible ASCII characters")
        self.name = name
        self.admins = tuple(admins)
        self.state_file = Path(state_file)
        self.timeout = timeout
        self._verifier = verifier(name, secret)
        self._clients = {admin: AdminClient(admin, secret, timeout) for admin in admins}
        self._lock = asyncio.Lock()
        self._last_generation = 0

    def __repr__(self) -> str:
        return (
            f"NginxLuaRouter(name={self.name!r}, admins={list(self.admins)!r}, "
            f"state_file={str(self.state_file)!r})"
        )

    def check_params(self, params: dict[str, Any]) -> list[dict[str, str]]:
        """Field errors for `{"upstream", "slots": {name: "ip:port", name: "ip:port"},
        "sticky"?: {"header" | "cookie": NAME}}`; these values reach nginx, nothing loose
        passes."""
        errors = unknown_parameters(params, PARAMS, KIND)
        upstream = params.get("upstream")
        if upstream is None:
            errors.append({"field": "router.upstream", "message": "required"})
        elif not isinstance(upstream, str) or not UPSTREAM_NAME.fullmatch(upstream):
            message = "must match ^[A-Za-z0-9_-]{1,64}$"
            errors.append({"field": "router.upstream", "message": message})
        # The nginx router's example slots (IP addresses) fit this router too.
        slot_errors = check_slots(params, "an nginx router", _address_error)
        if not slot_errors:
            (first, one), (second, other) = params["slots"].items()
            if address_key(one) == address_key(other):
                slot_errors.append(
                    {"field": f"router.slots.{second}", "message": f"same address as slot {first}"}
                )
        return errors + slot_errors + _sticky_errors(params.get("sticky"))

    async def apply(self, target: RouteTarget, weight: int) -> None:
        """Record the new weights in the state file, send them to every nginx instance at once
        and return when each has confirmed them live; RouterError naming the instances that are
        live and those that failed otherwise."""
        params = self._params(target)
        weights = slot_weights(target, weight)
        names = slot_names(target.params)
        stable = target.stable_slot if target.stable_slot in names else _other(names, target)
        lease = target.valid_until or 0.0
        if not math.isfinite(lease) or lease < 0 or lease >= 1e11:
            raise RouterError(f"nginx-lua router {self.name!r}: invalid lease")
        lease = round(lease, 3)  # as the entry's line carries it
        async with self._lock, self._state_lock():
            floor = 0
            for attempt in (1, 2):

                def entry_after(previous: Entry | None, floor: int = floor) -> Entry:
                    last = previous.generation if previous is not None else 0
                    return Entry(
                        upstream=params.upstream,
                        service=target.service,
                        generation=self._next_generation(max(last, floor)),
                        canary=target.canary_slot,
                        stable=stable,
                        slots={name: (weights[name], params.slots[name]) for name in names},
                        valid_until=lease,
                        sticky=params.sticky,
                    )

                # Before sending: an nginx restarting from here on comes back with these weights.
                entry = await self._io(
                    record_state, self.state_file, self.name, params.upstream, entry_after
                )
                _FLUSHER.submit(_flush_quietly, self.state_file)
                results = await asyncio.gather(*(self._set(admin, entry) for admin in self.admins))
                newer = [result for result in results if isinstance(result, int)]
                if not newer or attempt == 2:
                    break
                # An instance holds a newer generation than the state file (a restored file):
                # once more above it, so that every instance gets the same entry.
                floor = max(newer)
            failed = {
                admin: f"holds a newer generation {result}" if isinstance(result, int) else result
                for admin, result in zip(self.admins, results, strict=True)
                if result is not None
            }
            if failed:
                raise RouterError(self._failure(failed))

    async def read_back(self, target: RouteTarget) -> int | None:
        """The canary slot's live percentage when every instance answers with the same entry for
        this service (its lease taken into account); None when one is down, they disagree, or
        the service has no weights there."""
        params = self._params(target)
        slot_weights(target, 0)  # refuses a canary slot that is not one of the two
        answers = await asyncio.gather(
            *(self._get(admin, params.upstream) for admin in self.admins), return_exceptions=True
        )
        entries = []
        for answer in answers:
            if isinstance(answer, RouterError):
                raise answer
            if isinstance(answer, BaseException) or answer is None:
                return None
            entries.append(answer)
        first = entries[0]
        if any(entry != first for entry in entries) or first.service != target.service:
            return None
        live = first.slots.get(target.canary_slot)
        if live is None or address_key(live[1]) != address_key(params.slots[target.canary_slot]):
            return None
        return first.canary_percent(target.canary_slot, time.time())

    async def health(self) -> str:
        """Every admin address answers, authenticated."""
        answers = await asyncio.gather(
            *(self._request(admin, "GET", HEALTH_PATH) for admin in self.admins),
            return_exceptions=True,
        )
        failed: dict[str, str] = {}
        for admin, answer in zip(self.admins, answers, strict=True):
            if isinstance(answer, BaseException):
                failed[admin] = str(answer)
            elif answer.status != 200:
                failed[admin] = _status_reason(answer)
        if failed:
            raise RouterError(self._failure(failed))
        return f"nginx-lua admin {', '.join(self.admins)} answers"

    def nginx_config(self, upstreams: Sequence[str], admin: str | None = None) -> str:
        """The `http {}` snippet for the nginx instance at `admin` (required when there are
        several), with an upstream block per name in `upstreams`."""
        if admin is None:
            if len(self.admins) > 1:
                raise ValueError(f"router {self.name!r} has several admin addresses: name one")
            admin = self.admins[0]
        if admin not in self.admins:
            raise ValueError(f"{admin!r} is not an admin address of router {self.name!r}")
        for upstream in upstreams:
            if not UPSTREAM_NAME.fullmatch(upstream):
                raise ValueError("upstream names must match ^[A-Za-z0-9_-]{1,64}$")
        return render_config(self.name, admin, self.state_file, self._verifier, upstreams)

    # --- internals ------------------------------------------------------------------------

    def _params(self, target: RouteTarget) -> LuaParams:
        if not is_service_name(target.service):
            raise RouterError(f"nginx-lua router {self.name!r}: invalid service name")
        errors = self.check_params(target.params)
        if errors:
            detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
            raise RouterError(f"nginx-lua router {self.name!r}: invalid parameters ({detail})")
        sticky = target.params.get("sticky")
        return LuaParams(
            upstream=target.params["upstream"],
            slots=dict(target.params["slots"]),
            sticky="-" if sticky is None else "{}:{}".format(*next(iter(sticky.items()))),
        )

    def _next_generation(self, floor: int) -> int:
        # Microseconds since the epoch, above the state file's and this process's last: grows
        # across processes sharing the state file, clocks permitting or not.
        self._last_generation = max(time.time_ns() // 1000, self._last_generation + 1, floor + 1)
        if self._last_generation > MAX_GENERATION:
            raise RouterError(f"nginx-lua router {self.name!r}: generation out of range")
        return self._last_generation

    async def _request(self, admin: str, method: str, path: str, body: str = "") -> Answer:
        return await self._clients[admin].request(method, path, body)

    async def _set(self, admin: str, entry: Entry) -> str | int | None:
        """None when `admin` confirmed `entry`; the newer generation it holds; or why it failed."""
        try:
            answer = await self._request(admin, "POST", WEIGHTS_PATH, entry.line())
        except AdminError as error:
            return str(error)
        if answer.status == 200 and Entry.parse(answer.text) == entry:
            return None
        if answer.status == 409:
            live = Entry.parse(answer.text)
            if live is not None and live.generation >= entry.generation:
                return live.generation
        if answer.status == 200:
            return "answered with other weights than those sent"
        return _status_reason(answer)

    async def _get(self, admin: str, upstream: str) -> Entry | None:
        """The entry `admin` holds for `upstream` (None: none); AdminError when unreachable,
        RouterError when it refuses."""
        answer = await self._request(admin, "GET", f"{WEIGHTS_PATH}?upstream={upstream}")
        if answer.status == 404:
            return None
        if answer.status != 200:
            raise RouterError(f"nginx-lua router {self.name!r}: {admin}: {_status_reason(answer)}")
        return Entry.parse(answer.text)

    def _failure(self, failed: dict[str, str]) -> str:
        live = [admin for admin in self.admins if admin not in failed]
        reasons = "; ".join(f"{admin} ({reason})" for admin, reason in failed.items())
        return (
            f"nginx-lua router {self.name!r}: live on {', '.join(live) or 'none'}; "
            f"failed on {reasons}"
        )

    async def _io(self, function: Callable[..., T], *args: object) -> T:
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(_STATE_IO, functools.partial(function, *args))
        except OSError as error:
            raise RouterError(
                f"nginx-lua router {self.name!r}: {error.strerror or error} "
                f"({error.filename or self.state_file})"
            ) from None

    @contextlib.asynccontextmanager
    async def _state_lock(self) -> AsyncIterator[None]:
        lock_path = self.state_file.with_name(self.state_file.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise RouterError(
                f"nginx-lua router {self.name!r}: cannot open {lock_path}: {error.strerror}"
            ) from None
        try:
            deadline = time.monotonic() + max(self.timeout, 1.0) * 5
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise RouterError(
                            f"nginx-lua router {self.name!r}: another apply holds {lock_path}"
                        ) from None
                    await asyncio.sleep(0.005)
            yield
        finally:
            os.close(fd)  # releases the lock


def _other(names: tuple[str, str], target: RouteTarget) -> str:
    return names[1] if names[0] == target.canary_slot else names[0]


def _status_reason(answer: Answer) -> str:
    if answer.status == 401:
        return "refused the credentials (401): is the snippet generated for this secret?"
    shown = answer.text[:200] if answer.text.isprintable() else "(unprintable)"
    return f"answered {answer.status}: {shown}"


def _sticky_errors(sticky: object) -> list[dict[str, str]]:
    if sticky is None:
        return []
    shape = 'must be {"header": NAME} or {"cookie": NAME}'
    if not isinstance(sticky, dict) or len(sticky) != 1:
        return [{"field": "router.sticky", "message": shape}]
    ((kind, name),) = sticky.items()
    if kind not in STICKY_NAME:
        return [{"field": "router.sticky", "message": shape}]
    if not isinstance(name, str) or not re.fullmatch(STICKY_NAME[kind], name):
        return [{"field": f"router.sticky.{kind}", "message": f"must match {STICKY_NAME[kind]}"}]
    return []


def lua_source() -> str:
    """The Lua module shipped with the package."""
    return (resources.files("opsapi.routers") / "lua" / "opsapi_nginx_lua.lua").read_text("utf-8")


def _lua_string(text: str) -> str:
    # Every byte but a few plain ones as a decimal escape: nothing can end the string.
    plain = set(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._-")
    return '"' + "".join(chr(b) if b in plain else f"\\{b}" for b in text.encode()) + '"'


def render_config(
    router: str, admin: str, state_file: Path, verifier_hex: str, upstreams: Sequence[str]
) -> str:
    """The `http {}` snippet (see the module doc); holds the verifier, never the secret."""
    dict_name = f"opsapi_{router.replace('-', '_')}"
    module = "\n".join(
        f"    {line}" if line else "" for line in lua_source().rstrip("\n").splitlines()
    )
    options = (
        f"{{router = {_lua_string(router)}, dict = {_lua_string(dict_name)}, "
        f"state_file = {_lua_string(str(state_file))}, verifier = {_lua_string(verifier_hex)}}}"
    )
    blocks = [
        f"# opsapi nginx-lua router {router!r}: generated by `opsapi nginx-config`; regenerate "
        "rather than edit.\n"
        "# Include inside http { }. The main configuration loads the Lua module (Debian's\n"
        "# libnginx-mod-http-lua does it in /etc/nginx/modules-enabled/), otherwise:\n"
        "#   load_module modules/ndk_http_module.so;\n"
        "#   load_module modules/ngx_http_lua_module.so;\n",
        f"lua_shared_dict {dict_name} 1m;\n",
        "init_by_lua_block {\n"
        "    opsapi_nginx_lua = (function()\n"
        f"{module}\n"
        "    end)()\n"
        f"    opsapi_nginx_lua.init({options})\n"
        "}\n",
        "init_worker_by_lua_block {\n    opsapi_nginx_lua.init_worker()\n}\n",
        "# The admin location: loopback or a unix socket only, never the public listener.\n"
        "server {\n"
        f"    listen {admin};\n"
        "    server_name opsapi-admin;\n"
        "    access_log off;  # requests carry the bearer secret\n"
        "    client_max_body_size 8k;\n"
        "    client_body_buffer_size 8k;\n"
        "    location /opsapi/ {\n"
        "        content_by_lua_block { opsapi_nginx_lua.admin() }\n"
        "    }\n"
        "    location / {\n"
        "        return 404;\n"
        "    }\n"
        "}\n",
    ]
    for upstream in upstreams:
        blocks.append(
            f"# proxy_pass http://{upstream}; (with proxy_http_version 1.1 and\n"
            '# proxy_set_header Connection ""; to keep connections to the slots open)\n'
            f"upstream {upstream} {{\n"
            "    server 0.0.0.1:1;  # placeholder: the balancer sets every request's address\n"
            f"    balancer_by_lua_block {{ opsapi_nginx_lua.balance({_lua_string(upstream)}) }}\n"
            "    keepalive 32;\n"
            "}\n"
        )
    return "\n".join(blocks)


def nginx_config(
    routers_file: Path | None, router: str, upstreams: Sequence[str], admin: str | None = None
) -> str:
    """`opsapi nginx-config`: the snippet for router `router` of the routers file; ValueError
    with a message to show when it cannot be made."""
    # Imported here: the instances module builds routers of this one.
    from opsapi.routers.instances import load_routers

    if routers_file is None:
        raise ValueError("OPSAPI_ROUTERS_FILE is not set")
    found = load_routers(routers_file).get(router)
    if not isinstance(found, NginxLuaRouter):
        raise ValueError(f"router {router!r} is not an nginx-lua instance of {routers_file}")
    return found.nginx_config(upstreams, admin)
