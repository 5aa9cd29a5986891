"""Stored first responses are forgotten after their TTL, not before."""

from __future__ import annotations

from tests.support.app import Harness


async def test_idempotency_keys_expire_after_their_ttl(api: Harness) -> None:
    body = {"service": "checkout", "version": "v2"}
    key = {"Idempotency-Key": "deploy-42"}
    first = await api.post("/canary/promote", body, **key)
    await api.post("/canary/rollback", {"service": "checkout", "reason": "x"})
    controller = api.app.state.controller

    # within the TTL a replay answers the first response
    api.clock.advance(hours=23)
    assert await controller.purge_idempotency_keys() == 0
    replay = await api.post("/canary/promote", body, **key)
    assert replay.headers.get("Idempotent-Replayed") == "true"
    assert replay.json()["id"] == first.json()["id"]

    # after it, the key is forgotten and the same request acts again
    api.clock.advance(hours=2)
    assert await controller.purge_idempotency_keys() == 1
    fresh = await api.post("/canary/promote", body, **key)
    assert fresh.status_code == 200
    assert "Idempotent-Replayed" not in fresh.headers
    assert fresh.json()["id"] != first.json()["id"]
