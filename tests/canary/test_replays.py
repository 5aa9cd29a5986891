"""An idempotent replay answers exactly what the first call answered, byte for byte, whatever the
router: the first answer is built after the router applied (it says whether traffic is at 0), so
the stored answer must be that one, not the one committed before the apply."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.app import Harness, running_app
from tests.support.databases import unavailable
from tests.support.proxies import find_binary, running_nginx
from tests.support.slots import slot_backends

SERVICE = "checkout"


class _Accept(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def receiver() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Accept)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/weights"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(params=["pull", "webhook", "nginx"])
async def api(
    request: pytest.FixtureRequest, pg_url: str, key_file: Path, tmp_path: Path
) -> AsyncIterator[Harness]:
    routers_file = tmp_path / "routers.json"
    with contextlib.ExitStack() as stack:
        router: dict[str, Any] = {"name": "pull"}
        instances: dict[str, Any] = {}
        if request.param == "webhook":
            url = stack.enter_context(receiver())
            instances["hook"] = {"type": "webhook", "url": url, "secret": "s" * 32}
            router = {"name": "hook"}
        elif request.param == "nginx":
            binary = find_binary("nginx")
            if binary is None:
                unavailable("nginx")
                raise AssertionError("unreachable")
            slots = stack.enter_context(slot_backends(blue="v1", green="v2"))
            nginx = stack.enter_context(running_nginx(binary, tmp_path / "nginx"))
            instances["edge"] = {
                "type": "nginx", "conf": str(nginx.conf), "prefix": str(nginx.directory),
                "upstreams_dir": str(nginx.upstreams_dir), "binary": nginx.binary,
                "probe": nginx.probe,
            }  # fmt: skip
            addresses = {slot: backend.address for slot, backend in slots.items()}
            router = {"name": "edge", "upstream": SERVICE, "slots": addresses}
        routers_file.write_text(json.dumps(instances))
        async with running_app(pg_url, key_file, routers_file=routers_file) as harness:
            policy = {"steps": [{"weight": 10, "wait": "1m"}, {"weight": 100, "wait": "1m"}],
                      "router": router}  # fmt: skip
            assert (await harness.put(f"/services/{SERVICE}", policy)).status_code == 200
            yield harness


async def keyed(api: Harness, path: str, body: dict[str, Any], key: str) -> httpx.Response:
    return await api.post(path, body, "admin", **{"Idempotency-Key": key})


async def assert_replayed(api: Harness, path: str, body: dict[str, Any], key: str) -> None:
    first = await keyed(api, path, body, key)
    assert first.status_code == 200, first.text
    api.clock.advance(seconds=7)  # a replay later must not recompute anything
    await api.fetch_weight(SERVICE)  # even once a pull client has applied the new weight
    again = await keyed(api, path, body, key)
    assert again.headers["idempotent-replayed"] == "true"
    assert again.status_code == first.status_code
    assert again.content == first.content


async def test_replays_of_promote_rollback_and_revert_are_byte_identical(api: Harness) -> None:
    start = {"service": SERVICE, "version": "v2", "stable_version": "v1"}
    await assert_replayed(api, "/canary/promote", start, "start-v2")
    rollback = {"service": SERVICE, "reason": "errors"}
    await assert_replayed(api, "/canary/rollback", rollback, "rollback-v2")
    assert (await api.get(f"/canary/{SERVICE}")).json()["applied_weight"] == 0

    await keyed(api, "/canary/promote", {"service": SERVICE, "version": "v2"}, "start-again")
    api.clock.advance(minutes=1)
    promote = {"service": SERVICE, "from_percent": 10}
    await assert_replayed(api, "/canary/promote", promote, "promote-to-100")
    api.clock.advance(minutes=1)
    done = await keyed(api, "/canary/promote", {"service": SERVICE}, "succeed")
    assert done.json()["state"] == "succeeded", done.text
    revert = {"service": SERVICE, "reason": "v2 leaks"}
    await assert_replayed(api, "/canary/revert", revert, "revert-v2")
    view = (await api.get(f"/canary/{SERVICE}")).json()
    assert (view["state"], view["stable_version"], view["applied_weight"]) == ("reverted", "v1", 0)
