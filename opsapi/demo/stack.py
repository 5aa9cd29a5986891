"""The processes of `opsapi demo`: two demo app slots, Prometheus, nginx and `opsapi serve`,
each on a free loopback port with its files in one directory, and stopped together.

Every child runs in a session of its own (a Ctrl-C in the terminal reaches only `opsapi demo`,
which then stops them in order) and, on Linux, is told to receive SIGTERM if `opsapi demo`
itself dies without cleaning up, so nothing is left running either way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from opsapi.demo.app import write_control

# Where Debian puts nginx; often not on a non-root user's PATH.
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


def answers_ok(url: str) -> Callable[[], bool]:
    """A check that `url` answers 200 now."""
    return lambda: httpx.get(url, timeout=1, trust_env=False).status_code == 200


class DemoError(Exception):
    """Something the demo needs failed; the message is one line for the user."""


@dataclass(frozen=True)
class Binaries:
    """Paths of the programs the demo runs."""

    prometheus: str
    nginx: str


def find_binaries(path: str | None = None, sbin: Sequence[str] = SBIN_DIRS) -> Binaries:
    """The prometheus and nginx programs, on `path` (default: PATH), nginx also in `sbin`;
    DemoError naming what is missing and how to install it."""
    path = os.environ.get("PATH", os.defpath) if path is None else path
    prometheus = shutil.which("prometheus", path=path)
    nginx = shutil.which("nginx", path=path) or shutil.which("nginx", path=os.pathsep.join(sbin))
    missing = [name for name, found in (("prometheus", prometheus), ("nginx", nginx)) if not found]
    if missing:
        where = {"prometheus": "on PATH", "nginx": "on PATH"}
        if sbin:
            where["nginx"] = f"on PATH or in {', '.join(sbin)}"
        what = " and ".join(f"{name} ({where[name]})" for name in missing)
        raise DemoError(
            f"{what} not found: the demo runs a real Prometheus and nginx; on Debian or Ubuntu "
            f"install {'it' if len(missing) == 1 else 'them'} with "
            f"`sudo apt-get install {' '.join(missing)}`"
        )
    assert prometheus is not None
    assert nginx is not None
    return Binaries(prometheus=prometheus, nginx=nginx)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether 127.0.0.1:`port` can be bound now."""
    with socket.socket() as sock:
        # As servers bind (connections in TIME_WAIT from an earlier run do not block it).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            # PR_SET_PDEATHSIG: SIGTERM when the demo process dies, however it dies.
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


@dataclass
class Child:
    """One process the demo started, with its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    stop_signal: int = signal.SIGTERM

    def tail(self, lines: int = 3) -> str:
        """The last lines of its log, on one line."""
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return " | ".join(line.strip() for line in text[-lines:]) or "no output"


@dataclass
class Slot:
    """One demo app instance: the slot's name, address and control file."""

    name: str
    port: int
    control: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def deploy(
        self, version: str | None, *, error_ratio: float = 0.0, latency_seconds: float = 0.005
    ) -> None:
        """Run `version` in this slot (None: nothing), with these faults."""
        write_control(
            self.control, version=version, error_ratio=error_ratio, latency_seconds=latency_seconds
        )


