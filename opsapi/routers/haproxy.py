"""HAProxy router: `set weight` over the runtime API (no reload), confirmed with `get weight`.

The instance's `socket` is a `stats socket … level admin` of the HAProxy: a unix socket path
(absolute) or a TCP `host:port`. Each command goes over its own connection (non-interactive mode:
HAProxy answers and closes). A service's policy names the backend and its two servers.

HAProxy's weight semantics, and what this router does about them:

- `set weight <backend>/<server> <w>` takes an absolute 0-256 (the router writes
  `100 - percent` and `percent`: 25 % is stable 75, canary 25; 0 % is 100/0). A `<w>%` form
  exists but is relative to the server's *initial* weight from the configuration, so on a server
  declared `weight 0` every percentage silently sets 0: the router never uses it.
- `get weight` prints `"<current> (initial <initial>)"`; the current one is what `set weight`
  set (the user weight), not the effective weight that `slowstart` ramps up.
- The backend must use a dynamic algorithm (`roundrobin`, `leastconn`, `random`); with
  `static-rr`, `first` or a non-consistent hash HAProxy accepts only 0 and 100 %, and says so.
- Runtime weights are lost when HAProxy restarts or reloads (unless a `server-state-file` is
  loaded): weights go back to the configuration's, which `read_back` reports as drift.
- Weight 0 stops new load-balanced traffic only: clients pinned by a persistence cookie or
  stick table still reach a weight-0 server until their sessions end.

The two `set weight`s are not atomic: the server whose weight grows is set first, so the transient
split lies between the old and the new one and the backend never has both servers at weight 0.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any

from opsapi.canary.policy import is_service_name
from opsapi.routers.base import RouterError, RouteTarget
from opsapi.routers.nginx import check_weight, split_host_port

# HAProxy proxy and server names: letters, digits, '-', '_', '.', ':' (nothing that could end or
# split a runtime API command: no space, ';', '/', newline).
HAPROXY_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
PARAMS = ("backend", "stable_server", "canary_server")
_GET_WEIGHT = re.compile(r"^(\d+) \(initial (\d+)\)$")
_MAX_ANSWER = 64 * 1024


@dataclass(frozen=True)
class HaproxyParams:
    """A service's parameters for a HAProxy router, validated."""

    backend: str
    stable_server: str
    canary_server: str


def parse_socket(socket: str) -> tuple[str, int] | str:
    """`(host, port)` for a TCP address, the path for a unix socket; ValueError otherwise."""
    if socket.startswith("/"):
        return socket
    address = split_host_port(socket)
    if address is None:
        raise ValueError("socket must be an absolute unix socket path or host:port")
    return address


