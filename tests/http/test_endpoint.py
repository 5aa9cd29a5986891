"""The request pipeline's small helpers, against what they stand in for."""

from __future__ import annotations

import gc
import json
import uuid
from collections import Counter
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.requests import Request

from opsapi.http.endpoint import _strict, header, new_request_id, url_path
from opsapi.storage.db import load_json
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


# Bodies a client may send, and what the fast reader (orjson) hands to the strict one: integers
# past 64 bits, NaN and infinities, numbers past a double, NUL and lone surrogates, surrogate
# pairs, duplicate keys, deep nesting, and text that is not JSON.
BODIES = [
    '{"service": "checkout", "version": "v2", "reason": "release 2"}',
    '{"n": 123456789012345678901234567890, "m": -9223372036854775809, "f": 1.5e-7}',
    '{"a": NaN}', '{"a": Infinity}', '{"a": -Infinity}', '{"a": 1e400}', '{"a": -1e400}',
    '{"a": "\\u0000"}', '{"a": "\\ud800"}', '{"a": "\\ud83d\\ude00"}', '{"a": 1, "a": 2}',
    "[" * 40 + "]" * 40, "[" * 2000 + "]" * 2000,
    '{"a": -0, "b": -0.0, "c": 1E2, "d": 1e-400}',
    '{"a": "x\ny"}', '{"a": 01}', "[1,]", "{'a': 1}", "tru", "", '"\\x41"',
]  # fmt: skip


def outcome(read: Any, text: str) -> tuple[str, str]:
    """What reading `text` gives: its value written out with types (1 and 1.0 differ), or the
    error's type and message."""
    try:
        # (a number that is not finite reads as a marker, named here by its type)
        value = read(text)
        return "value", json.dumps(value, sort_keys=True, default=lambda it: type(it).__name__)
    except (ValueError, RecursionError) as error:
        return type(error).__name__, str(error)


@pytest.mark.parametrize("text", BODIES)
def test_a_body_reads_as_the_strict_reader_alone_reads_it(text: str) -> None:
    # The fast path must never accept, refuse or read otherwise than the standard library
    # with the pipeline's checks (the checks after it then see the same document).
    assert outcome(lambda body: load_json(body, _strict), text) == outcome(_strict, text)


@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
))  # fmt: skip
def test_any_body_reads_as_the_strict_reader_alone_reads_it(value: Any) -> None:
    text = json.dumps(value)
    assert outcome(lambda body: load_json(body, _strict), text) == outcome(_strict, text)


HEADER_SCOPES: list[list[tuple[bytes, bytes]]] = [
    [],
    [(b"authorization", b"Bearer abc"), (b"x-request-id", b"r-1")],
    [(b"x-request-id", b"first"), (b"x-request-id", b"second")],  # the first, as Starlette
    [(b"x-request-id", b"")],  # present and empty
    [(b"x-request-idx", b"longer name"), (b"x-request", b"shorter name")],
    [(b"if-none-match", b'"\xe9t\xe9"')],  # latin-1 bytes
    [(b"X-Request-Id", b"not lowercased by the server")],  # Starlette does not find it either
]


@pytest.mark.parametrize("headers", HEADER_SCOPES)
@pytest.mark.parametrize("name", ["x-request-id", "authorization", "if-none-match"])
def test_a_header_reads_as_starlettes_headers_read_it(
    headers: list[tuple[bytes, bytes]], name: str
) -> None:
    request = Request({"type": "http", "method": "GET", "path": "/", "headers": headers})
    assert header(request, name.encode()) == request.headers.get(name)
