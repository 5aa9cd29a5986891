"""The request pipeline's small helpers, against what they stand in for."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from opsapi.http.endpoint import url_path

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
