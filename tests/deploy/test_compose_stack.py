"""The compose stack's traffic path, run here without Docker: nginx with the stack's own
nginx.conf and the snippet `opsapi nginx-config` writes for the stack's routers file, the demo
app in its two slots, and opsapi on PostgreSQL applying the stack's checkout policy. Paths and
addresses are moved to a temp dir and loopback ports; nothing else of the files is changed."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from opsapi.opsctl import policy as policy_files
from tests.deploy.compose import SHARED, container_file, listen_port, services
from tests.deploy.support import ROOT
from tests.support.app import API, running_app
from tests.support.nginx_lua import lua_nginx_binary
from tests.support.processes import free_port
from tests.support.proxies import _kill, _wait_listening

pytestmark = pytest.mark.postgres
NGINX_IMAGE = ROOT / "deploy/compose/nginx/Dockerfile"


def through(port: int, requests: int) -> Counter[str]:
    """What `requests` GETs through nginx at `port` answered, over one kept-alive connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    answers: Counter[str] = Counter()
    try:
        for _ in range(requests):
            connection.request("GET", "/")
            response = connection.getresponse()
            body = response.read().decode().strip()
            answers[body if response.status == 200 else f"status {response.status}"] += 1
    finally:
        connection.close()
    return answers


def start(command: list[str], log: Path, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=out, env={**os.environ, **env})
    try:
        _wait_listening(port, process, log)
    except BaseException:
        _kill(process)
        raise
    return process


@pytest.fixture
def edge_dir() -> Iterator[Path]:
    # Short: the admin socket's path must fit a unix socket address.
    directory = Path(tempfile.mkdtemp(prefix="opsapi-edge-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


async def test_a_canary_of_the_compose_stack_gets_its_share_then_none_after_rollback(
    tmp_path: Path, edge_dir: Path, pg_url: str, key_file: Path
) -> None:
    nginx_binary = lua_nginx_binary()
    stack = services()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        # given the demo app in both slots, each answering its version
        policy = yaml.safe_load((ROOT / "deploy/compose/checkout-policy.yaml").read_text())
        slots = {}
        for slot in ("blue", "green"):
            service = stack[f"demo-{slot}"]
            port = free_port()
            env = {k: v.split(":-")[-1].rstrip("}") for k, v in service["environment"].items()}
            command = [sys.executable, *service["entrypoint"][1:], *service["command"]]
            command[command.index("--port") + 1] = str(port)
            command[command.index("--host") + 1] = "127.0.0.1"
            processes.append(start(command, tmp_path / f"{slot}.log", port, env))
            address = f"{service['networks']['default']['ipv4_address']}:{listen_port(service)}"
            assert policy["router"]["slots"][slot] == address
            slots[slot] = f"127.0.0.1:{port}"

        # and nginx with the stack's configuration and the snippet edge-setup generates
        routers = container_file(
            stack["opsapi"], stack["opsapi"]["environment"]["OPSAPI_ROUTERS_FILE"]
        )
        local_routers = tmp_path / "routers.yaml"
        local_routers.write_text(routers.read_text().replace(SHARED, str(edge_dir)))
        snippet = subprocess.run(
            [sys.executable, "-m", "opsapi", "nginx-config", "--router", "edge", "checkout"],
            env={**os.environ, "OPSAPI_ROUTERS_FILE": str(local_routers)},
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        (edge_dir / "edge.conf").write_text(snippet)
        public = free_port()
        conf = container_file(stack["nginx"], "/etc/nginx/nginx.conf").read_text()
        conf = conf.replace(SHARED, str(edge_dir)).replace(
            "listen 80;", f"listen 127.0.0.1:{public};"
        )
        conf = conf.replace("pid /run/nginx.pid;", f"pid {tmp_path}/nginx.pid;")
        (tmp_path / "nginx.conf").write_text(conf)
        # Debian's prefix, as in the image (its module lines are relative to it), and the
        # image's own command line.
        cmd = json.loads(re.search(r"^CMD (.+)$", NGINX_IMAGE.read_text(), re.M).group(1))  # type: ignore[union-attr]
        assert cmd[0] == "nginx"
        nginx = [nginx_binary, *cmd[1:], "-c", str(tmp_path / "nginx.conf"), "-e", "stderr"]
        processes.append(start(nginx, tmp_path / "nginx.log", public, {}))

        # On the system clock: the router leases weights until a time nginx checks on its own.
        async with running_app(pg_url, key_file, real_time=True, routers_file=local_routers) as api:
            # when an admin applies the stack's policy and an operator starts v2 beside v1
            # (read as `opsctl policy apply -f` reads it)
            policy_file = str(ROOT / "deploy/compose/checkout-policy.yaml")
            name, body = policy_files.split(policy_files.load(policy_file), None, policy_file)
            body["router"] = {**body["router"], "slots": slots}
            put = await api.client.put(
                f"{API}/services/{name}", json=body, headers=api.auth("admin")
            )
            assert put.status_code == 200, put.text
            started = await api.post(
                "/canary/promote", {"service": "checkout", "version": "v2", "stable_version": "v1"}
            )
            assert started.status_code == 200, started.text
            assert started.json()["applied_weight"] == 10

            # then about a tenth of the requests through nginx reach the canary slot
            answers = through(public, 400)
            assert set(answers) == {"checkout v1", "checkout v2"}, answers
            assert 10 <= answers["checkout v2"] <= 80, answers

            # and after a rollback none do
            rolled = await api.post("/canary/rollback", {"service": "checkout", "reason": "test"})
            assert rolled.status_code == 200, rolled.text
            assert rolled.json()["traffic_at_zero"] is True
            assert through(public, 100) == Counter({"checkout v1": 100})
    finally:
        for process in processes:
            _kill(process)