class HaproxyRouter:
    """Splits a service's traffic by setting two servers' weights over HAProxy's runtime API."""

    def __init__(self, name: str, socket: str, *, timeout: float = 3.0) -> None:
        self.name = name
        self.socket = socket
        self.timeout = timeout
        self._address = parse_socket(socket)

    def __repr__(self) -> str:
        return f"HaproxyRouter(name={self.name!r}, socket={self.socket!r})"

    def check_params(self, params: dict[str, Any]) -> list[dict[str, str]]:
        """Field errors for `{"backend", "stable_server", "canary_server"}`."""
        errors = [
            {"field": f"router.{key}", "message": "unknown parameter for a haproxy router"}
            for key in sorted(set(params) - set(PARAMS), key=str)
        ]
        for key in PARAMS:
            value = params.get(key)
            if value is None:
                errors.append({"field": f"router.{key}", "message": "required"})
            elif not isinstance(value, str) or not HAPROXY_NAME.fullmatch(value):
                errors.append(
                    {"field": f"router.{key}", "message": "must match ^[A-Za-z0-9_.:-]{1,64}$"}
                )
        stable, canary = params.get("stable_server"), params.get("canary_server")
        if stable is not None and stable == canary:
            errors.append({"field": "router.canary_server", "message": "must differ from stable"})
        return errors

    async def apply(self, target: RouteTarget, weight: int) -> None:
        """Set both servers' weights, growing one first; confirm both with `get weight`."""
        params = self._params(target)
        check_weight(weight)
        wanted = {params.stable_server: 100 - weight, params.canary_server: weight}
        current = await self._weights(params)
        order = sorted(wanted, key=lambda server: wanted[server] <= current[server])
        for server in order:
            answer = await self._command(f"set weight {params.backend}/{server} {wanted[server]}")
            if answer:
                raise RouterError(
                    f"haproxy router {self.name!r}: set weight {params.backend}/{server}: {answer}"
                )
        live = await self._weights(params)
        if live != wanted:
            raise RouterError(
                f"haproxy router {self.name!r}: weights not confirmed: wanted {wanted}, "
                f"HAProxy reports {live}"
            )

    async def read_back(self, target: RouteTarget) -> int | None:
        """The canary's share of the two servers' current weights; None when both are 0."""
        params = self._params(target)
        weights = await self._weights(params)
        stable, canary = weights[params.stable_server], weights[params.canary_server]
        if stable + canary == 0:
            return None
        return round(100 * canary / (stable + canary))

    async def health(self) -> str:
        """The runtime API answers `show info`: its version and uptime."""
        info = await self._command("show info")
        fields = dict(line.split(": ", 1) for line in info.splitlines() if ": " in line)
        return f"HAProxy {fields.get('Version', '?')} up {fields.get('Uptime', '?')}"

    def _params(self, target: RouteTarget) -> HaproxyParams:
        if not is_service_name(target.service):
            raise RouterError(f"haproxy router {self.name!r}: invalid service name")
        errors = self.check_params(target.params)
        if errors:
            detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
            raise RouterError(f"haproxy router {self.name!r}: invalid parameters ({detail})")
        return HaproxyParams(
            target.params["backend"], target.params["stable_server"], target.params["canary_server"]
        )

    async def _weights(self, params: HaproxyParams) -> dict[str, int]:
        weights = {}
        for server in (params.stable_server, params.canary_server):
            answer = await self._command(f"get weight {params.backend}/{server}")
            match = _GET_WEIGHT.fullmatch(answer)
            if match is None:
                raise RouterError(
                    f"haproxy router {self.name!r}: get weight {params.backend}/{server}: "
                    f"{answer or 'empty answer'}"
                )
            weights[server] = int(match.group(1))
        return weights

    async def _command(self, command: str) -> str:
        """One runtime API command on its own connection; its answer, stripped."""
        try:
            async with asyncio.timeout(self.timeout):
                if isinstance(self._address, str):
                    reader, writer = await asyncio.open_unix_connection(self._address)
                else:
                    reader, writer = await asyncio.open_connection(*self._address)
                try:
                    writer.write(command.encode() + b"\n")
                    await writer.drain()
                    # Non-interactive mode: HAProxy closes the connection after its answer.
                    answer = await reader.read(_MAX_ANSWER)
                    while answer and (chunk := await reader.read(_MAX_ANSWER)):
                        answer += chunk
                        if len(answer) > _MAX_ANSWER:
                            break
                finally:
                    writer.close()
        except TimeoutError:
            raise RouterError(
                f"haproxy router {self.name!r}: no answer from {self.socket} within "
                f"{self.timeout:g}s"
            ) from None
        except OSError as error:
            raise RouterError(
                f"haproxy router {self.name!r}: cannot reach {self.socket}: "
                f"{error.strerror or error.__class__.__name__}"
            ) from None
        except Exception as error:  # the protocol promises RouterError and nothing else
            raise RouterError(
                f"haproxy router {self.name!r}: runtime API failed ({error.__class__.__name__})"
            ) from None
        return answer.decode("utf-8", "replace").strip()
