"""nginx router: one weighted `upstream` file per service, written atomically, tested, reloaded
and confirmed live through a probe before `apply` returns.

What the main nginx configuration must contain
----------------------------------------------
Inside `http { }`, an include of the instance's `upstreams_dir`::

    include /etc/nginx/opsapi/*.conf;

and the service's traffic proxied to the upstream named in its policy (`proxy_pass
http://checkout;`). Until a service's first apply that upstream does not exist, so either apply
once before adding such a `proxy_pass`, or name the upstream through a variable, which nginx
looks up among the defined upstreams at request time (502 until it exists)::

    set $checkout_upstream checkout;
    proxy_pass http://$checkout_upstream;

The main configuration must also set `pid` (`nginx -s reload` finds the master through it) and the
process running opsapi must be allowed to signal that master. Recommended: a default server on
the instance's `probe` address so that a probe for a service without a file gets a 404 rather
than another service's probe answer::

    server { listen 127.0.0.1:8099 default_server; return 404; }

Nothing else: the probe server for each service comes from its generated file.

A service's policy names the upstream and two *slots*, each a server address (`{"upstream":
"checkout", "slots": {"blue": "10.0.0.1:8080", "green": "10.0.0.2:8080"}}`). The slot running
the canary gets the percentage, the other slot the rest; the next release runs its canary in the
other slot. The generated file `<upstreams_dir>/<service>.conf` (canary v3 in blue at 25 %)::

    # Managed by opsapi (router "edge", service "checkout"): the next apply replaces it.
    upstream checkout {
        # slot blue: v3 (canary)
        server 10.0.0.1:8080 weight=25;
        # slot green: v2 (stable)
        server 10.0.0.2:8080 weight=75;
    }
    server {
        listen 127.0.0.1:8099;
        server_name checkout.opsapi-probe;
        ...
        location = /opsapi/generation {
            return 200 "opsapi service=checkout generation=1732270000 weights=blue:25,green:75\\n";
        }
    }

At 0 % the canary slot's server is marked `down`, at 100 % the other one (nginx weights are ≥ 1).
After a success both slot roles name the new stable's slot; the other slot's comment says `idle`.

Confirmation. `nginx -s reload` only signals the master, which starts new workers, sleeps
100 ms, and only then tells the old workers to stop accepting: for ~100 ms after the new
generation first answers, new connections may still land on an old worker with the old weights.
So `apply` polls the probe over fresh connections and returns only when every probe has shown the
new generation for `settle` seconds (default 0.3 s); otherwise it restores the previous file and
raises RouterError.

Commands run as `<binary> -p <prefix> -c <conf> -e stderr -t` (then `-s reload`); `-e` needs
nginx 1.19.5 or later. Several opsapi processes may share one nginx: applies are serialised by
an `flock` on `<upstreams_dir>/.opsapi.lock` (and an asyncio lock within the process).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import os
import re
import shutil
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from opsapi.canary.policy import VERSION, is_service_name
from opsapi.routers.base import (
    RouterError,
    RouteTarget,
    check_slots,
    slot_names,
    slot_weights,
    unknown_parameters,
)

T = TypeVar("T")
HOST_PORT = re.compile(r"^[A-Za-z0-9.-]+:\d{1,5}$")
IPV6_PORT = re.compile(r"^\[([0-9A-Fa-f:.]+)\]:(\d{1,5})$")
UPSTREAM_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
PARAMS = ("upstream", "slots")
TURN_ONE_PARAMS = ("stable", "canary")
KIND = "an nginx router"
MAX_ADDRESS = 261  # a 255-character host name, ':' and a port
PROBE_PATH = "/opsapi/generation"
# `weights=` since slots; turn-1 files answered `canary=<percent>` (read as "cannot tell").
_PROBE_ANSWER = re.compile(
    r"^opsapi service=(\S+) generation=(\d+) (?:weights=((?:[a-z0-9_-]+:\d+,?)+)|canary=\d+)$"
)
_VERSION = re.compile(VERSION)
_SERVER_LINE = re.compile(r"^\s*server\s+(\S+)((?:\s+[^;\s]+)*)\s*;", re.MULTILINE)
_NGINX_LOG_PREFIX = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (\[\w+\]) \d+#\d+: ")
# The probe speaks plain HTTP to the configured address: no TLS is ever negotiated. Left to
# itself, httpx loads the CA bundle into a new TLS context for every client it builds: 64 ms
# of CPU with the event loop blocked, and a confirmation probes about eight times. This one is
# built once and trusts nothing, so a TLS use would fail rather than pass unverified.
_NO_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def split_host_port(value: str) -> tuple[str, int] | None:
    """`(host, port)` for a strict `host:port` or `[ipv6]:port`, else None."""
    if HOST_PORT.fullmatch(value):
        host, _, port = value.rpartition(":")
        if host.startswith(("-", ".")) or host.endswith("-") or ".." in host:
            return None
    elif match := IPV6_PORT.fullmatch(value):
        host, port = match.group(1), match.group(2)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
    else:
        return None
    if not 1 <= int(port) <= 65535:
        return None
    return host, int(port)


def address_key(value: str) -> tuple[str, int] | None:
    """A server address as nginx would compare it (host case and IPv6 spelling ignored)."""
    address = split_host_port(value)
    if address is None:
        return None
    host, port = address
    if ":" in host:
        host = ipaddress.IPv6Address(host).compressed
    return host.lower(), port


def _address_error(value: object) -> str | None:
    if not isinstance(value, str):
        return "must be a string"
    if len(value) > MAX_ADDRESS or split_host_port(value) is None:
        return "must be host:port or [ipv6]:port"
    return None


@dataclass(frozen=True)
class NginxParams:
    """A service's parameters for an nginx router, validated: the upstream and each slot's
    server address, in the order the policy names the slots."""

    upstream: str
    slots: dict[str, str]


@dataclass(frozen=True)
class ProbeAnswer:
    """What the probe server of a service says is live (`weights` None for a turn-1 file)."""

    service: str
    generation: int
    weights: dict[str, int] | None


def slot_labels(target: RouteTarget) -> dict[str, str]:
    """Per slot, what its comment line in the file says: the version it serves and its role."""
    labels = {}
    for name in slot_names(target.params):
        if name == target.canary_slot == target.stable_slot:
            # After a success the canary's slot is the stable one, serving the canary version.
            version, role = target.canary_version or target.stable_version, "stable"
        elif name == target.canary_slot:
            version, role = target.canary_version, "canary"
        elif name == target.stable_slot:
            version, role = target.stable_version, "stable"
        else:
            labels[name] = "idle"
            continue
        # Versions are validated by the API; checked again because this text goes into nginx.
        shown = version if version is not None and _VERSION.fullmatch(version) else None
        labels[name] = f"{shown or 'unknown version'} ({role})"
    return labels


def render(
    router: str,
    service: str,
    params: NginxParams,
    weights: dict[str, int],
    generation: int,
    probe: str,
    labels: dict[str, str] | None = None,
) -> str:
    """The upstream file realising per-slot percentages (`slot_weights`), with its probe server.

    A slot at 0 % is marked `down` (nginx weights are ≥ 1); `labels` are the slots' comments."""
    servers = []
    for name, address in params.slots.items():
        share = weights[name]
        servers.append(
            f"    # slot {name}: {(labels or {}).get(name, 'unknown version')}\n"
            f"    server {address} {'down' if share == 0 else f'weight={share}'};\n"
        )
    shares = ",".join(f"{name}:{weights[name]}" for name in params.slots)
    answer = f"opsapi service={service} generation={generation} weights={shares}"
    return (
        f'# Managed by opsapi (router "{router}", service "{service}"): the next apply replaces'
        " it.\n"
        f"upstream {params.upstream} {{\n"
        f"{''.join(servers)}"
        "}\n"
        "\n"
        "# Answers with this file's generation: opsapi polls it to confirm a reload is live.\n"
        "server {\n"
        f"    listen {probe};\n"
        f"    server_name {service}.opsapi-probe;\n"
        "    access_log off;\n"
        "    default_type text/plain;\n"
        f"    location = {PROBE_PATH} {{\n"
        f'        return 200 "{answer}\\n";\n'
        "    }\n"
        "    location / {\n"
        "        return 404;\n"
        "    }\n"
        "}\n"
    )


