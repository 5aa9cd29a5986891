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


def client_address(
    peer: str | None, forwarded_for: str | None, trusted: tuple[Network, ...]
) -> str | None:
    """The caller's address: the peer, unless the peer is a trusted proxy — then the
    right-most X-Forwarded-For entry that is not itself a trusted proxy."""
    if peer is None or not trusted or not _within(peer, trusted) or not forwarded_for:
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _within(hop, trusted):
            return hop
    return hops[0] if hops else peer


def is_allowed(address: str | None, allowed: tuple[Network, ...]) -> bool:
    """Whether `address` may call the API (no allowlist configured: everyone may)."""
    if not allowed:
        return True
    return address is not None and _within(address, allowed)
