"""`GET /internal/ops/services` (what `opsctl services` shows), on the app and real PostgreSQL."""

from __future__ import annotations

import pytest

from tests.support.app import Harness

SLOTS_POLICY = {
    "router": {"name": "pull"},
    "steps": [{"weight": 50, "wait": "1m"}, {"weight": 100, "wait": "1m"}],
}


async def test_every_service_with_its_stable_version_and_latest_rollout(api: Harness) -> None:
    # given a configured service that never had a rollout, one released twice (v2 succeeded,
    # v3 open) and one whose only rollout was rolled back
    assert (await api.put("/services/billing", SLOTS_POLICY)).status_code == 200
    first = {"service": "checkout", "version": "v2", "stable_version": "v1", "target_percent": 100}
    assert (await api.post("/canary/promote", first, role="admin")).status_code == 200
    done = await api.post("/canary/promote", {"service": "checkout", "force": True}, role="admin")
    assert done.json()["state"] == "succeeded", done.text
    third = await api.post("/canary/promote", {"service": "checkout", "version": "v3"})
    assert third.status_code == 200, third.text
    await api.fetch_weight("checkout")  # a pull client has applied v3's 10 %
    assert (await api.post("/canary/promote", {"service": "auth", "version": "a2"})).is_success
    back = await api.post("/canary/rollback", {"service": "auth", "reason": "errors"})
    assert back.status_code == 200, back.text

    # when a viewer lists the services
    response = await api.get("/services")

    # then each appears once, by name, with its stable version and slot and its latest rollout
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["next_cursor"] is None
    by_name = {item["name"]: item for item in body["items"]}
    assert [item["name"] for item in body["items"]] == ["auth", "billing", "checkout"]
    assert by_name["billing"] == {
        "name": "billing", "configured": True, "router": "pull", "stable_version": None,
        "stable_slot": "blue", "latest_rollout": None,
    }  # fmt: skip
    checkout = by_name["checkout"]
    assert (checkout["stable_version"], checkout["stable_slot"]) == ("v2", "green")
    assert checkout["configured"] is False
    assert checkout["latest_rollout"] == {
        "id": third.json()["id"], "state": "progressing", "canary_version": "v3",
        "desired_weight": 10, "applied_weight": 10,
    }  # fmt: skip
    assert by_name["auth"]["latest_rollout"]["state"] == "rolled_back"
    assert by_name["auth"]["latest_rollout"]["desired_weight"] == 0


async def test_pages_follow_the_cursor(api: Harness) -> None:
    for name in ("a-svc", "b-svc", "c-svc"):
        assert (await api.put(f"/services/{name}", SLOTS_POLICY)).status_code == 200

    first = (await api.get("/services?limit=2")).json()
    second = (await api.get(f"/services?limit=2&cursor={first['next_cursor']}")).json()

    assert [item["name"] for item in first["items"]] == ["a-svc", "b-svc"]
    assert first["next_cursor"] == "b-svc"
    assert [item["name"] for item in second["items"]] == ["c-svc"]
    assert second["next_cursor"] is None


@pytest.mark.parametrize(
    "query",
    ["limit=0", "limit=1001", "limit=two", "cursor=Not_A_Name", "cursor=a&cursor=b", "cursor="],
)
async def test_bad_parameters_are_422_naming_them(api: Harness, query: str) -> None:
    response = await api.get(f"/services?{query}")

    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert query.split("=")[0] in response.json()["detail"]