def file_percent(content: str, params: NginxParams, slot: str) -> int | None:
    """The percentage the `upstream` block of a file sends to `slot`'s server (found by its
    address), whoever wrote the file; None when the block is missing or sends nothing."""
    block = re.search(
        r"^\s*upstream\s+" + re.escape(params.upstream) + r"\s*\{(.*?)\}", content, re.S | re.M
    )
    if block is None:
        return None
    weights: dict[tuple[str, int] | str, int] = {}
    for match in _SERVER_LINE.finditer(block.group(1)):
        options = match.group(2).split()
        weight = 1
        for option in options:
            if option.startswith("weight="):
                weight = int(option[7:]) if option[7:].isdigit() else 1
        # A `down` or `backup` server takes no share of normal traffic.
        if "down" in options or "backup" in options:
            weight = 0
        key = address_key(match.group(1)) or match.group(1).lower()
        weights[key] = weights.get(key, 0) + weight
    total = sum(weights.values())
    if total == 0:
        return None
    return round(100 * weights.get(address_key(params.slots[slot]) or "", 0) / total)


def file_generation(content: str) -> int | None:
    """The generation a file's probe answers with, if it is one of ours."""
    match = re.search(r"opsapi service=\S+ generation=(\d+) (?:weights|canary)=", content)
    return int(match.group(1)) if match else None


