"""Who is really calling: the client address behind trusted proxies, and the CIDR allowlist."""

from __future__ import annotations

import ipaddress
from functools import cache

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@cache
def networks(spec: str) -> tuple[Network, ...]:
    """Parse a comma-separated CIDR list ("10.0.0.0/8, 192.0.2.7"); ValueError on bad input."""
    return tuple(
        ipaddress.ip_network(part.strip(), strict=False) for part in spec.split(",") if part.strip()
    )


def _within(address: str, allowed: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in allowed)


def forwarded_address(hop: str) -> str | None:
    """The IP address in one X-Forwarded-For entry, as proxies write it ("203.0.113.5",
    "203.0.113.5:4711", "2001:db8::7", "[2001:db8::7]:443"), normalised; None for anything
    else (names, "unknown", garbage, IPv6 zone ids)."""
    hop = hop.strip()
    if len(hop) > 64:  # the longest form, "[IPv6]:port", is 47 characters
        return None
    host = hop
    if hop.startswith("["):
        host, bracket, rest = hop[1:].partition("]")
        if not bracket or ":" not in host:  # brackets are for IPv6 only
            return None
        if rest and not (rest.startswith(":") and _is_port(rest[1:])):
            return None
    elif hop.count(":") == 1:
        host, _, port = hop.partition(":")
        if not _is_port(port):
            return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        return None
    return str(address)


def _is_port(digits: str) -> bool:
    return 0 < len(digits) <= 5 and digits.isascii() and digits.isdigit() and int(digits) <= 65535


def client_address(
    peer: str | None, forwarded_for: str | None, trusted: tuple[Network, ...]
) -> str | None:
    """The caller's address: the peer, unless the peer is a trusted proxy — then the
    right-most X-Forwarded-For entry that is not itself a trusted proxy. An entry that is not
    an IP address means the chain cannot be read: the peer's address stands."""
    if peer is None or not trusted or not _within(peer, trusted) or not forwarded_for:
        return peer
    hops = [hop for hop in forwarded_for.split(",") if hop.strip()]
    address: str | None = None
    for hop in reversed(hops):
        address = forwarded_address(hop)
        if address is None:
            return peer
        if not _within(address, trusted):
            return address
    # Every hop is a trusted proxy: the left-most one is the closest we know to the client.
    return address or peer


def is_allowed(address: str | None, allowed: tuple[Network, ...]) -> bool:
    """Whether `address` may call the API (no allowlist configured: everyone may)."""
    if not allowed:
        return True
    return address is not None and _within(address, allowed)
