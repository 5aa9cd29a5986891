"""Client addresses behind trusted proxies, and the optional CIDR allowlist."""

from __future__ import annotations

from pathlib import Path

import pytest

from opsapi.http.clients import client_address, is_allowed, networks
from tests.support.app import running_app

PROXIES = networks("10.0.0.0/8, 192.0.2.1")


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("203.0.113.9", None, "203.0.113.9"),  # direct
        ("203.0.113.9", "198.51.100.1", "203.0.113.9"),  # an untrusted peer cannot claim another
        ("10.1.1.1", "198.51.100.1", "198.51.100.1"),  # through a trusted proxy
        ("10.1.1.1", "198.51.100.1, 10.2.2.2", "198.51.100.1"),  # through two trusted proxies
        ("10.1.1.1", "6.6.6.6, 198.51.100.1", "198.51.100.1"),  # spoofed left part ignored
        ("10.1.1.1", "garbage", "10.1.1.1"),  # not an address: the proxy's own stands
    ],
)
def test_client_address(peer: str, forwarded: str | None, expected: str) -> None:
    assert client_address(peer, forwarded, PROXIES) == expected


@pytest.mark.parametrize(
    ("address", "allowed", "expected"),
    [
        ("10.1.2.3", "", True),
        ("10.1.2.3", "10.0.0.0/8", True),
        ("11.1.2.3", "10.0.0.0/8", False),
        ("2001:db8::1", "2001:db8::/32", True),
        ("garbage", "10.0.0.0/8", False),
        (None, "10.0.0.0/8", False),
    ],
)
def test_allowlist(address: str | None, allowed: str, expected: bool) -> None:
    assert is_allowed(address, networks(allowed)) is expected


async def test_a_client_outside_the_allowlist_is_refused_and_audited(
    pg_url: str, key_file: Path
) -> None:
    # the test client connects from 198.51.100.7
    async with running_app(pg_url, key_file, allowed_cidrs="10.0.0.0/8") as api:
        refused = await api.get("/canary")
        assert refused.status_code == 403
        [event] = await api.audit_events()
        assert event.outcome == "denied"
        assert event.client_address == "198.51.100.7"
        assert "not allowed" in event.details["detail"]


async def test_a_trusted_proxy_forwards_the_real_client(pg_url: str, key_file: Path) -> None:
    async with running_app(
        pg_url, key_file, allowed_cidrs="10.0.0.0/8", trusted_proxies="198.51.100.0/24"
    ) as api:
        headers = {**api.auth("viewer"), "X-Forwarded-For": "10.9.8.7"}
        allowed = await api.client.get("/internal/ops/canary", headers=headers)
        assert allowed.status_code == 200
        [event] = await api.audit_events()
        assert event.client_address == "10.9.8.7"


def test_bad_cidrs_are_refused_at_start() -> None:
    from opsapi.config import Settings

    with pytest.raises(ValueError, match="OPSAPI_ALLOWED_CIDRS"):
        Settings(allowed_cidrs="10.0.0.0/33")
