"""HAProxy router: `set weight` over the runtime API (no reload), confirmed with `get weight`.

The instance's `socket` is a `stats socket … level admin` of the HAProxy: a unix socket path
(absolute) or a TCP `host:port`. Each command goes over its own connection (non-interactive mode:
HAProxy answers and closes). A service's policy names the backend and two *slots*, each a server
of that backend (`{"backend": "checkout", "slots": {"blue": "srv_blue", "green": "srv_green"}}`):
the slot running the canary gets the percentage, the other slot the rest, and the next release
runs its canary in the other slot.

HAProxy's weight semantics, and what this router does about them:

- `set weight <backend>/<server> <w>` takes an absolute 0-256 (the router writes `percent` for
  the canary slot's server and `100 - percent` for the other: 25 % is 25 and 75; 0 % is 0 and
  100). A `<w>%` form
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
split lies between the old and the new one and the backend never has both servers at weight 0
(also when the canary moves to the other slot for the next release).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any

from opsapi.canary.policy import is_service_name
from opsapi.routers.base import (
    RouterError,
    RouteTarget,
    check_slots,
    slot_weights,
    unknown_parameters,
)
from opsapi.routers.nginx import split_host_port

# HAProxy proxy and server names: letters, digits, '-', '_', '.', ':' (nothing that could end or
# split a runtime API command: no space, ';', '/', newline).
HAPROXY_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
PARAMS = ("backend", "slots")
TURN_ONE_PARAMS = ("stable_server", "canary_server")
KIND = "a haproxy router"
_NAME_RULE = "^[A-Za-z0-9_.:-]{1,64}$"
_GET_WEIGHT = re.compile(r"^(\d+) \(initial (\d+)\)$")
_MAX_ANSWER = 64 * 1024


@dataclass(frozen=True)
class HaproxyParams:
    """A service's parameters for a HAProxy router, validated: the backend and each slot's
    server, in the order the policy names the slots."""

    backend: str
    slots: dict[str, str]


def _server_error(value: object) -> str | None:
    if not isinstance(value, str) or not HAPROXY_NAME.fullmatch(value):
        return f"must be a server name matching {_NAME_RULE}"
    return None


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
        """Field errors for `{"backend", "slots": {name: server, name: server}}`; these names go
        into runtime API commands, so nothing that could end or split one passes."""
        errors = unknown_parameters(params, PARAMS, KIND, TURN_ONE_PARAMS)
        backend = params.get("backend")
        if backend is None:
            errors.append({"field": "router.backend", "message": "required"})
        elif not isinstance(backend, str) or not HAPROXY_NAME.fullmatch(backend):
            errors.append({"field": "router.backend", "message": f"must match {_NAME_RULE}"})
        slot_errors = check_slots(params, KIND, _server_error)
        if not slot_errors:
            (first, one), (second, other) = params["slots"].items()
            if one == other:
                slot_errors.append(
                    {"field": f"router.slots.{second}", "message": f"same server as slot {first}"}
                )
        return errors + slot_errors

    async def apply(self, target: RouteTarget, weight: int) -> None:
        """Set both slots' servers' weights, growing one first; confirm both with `get weight`."""
        params = self._params(target)
        wanted = {params.slots[slot]: share for slot, share in slot_weights(target, weight).items()}
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
        """The canary slot's server's share of the two servers' current weights; None when both
        are 0."""
        params = self._params(target)
        slot_weights(target, 0)  # refuses a canary slot that is not one of the two
        weights = await self._weights(params)
        total = sum(weights.values())
        if total == 0:
            return None
        return round(100 * weights[params.slots[target.canary_slot]] / total)

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
        return HaproxyParams(target.params["backend"], dict(target.params["slots"]))

    async def _weights(self, params: HaproxyParams) -> dict[str, int]:
        weights = {}
        for server in params.slots.values():
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