@dataclass
class Stack:
    """The demo's processes and files under `directory`; `stop()` ends every process."""

    directory: Path
    binaries: Binaries
    service: str = "checkout"
    children: list[Child] = field(default_factory=list)
    slots: dict[str, Slot] = field(default_factory=dict)
    api_port: int = 0
    prometheus_port: int = field(default_factory=free_port)
    nginx_port: int = field(default_factory=free_port)
    probe_port: int = field(default_factory=free_port)

    # -- addresses ---------------------------------------------------------------------------

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    @property
    def traffic_url(self) -> str:
        return f"http://127.0.0.1:{self.nginx_port}/"

    @property
    def key_file(self) -> Path:
        return self.directory / "opsapi-data" / "signing-key.json"

    # -- processes ---------------------------------------------------------------------------

    def spawn(
        self,
        name: str,
        command: list[str],
        *,
        env: dict[str, str] | None = None,
        stop_signal: int = signal.SIGTERM,
    ) -> Child:
        """Start `command` in its own session, its output in `<directory>/logs/<name>.log`."""
        logs = self.directory / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{name}.log"
        with log.open("ab") as out:
            # Our own binaries and arguments, no shell.
            process = subprocess.Popen(  # noqa: S603
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.directory,
                start_new_session=True,
                # Started from the main thread before the traffic thread exists.
                preexec_fn=_die_with_parent,
            )
        child = Child(name, process, log, stop_signal)
        self.children.append(child)
        return child

    def wait_for(self, child: Child, ready: Callable[[], bool], what: str) -> None:
        """Until `ready()` is true; DemoError if the child exits or it takes too long."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            code = child.process.poll()
            if code is not None:
                raise DemoError(f"{child.name} exited with {code}: {child.tail()}")
            with contextlib.suppress(OSError, httpx.HTTPError):
                if ready():
                    return
            if time.monotonic() > deadline:
                raise DemoError(
                    f"{child.name} not {what} after {START_TIMEOUT:g} s: {child.tail()}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop opsapi first (its controller must not act on a half-stopped stack), then the
        rest together; whatever does not stop in time is killed."""
        opsapi = [child for child in self.children if child.name == "opsapi"]
        others = [child for child in self.children if child.name != "opsapi"]
        for group in (opsapi, others):
            for child in group:
                if child.process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        child.process.send_signal(child.stop_signal)
            deadline = time.monotonic() + STOP_TIMEOUT
            for child in group:
                try:
                    child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    child.process.wait(timeout=10)
        self.children.clear()

    # -- the parts ---------------------------------------------------------------------------

    def __post_init__(self) -> None:
        (self.directory / "slots").mkdir(parents=True, exist_ok=True)
        for name in ("blue", "green"):
            self.slots[name] = Slot(name, free_port(), self.directory / "slots" / f"{name}.json")

    def start_slots(self, first_version: str) -> None:
        """The two demo app instances, `blue` running `first_version` and `green` empty."""
        started = []
        for slot, version in zip(self.slots.values(), (first_version, None), strict=True):
            slot.deploy(version)
            child = self.spawn(
                f"app-{slot.name}",
                [
                    sys.executable,
                    "-m",
                    "opsapi.demo.app",
                    "serve",
                    "--service",
                    self.service,
                    "--slot",
                    slot.name,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(slot.port),
                    "--control",
                    str(slot.control),
                ],
            )
            started.append((child, f"http://{slot.address}/healthz"))
        for child, url in started:
            self.wait_for(child, answers_ok(url), "answering")

    def spawn_prometheus(self) -> Child:
        """Prometheus scraping both slots and opsapi every second. Started first and waited for
        last (`wait_scraped`): it discovers its targets only about 5 s after it starts."""
        directory = self.directory / "prometheus"
        directory.mkdir(parents=True, exist_ok=True)
        apps = ", ".join(f"'{slot.address}'" for slot in self.slots.values())
        config = directory / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            f"  - job_name: demo-app\n    static_configs:\n      - targets: [{apps}]\n"
            f"  - job_name: opsapi\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{self.api_port}']\n"
        )
        return self.spawn(
            "prometheus",
            [
                self.binaries.prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.prometheus_port}",
                "--storage.tsdb.retention.time=1d",
                "--log.level=warn",
            ],
        )

    def wait_scraped(self, prometheus: Child) -> None:
        """Until Prometheus has scraped both slots."""
        self.wait_for(prometheus, self._apps_scraped, "scraping the slots")

    def _apps_scraped(self) -> bool:
        base = self.prometheus_url
        if not answers_ok(f"{base}/-/ready")():
            return False
        targets = httpx.get(f"{base}/api/v1/targets", timeout=1, trust_env=False)
        active = targets.json()["data"]["activeTargets"]
        up = {target["labels"]["instance"] for target in active if target["health"] == "up"}
        return {slot.address for slot in self.slots.values()} <= up

    @property
    def nginx_dir(self) -> Path:
        return self.directory / "nginx"

    def start_nginx(self) -> None:
        """nginx in front of the slots, with the service's upstream in the file the nginx
        router owns from its first apply on (until then: the stable slot alone)."""
        directory = self.nginx_dir
        upstreams = directory / "upstreams"
        upstreams.mkdir(parents=True, exist_ok=True)
        # Files of an earlier run in this directory name its ports: they must not come back.
        for stale in upstreams.glob("*.conf"):
            stale.unlink()
        (directory / "temp").mkdir(exist_ok=True)
        (upstreams / f"{self.service}.conf").write_text(
            f"upstream {self.service} {{\n    server {self.slots['blue'].address};\n}}\n"
        )
        conf = directory / "nginx.conf"
        conf.write_text(nginx_conf(directory, self.service, self.nginx_port, self.probe_port))
        child = self.spawn(
            "nginx",
            [self.binaries.nginx, "-p", str(directory), "-c", str(conf), "-e", "stderr"],
            stop_signal=signal.SIGQUIT,  # graceful: requests in flight finish
        )
        url = self.traffic_url
        self.wait_for(child, answers_ok(url), "proxying")

    def routers_file(self) -> Path:
        """The router instance `edge` for this nginx (server configuration, not API input)."""
        path = self.directory / "routers.json"
        path.write_text(
            json.dumps(
                {
                    "edge": {
                        "type": "nginx",
                        "conf": str(self.nginx_dir / "nginx.conf"),
                        "prefix": str(self.nginx_dir),
                        "upstreams_dir": str(self.nginx_dir / "upstreams"),
                        "binary": self.binaries.nginx,
                        "probe": f"127.0.0.1:{self.probe_port}",
                    }
                },
                indent=2,
            )
            + "\n"
        )
        return path

    def start_opsapi(self, database_url: str | None, webhook_secret: str) -> None:
        """`opsapi serve` on the API port: embedded tokens, this Prometheus and nginx."""
        data = self.key_file.parent
        data.mkdir(parents=True, exist_ok=True)
        # Only the database may come from the caller's settings: the rest is the demo's.
        env = {name: value for name, value in os.environ.items() if not name.startswith("OPSAPI_")}
        env.update(
            {
                "OPSAPI_ENV": "development",
                "OPSAPI_DATABASE_URL": database_url
                or f"sqlite+aiosqlite:///{self.directory / 'opsapi.db'}",
                "OPSAPI_DATA_DIR": str(data),
                "OPSAPI_LOCAL_KEY_FILE": str(self.key_file),
                "OPSAPI_PROMETHEUS_URL": self.prometheus_url,
                "OPSAPI_ROUTERS_FILE": str(self.routers_file()),
                "OPSAPI_PAGERDUTY_WEBHOOK_SECRETS": webhook_secret,
                "OPSAPI_CONTROLLER_POLL_SECONDS": "0.5",
                "OPSAPI_SHUTDOWN_TIMEOUT_SECONDS": "5",
                "PYTHONUNBUFFERED": "1",
            }
        )
        child = self.spawn(
            "opsapi",
            [
                sys.executable,
                "-m",
                "opsapi",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.api_port),
            ],
            env=env,
        )
        url = f"{self.api_base}/readyz"
        self.wait_for(child, answers_ok(url), "ready")


def nginx_conf(directory: Path, service: str, port: int, probe_port: int) -> str:
    """The main nginx.conf the nginx router expects (see opsapi/routers/nginx.py)."""
    temp = directory / "temp"
    # As root, nginx's workers would run as `nobody`, who cannot read files in a private dir.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}daemon off;
master_process on;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log notice;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;

    # opsapi's nginx router writes one file per service here (upstream + probe server).
    include {directory}/upstreams/*.conf;

    # The router's probe address: a service without a file gets 404, not another's answer.
    server {{
        listen 127.0.0.1:{probe_port} default_server;
        return 404;
    }}

    # The service's traffic, split between the slots by the upstream opsapi writes.
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://{service};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
