"""The request pipeline's small helpers, against what they stand in for."""

from __future__ import annotations

import gc
from collections import Counter

import pytest
from starlette.requests import Request

from opsapi.http.endpoint import url_path
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
