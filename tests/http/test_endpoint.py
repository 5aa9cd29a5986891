"""The request pipeline's small helpers, against what they stand in for."""

from __future__ import annotations

import gc
import uuid
from collections import Counter

import pytest
from starlette.requests import Request

from opsapi.http.endpoint import new_request_id, url_path
from tests.support.app import Harness

PATHS = [
    "/internal/ops/canary/promote",
    "/internal/ops/canary/web-1",
    "/internal/ops/canary/a?b#c",
    "/internal/ops/canary/back\\slash",
    "/internal/ops/canary/ünïcode",
    "/internal/ops/canary/%3F-already-escaped",
    "//double//slashes/",
    "/",
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("root_path", ["", "/internal/ops"])
def test_url_path_is_starlettes_url_path(path: str, root_path: str) -> None:
    # Idempotency keys stored earlier hash the path Starlette's `request.url.path` gave:
    # the shortcut must give exactly that, for odd paths too.
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "root_path": root_path,
        "query_string": b"x=1",
        "headers": [(b"host", b"ops.example:8080")],
        "server": ("127.0.0.1", 8080),
        "scheme": "http",
    }
    assert url_path(scope) == Request(scope).url.path


# Objects of one request that must be freed when it is answered (by reference counting), not
# left in reference cycles for the garbage collector: its collections of a busy server's
# leftovers paused every request for tens of milliseconds.
REQUEST_OBJECTS = ("Call", "Applied", "Transition", "RolloutRecord", "ServiceRecord",
                   "AsyncSession", "Session", "SessionTransaction")  # fmt: skip


async def test_writes_and_reads_leave_no_request_objects_to_the_garbage_collector(
    api: Harness,
) -> None:
    # given a service with an open rollout, and the collector holding what it finds
    assert (await api.post("/canary/promote", {"service": "web", "version": "v1"})).is_success
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        # when rollouts are rolled back and started again, and the status read
        for round_ in range(5):
            rollback = {"service": "web", "reason": "test"}
            assert (await api.post("/canary/rollback", rollback)).is_success
            start = {"service": "web", "version": f"v{round_ + 2}"}
            assert (await api.post("/canary/promote", start)).is_success
            assert (await api.get("/canary/web")).is_success
        gc.collect()
        left = Counter(type(item).__name__ for item in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    # then none of the requests' own objects needed the collector
    assert {name: left[name] for name in REQUEST_OBJECTS if left[name]} == {}


def test_a_new_request_id_is_a_random_version_4_uuid() -> None:
    ids = [new_request_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    for value in ids[:100]:
        parsed = uuid.UUID(hex=value)
        assert (len(value), parsed.hex, parsed.version, parsed.variant) == (
            32, value, 4, uuid.RFC_4122,
        )  # fmt: skip


async def test_every_request_is_counted_with_its_route_method_and_status(api: Harness) -> None:
    # given a few requests, answered 200, 404 and 401
    await api.post("/canary/promote", {"service": "checkout", "version": "v2"})
    for _ in range(3):
        await api.get("/canary/checkout")
    await api.get("/canary/nothing")
    await api.client.get("/internal/ops/canary/checkout")  # no token
    # then the request counters say so, and the latency histogram counts them alike
    exposition = (await api.client.get("/metrics")).text
    for route, method, status, count in [
        ("canary.promote", "POST", 200, 1), ("canary.get", "GET", 200, 3),
        ("canary.get", "GET", 404, 1), ("canary.get", "GET", 401, 1),
    ]:  # fmt: skip
        labels = f'method="{method}",route="{route}",status="{status}"'
        assert f"opsapi_http_requests_total{{{labels}}} {count}.0" in exposition
    histogram = 'opsapi_http_request_duration_seconds_count{method="GET",route="canary.get"}'
    assert f"{histogram} 5.0" in exposition
