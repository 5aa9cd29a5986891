"""Real nginx with the Lua module for the nginx-lua router tests: each instance runs the snippet
`opsapi nginx-config` prints (through `NginxLuaRouter.nginx_config`), 2 workers, a public
listener proxying to the `checkout` upstream, in a temp dir on loopback ports."""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from opsapi.routers.nginx_lua import NginxLuaRouter
from tests.support.databases import unavailable
from tests.support.processes import free_port
from tests.support.proxies import _kill, _wait_listening, find_binary

MODULES = Path("/usr/lib/nginx/modules")  # Debian's libnginx-mod-http-lua
SECRET = "t" * 24 + "-admin-secret-for-tests"
UPSTREAM = "checkout"


def lua_nginx_binary() -> str:
    """nginx, when it and the Lua module are installed (a failure in CI, a skip elsewhere)."""
    binary = find_binary("nginx")
    modules = [MODULES / "ndk_http_module.so", MODULES / "ngx_http_lua_module.so"]
    if binary is None or not all(module.exists() for module in modules):
        unavailable("nginx with the Lua module (apt-get install nginx libnginx-mod-http-lua)")
        raise AssertionError("unreachable")
    return binary


def main_conf(directory: Path, port: int, snippet: Path) -> str:
    """nginx.conf loading the Lua module, including the router's snippet, with a public listener
    that proxies everything to the `checkout` upstream over kept-alive connections."""
    temp = directory / "temp"
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}load_module {MODULES}/ndk_http_module.so;
load_module {MODULES}/ngx_http_lua_module.so;
daemon off;
master_process on;
worker_processes 2;
pid {directory}/nginx.pid;
error_log {directory}/error.log notice;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_requests 100000;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;

    include {snippet};

    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://{UPSTREAM};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


@dataclass
class LuaNginx:
    """A running nginx: public traffic on `port`, admin at `admin`, files under `directory`."""

    binary: str
    directory: Path
    conf: Path
    port: int
    admin: str
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.directory / "stderr.log"
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [self.binary, "-p", str(self.directory), "-c", str(self.conf), "-e", "stderr"],
                stdout=out,
                stderr=out,
            )
        _wait_listening(self.port, self.process, log)

    def reload(self) -> None:
        """`nginx -s reload` by hand (behind the router's back)."""
        subprocess.run(
            [self.binary, "-p", str(self.directory), "-c", str(self.conf), "-e", "stderr", "-s",
             "reload"],
            check=True, capture_output=True, timeout=10,
        )  # fmt: skip

    def stop(self) -> None:
        if self.process is not None:
            _kill(self.process)

    def logs(self) -> str:
        """Everything nginx logged."""
        return "".join(
            path.read_text(errors="replace")
            for path in (self.directory / "error.log", self.directory / "stderr.log")
            if path.exists()
        )


def admin_addresses(count: int, unix: bool = False) -> list[str]:
    """`count` free loopback admin addresses (the first a unix socket when `unix`)."""
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(count)]
    if unix:
        # Short: unix socket paths are limited to ~100 bytes.
        addresses[0] = f"unix:{tempfile.mkdtemp(prefix='opsapi-lua-')}/admin.sock"
    return addresses


def make_router(
    state_dir: Path, admins: Sequence[str], secret: str = SECRET, timeout: float = 2.0
) -> NginxLuaRouter:
    """The router `edge` for nginx instances at `admins`, its state file in `state_dir`."""
    state_dir.mkdir(parents=True, exist_ok=True)
    return NginxLuaRouter("edge", admins, secret, state_dir / "edge.state", timeout=timeout)


@contextlib.contextmanager
def running_lua_nginx(
    binary: str, directory: Path, router: NginxLuaRouter, admin: str
) -> Iterator[LuaNginx]:
    """nginx in `directory` running `router`'s snippet for the instance at `admin`."""
    (directory / "temp").mkdir(parents=True)
    snippet = directory / "opsapi-edge.conf"
    snippet.write_text(router.nginx_config([UPSTREAM], admin))
    port = free_port()
    conf = directory / "nginx.conf"
    conf.write_text(main_conf(directory, port, snippet))
    nginx = LuaNginx(binary, directory, conf, port, admin)
    try:
        nginx.start()
        yield nginx
    finally:
        nginx.stop()
        if admin.startswith("unix:"):
            shutil.rmtree(Path(admin[5:]).parent, ignore_errors=True)


def admin_call(
    admin: str, method: str, path: str, body: str = "", headers: dict[str, str] | None = None
) -> tuple[int, str]:
    """One raw call to an admin location (or any listener), as an attacker or a person would."""
    if admin.startswith("unix:"):
        raise ValueError("TCP admin addresses only")
    host, _, port = admin.rpartition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        connection.request(method, path, body=body.encode(), headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def by_caller(port: int, callers: Sequence[str], requests: int, how: str = "header",
              name: str = "X-User") -> dict[str, Counter[str]]:  # fmt: skip
    """Per caller, the answers to `requests` GETs carrying its id in header (or cookie) `name`,
    over one keep-alive connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    answers: dict[str, Counter[str]] = {}
    try:
        for caller in callers:
            value = caller if how == "header" else f"{name}={caller}"
            headers = {name if how == "header" else "Cookie": value}
            counts: Counter[str] = Counter()
            for _ in range(requests):
                connection.request("GET", "/", headers=headers)
                response = connection.getresponse()
                body = response.read().decode()
                counts[body if response.status == 200 else f"status {response.status}"] += 1
            answers[caller] = counts
    finally:
        connection.close()
    return answers