def trim_output(output: bytes, limit: int = 600) -> str:
    """nginx's diagnostics, one line each, without timestamps and pids, bounded."""
    lines = []
    for raw in output.decode("utf-8", "replace").splitlines():
        line = _NGINX_LOG_PREFIX.sub(r"\1 ", raw.strip())
        if not line or line.endswith(("syntax is ok", "test is successful")):
            continue
        if "signal process started" in line:
            continue
        lines.append(line)
    text = " | ".join(lines) or "no output"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _atomic_write(path: Path, data: bytes) -> None:
    # A temp file in the same directory (named so that `*.conf` never matches it), fsynced and
    # renamed: nginx, and anyone running `nginx -t`, sees the old file or the new one, never half.
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    _fsync_dir(path.parent)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class NginxRouter:
    """Splits a service's traffic with weights in an nginx `upstream` (see the module doc)."""

    def __init__(
        self,
        name: str,
        conf: Path,
        prefix: Path,
        upstreams_dir: Path,
        binary: str = "nginx",
        *,
        probe: str,
        command_timeout: float = 10.0,
        confirm_timeout: float = 10.0,
        settle: float = 0.3,
    ) -> None:
        if split_host_port(probe) is None:
            raise ValueError("probe must be host:port or [ipv6]:port")
        self.name = name
        self.conf = Path(conf)
        self.prefix = Path(prefix)
        self.upstreams_dir = Path(upstreams_dir)
        self.binary = binary
        self.probe = probe
        self.command_timeout = command_timeout
        self.confirm_timeout = confirm_timeout
        self.settle = settle
        self._lock = asyncio.Lock()
        self._last_generation = 0

    def __repr__(self) -> str:
        return (
            f"NginxRouter(name={self.name!r}, conf={str(self.conf)!r}, "
            f"upstreams_dir={str(self.upstreams_dir)!r}, probe={self.probe!r})"
        )

    def check_params(self, params: dict[str, Any]) -> list[dict[str, str]]:
        """Field errors for `{"upstream", "slots": {name: "host:port", name: "host:port"}}`;
        these strings are written into nginx, so nothing loose passes."""
        errors = unknown_parameters(params, PARAMS, KIND, TURN_ONE_PARAMS)
        upstream = params.get("upstream")
        if upstream is None:
            errors.append({"field": "router.upstream", "message": "required"})
        elif not isinstance(upstream, str):
            errors.append({"field": "router.upstream", "message": "must be a string"})
        elif not UPSTREAM_NAME.fullmatch(upstream):
            errors.append(
                {"field": "router.upstream", "message": "must match ^[A-Za-z0-9_-]{1,64}$"}
            )
        slot_errors = check_slots(params, KIND, _address_error)
        if not slot_errors:
            (first, one), (second, other) = params["slots"].items()
            if address_key(one) == address_key(other):
                slot_errors.append(
                    {"field": f"router.slots.{second}", "message": f"same address as slot {first}"}
                )
        return errors + slot_errors

    async def apply(self, target: RouteTarget, weight: int) -> None:
        """Write `weight` % for the canary slot's server and the rest for the other slot's, test,
        reload, and confirm through the probe; restore the old file on failure."""
        params = self._params(target)
        weights = slot_weights(target, weight)
        labels = slot_labels(target)
        path = self._path(target.service)
        async with self._lock, self._dir_lock():
            generation = self._next_generation()
            content = render(
                self.name, target.service, params, weights, generation, self.probe, labels
            )
            previous = await self._io(_read, path)
            await self._io(_atomic_write, path, content.encode())
            try:
                await self._nginx("-t", what="configuration test")
                await self._nginx("-s", "reload", what="reload")
            except BaseException:
                # The running nginx never loaded the new file: put the old one back untouched
                # (also when cancelled, so that no untested file is left for the next reload).
                await asyncio.shield(self._restore(path, previous))
                raise
            # Cancelled from here on, the new file stays: nginx already runs it or is loading it.
            try:
                await self._confirm(target.service, generation)
            except RouterError:
                await self._restore(path, previous)
                with contextlib.suppress(RouterError):
                    await self._nginx("-s", "reload", what="reload")
                raise

    async def read_back(self, target: RouteTarget) -> int | None:
        """The canary slot's live percentage: the file's weights when the probe shows that file
        is live, else what the live probe says; None when this service was never applied."""
        params = self._params(target)
        slot_weights(target, 0)  # refuses a canary slot that is not one of the two
        content = await self._io(_read, self._path(target.service))
        live = await self._probe(target.service)
        if live is None:
            return None
        if content is None or live.generation != file_generation(
            text := content.decode("utf-8", "replace")
        ):
            # The file on disk is not what nginx runs (removed, or written without a reload).
            return None if live.weights is None else live.weights.get(target.canary_slot)
        # Weights read from the file itself, so a hand edit plus reload shows up as drift.
        return file_percent(text, params, target.canary_slot)

    async def health(self) -> str:
        """The binary is there and the probe address answers."""
        self._command("-v")  # raises RouterError when the binary is missing
        await self._probe("opsapi-health")
        return f"nginx probe {self.probe} answers"

    def _params(self, target: RouteTarget) -> NginxParams:
        if not is_service_name(target.service):
            raise RouterError(f"nginx router {self.name!r}: invalid service name")
        errors = self.check_params(target.params)
        if errors:
            detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
            raise RouterError(f"nginx router {self.name!r}: invalid parameters ({detail})")
        return NginxParams(upstream=target.params["upstream"], slots=dict(target.params["slots"]))

    def _path(self, service: str) -> Path:
        return self.upstreams_dir / f"{service}.conf"

    def _next_generation(self) -> int:
        # Microseconds since the epoch: unique per apply, and larger than any earlier one even
        # across processes sharing this nginx (clocks permitting; only equality is relied on).
        self._last_generation = max(time.time_ns() // 1000, self._last_generation + 1)
        return self._last_generation

    async def _io(self, function: Callable[..., T], *args: object) -> T:
        try:
            return await asyncio.to_thread(function, *args)
        except OSError as error:
            raise RouterError(
                f"nginx router {self.name!r}: {error.strerror or error} "
                f"({error.filename or self.upstreams_dir})"
            ) from None

    async def _restore(self, path: Path, previous: bytes | None) -> None:
        if previous is None:
            await self._io(_remove, path)
        else:
            await self._io(_atomic_write, path, previous)

    @contextlib.asynccontextmanager
    async def _dir_lock(self) -> AsyncIterator[None]:
        lock_path = self.upstreams_dir / ".opsapi.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise RouterError(
                f"nginx router {self.name!r}: cannot open {lock_path}: {error.strerror}"
            ) from None
        try:
            deadline = time.monotonic() + self.command_timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise RouterError(
                            f"nginx router {self.name!r}: another apply holds {lock_path}"
                        ) from None
                    await asyncio.sleep(0.05)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _command(self, *args: str) -> list[str]:
        binary = shutil.which(self.binary)
        if binary is None:
            raise RouterError(f"nginx router {self.name!r}: nginx binary {self.binary!r} not found")
        # `-e stderr`: diagnostics come back to us instead of the compiled-in error log path.
        return [binary, "-p", str(self.prefix), "-c", str(self.conf), "-e", "stderr", *args]

    async def _nginx(self, *args: str, what: str) -> None:
        command = self._command(*args)
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
        except OSError as error:
            raise RouterError(
                f"nginx router {self.name!r}: cannot run {self.binary!r}: {error.strerror}"
            ) from None
        try:
            output, _ = await asyncio.wait_for(process.communicate(), self.command_timeout)
        except TimeoutError:
            raise RouterError(
                f"nginx router {self.name!r}: {what} took longer than {self.command_timeout:g}s"
            ) from None
        finally:
            if process.returncode is None:  # timed out or cancelled: leave no child behind
                process.kill()
                await asyncio.shield(process.wait())
        if process.returncode != 0:
            raise RouterError(f"nginx router {self.name!r}: {what} failed: {trim_output(output)}")

    async def _probe(
        self, service: str, client: httpx.AsyncClient | None = None
    ) -> ProbeAnswer | None:
        """The probe's answer for `service` (through `client` when given: one per
        confirmation); None when nginx answers but not for this service."""
        if client is None:
            async with _probe_client() as own:
                return await self._probe(service, own)
        host, port = split_host_port(self.probe) or ("", 0)
        host = f"[{host}]" if ":" in host else host
        url = f"http://{host}:{port}{PROBE_PATH}"
        try:
            response = await client.get(url, headers={"Host": f"{service}.opsapi-probe"})
        except httpx.HTTPError as error:
            raise RouterError(
                f"nginx router {self.name!r}: probe {self.probe} unreachable "
                f"({error.__class__.__name__})"
            ) from None
        match = _PROBE_ANSWER.fullmatch(response.text.strip())
        if response.status_code != 200 or match is None or match.group(1) != service:
            return None
        weights = None
        if match.group(3) is not None:
            pairs = (pair.partition(":") for pair in match.group(3).split(",") if pair)
            weights = {name: int(share) for name, _, share in pairs}
        return ProbeAnswer(match.group(1), int(match.group(2)), weights)

    async def _confirm(self, service: str, generation: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.confirm_timeout
        since: float | None = None  # when the unbroken run of new-generation answers began
        seen = "no answer for this service"
        async with _probe_client() as client:
            while True:
                now = loop.time()
                try:
                    answer = await self._probe(service, client)
                except RouterError as error:
                    answer, seen = None, str(error)
                if answer is not None and answer.generation == generation:
                    since = now if since is None else since
                    if now - since >= self.settle:
                        return
                else:
                    since = None
                    if answer is not None:
                        seen = f"generation {answer.generation}"
                if now > deadline:
                    raise RouterError(
                        f"nginx router {self.name!r}: reload not confirmed within "
                        f"{self.confirm_timeout:g}s (probe {self.probe} for {service!r}: "
                        f"{seen}; is {self.upstreams_dir}/*.conf included in the http block?)"
                    )
                await asyncio.sleep(0.02)


def _probe_client() -> httpx.AsyncClient:
    """A client for probes: a fresh connection per request (no keep-alive, no proxy from the
    environment), since a kept-alive connection would stay on an old worker and see the old
    generation."""
    return httpx.AsyncClient(
        timeout=1.0,
        trust_env=False,
        verify=_NO_TLS,
        limits=httpx.Limits(max_keepalive_connections=0),
    )
