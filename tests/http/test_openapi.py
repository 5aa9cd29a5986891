"""The OpenAPI document describes exactly the routes the application serves."""

from __future__ import annotations

from starlette.routing import Mount

from tests.support.app import API, Harness


async def test_every_served_route_is_documented_and_nothing_else(api: Harness) -> None:
    mount = next(r for r in api.app.routes if isinstance(r, Mount) and r.path == API)
    served = {
        (method.lower(), API + route.path)
        for route in mount.routes
        for method in route.methods - {"HEAD"}  # type: ignore[attr-defined]
    } - {("get", API + "/openapi.json")}

    document = (await api.client.get(API + "/openapi.json")).json()

    documented = {(method, path) for path, ops in document["paths"].items() for method in ops}
    assert served == documented
    assert not [p for p in documented if "/console" in p[1]]  # HTML pages (docs/console.md)
