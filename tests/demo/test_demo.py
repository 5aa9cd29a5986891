"""`opsapi demo` end to end: one command starts a real canary stack (demo app slots, Prometheus,
nginx, opsapi), runs the narrated release — v2 succeeds, v3 is rolled back by a gate breach, v4
by a signed PagerDuty webhook — and Ctrl-C leaves nothing running."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import asyncpg
import httpx
import pytest

from opsapi.demo.stack import SBIN_DIRS
from tests.support.databases import PG_ADMIN_DSN, create_pg_database, drop_pg_database, unavailable
from tests.support.processes import free_port

API = "/internal/ops"


def require_programs() -> None:
    """Prometheus and nginx, as the demo finds them; skipped locally, failed in CI."""
    if shutil.which("prometheus") is None:
        unavailable("the prometheus program")
    if shutil.which("nginx") is None and shutil.which("nginx", path=":".join(SBIN_DIRS)) is None:
        unavailable("the nginx program")


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any OPSAPI_* setting of the person running it."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("OPSAPI_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


class Demo:
    """`opsapi demo` as a child process; its stdout read line by line in a thread."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "opsapi", "demo", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=cwd,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first line (from the start) matching `pattern`; fails with the output so far."""
        regex = re.compile(pattern)
        for line in self.lines:
            if match := regex.search(line):
                return match
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                pytest.fail(f"opsapi demo ended before {pattern!r}:\n{self.output}")
            self.lines.append(line)
            if "opsapi demo failed" in line:
                pytest.fail(f"opsapi demo failed:\n{self.output}")
            if match := regex.search(line):
                return match
        pytest.fail(f"no {pattern!r} within {timeout:g} s:\n{self.output}")

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def interrupt(self, timeout: float = 40) -> int:
        """Ctrl-C; the exit code."""
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout=timeout)
        # Whatever it printed while stopping.
        while (line := self._queue.get(timeout=5)) is not None:
            self.lines.append(line)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def descendants(pid: int) -> dict[int, str]:
    """Every process below `pid` (children, their children …), with its command line."""
    parents: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        commands[int(entry.name)] = command.strip()
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in found:
                found[child] = commands[child]
                frontier.append(child)
    return found


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def traffic(url: str, requests: int) -> Counter[str]:
    """`requests` GETs through nginx, counted by answer."""
    with httpx.Client(trust_env=False, timeout=5) as client:
        return Counter(client.get(url).text.strip() for _ in range(requests))


@pytest.mark.timeout(180)
def test_the_demo_runs_a_real_release_and_ctrl_c_leaves_nothing_running(tmp_path: Path) -> None:
    # given a machine with prometheus and nginx
    require_programs()
    port = free_port()
    # when `opsapi demo` runs with short waits and gate windows
    args = ["--step-wait", "2s", "--gate-for", "3s", "--port", str(port), "--dir"]
    demo = Demo([*args, str(tmp_path / "d")], clean_env(), tmp_path)
    try:
        # then it says where everything is
        api = demo.wait_for(r"opsapi API +(http://127\.0\.0\.1:\d+/internal/ops)", 60).group(1)
        assert api == f"http://127.0.0.1:{port}/internal/ops"
        token = demo.wait_for(r"admin token +(\S+)", 5).group(1)
        opsctl = rf"opsctl +OPSAPI_URL=http://127\.0\.0\.1:{port} OPSAPI_TOKEN={token} opsctl "
        demo.wait_for(opsctl, 5)
        nginx = demo.wait_for(r"traffic +(http://127\.0\.0\.1:(\d+)/)", 5)
        prometheus = demo.wait_for(r"Prometheus +http://127\.0\.0\.1:(\d+) ", 5)
        # and narrates the release: each step's split measured through nginx, the breach, the page
        demo.wait_for(r"v2 to 25 %.*measured through nginx .*green v2", 60)
        demo.wait_for(r"gate (error-rate|success-rate) failing", 60)
        demo.wait_for(r"\] v3 rolled back by the controller: gate \S+ breached", 60)
        demo.wait_for(r"\] PagerDuty: incident\.triggered .* 200 rolled_back", 60)
        demo.wait_for(r"\] v4 rolled back by PagerDuty: ", 30)
        # and sums it up
        demo.wait_for(r"^The scripted release is over:$", 30)
        demo.wait_for(r"^  v2 succeeded$", 1)
        breach = demo.wait_for(r"^  v3 rolled back by the controller: (gate (\S+) breached.*)$", 1)
        assert breach.group(2) in ("error-rate", "success-rate")
        page = demo.wait_for(r"^  v4 rolled back by PagerDuty: (PagerDuty incident .*)$", 1)

        # and the API says the same: newest first, who did it and why
        headers = {"Authorization": f"Bearer {token}"}
        history = httpx.get(f"{api}/canary/checkout/history", headers=headers, trust_env=False)
        assert history.status_code == 200, history.text
        rollouts = [
            (item["canary_version"], item["state"], item["triggered_by"], item["reason"])
            for item in history.json()["items"]
        ]
        assert rollouts == [
            ("v4", "rolled_back", "pagerduty", page.group(1)),
            ("v3", "rolled_back", "controller", breach.group(1)),
            ("v2", "succeeded", "controller", rollouts[2][3]),
        ]
        service = httpx.get(f"{api}/services/checkout", headers=headers, trust_env=False).json()
        assert (service["status"]["stable_version"], service["status"]["stable_slot"]) == (
            "v2",
            "green",
        )
        # and real traffic through nginx reaches the stable version only
        assert traffic(nginx.group(1), 200) == Counter({"green v2": 200})

        # when Ctrl-C
        children = descendants(demo.process.pid)
        assert any("nginx" in command for command in children.values()), children
        assert any("prometheus" in command for command in children.values()), children
        code = demo.interrupt()
    finally:
        demo.kill()

    # then it exits cleanly, and nothing it started runs or listens any more
    assert code == 0, demo.output
    assert demo.output.rstrip().endswith("nothing the demo started is running (files and logs "
                                         f"kept in {tmp_path / 'd'})")  # fmt: skip
    assert [pid for pid in children if running(pid)] == []
    for open_port in (port, int(nginx.group(2)), int(prometheus.group(1))):
        assert not listening(open_port), open_port


@pytest.mark.timeout(120)
async def test_the_demo_stack_runs_on_the_given_postgresql_database(tmp_path: Path) -> None:
    # given prometheus, nginx and an empty PostgreSQL database
    require_programs()
    name, url = await create_pg_database()
    demo = Demo(["--no-script", "--port", str(free_port())],
                clean_env(OPSAPI_DATABASE_URL=url), tmp_path)  # fmt: skip
    try:
        # when `opsapi demo --no-script` starts
        demo.wait_for(r"No script \(--no-script\)", 90)
        # then the demo's policy is stored in that database, and no rollout was started
        connection = await asyncpg.connect(PG_ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}")
        try:
            services = await connection.fetch("SELECT name FROM service")
            rollouts = await connection.fetchval("SELECT count(*) FROM rollout")
        finally:
            await connection.close()
        assert [row["name"] for row in services] == ["checkout"]
        assert rollouts == 0
        assert demo.interrupt() == 0, demo.output
        # and the temporary directory it made is gone
        directory = demo.wait_for(r"files in (\S+)", 1).group(1)
        assert not Path(directory).exists()
    finally:
        demo.kill()
        await drop_pg_database(name)


def test_a_missing_program_is_one_line_naming_it_and_how_to_install_it(tmp_path: Path) -> None:
    # given a PATH without prometheus (nginx is still found in /usr/sbin, where Debian puts it)
    empty = tmp_path / "bin"
    empty.mkdir()
    # when `opsapi demo` runs
    result = subprocess.run(
        [sys.executable, "-m", "opsapi", "demo"],
        env=clean_env(PATH=str(empty)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # then it says what is missing and how to install it, on one line, and fails
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "opsapi demo: prometheus (on PATH) not found: the demo runs a real Prometheus and nginx; "
        "on Debian or Ubuntu install it with `sudo apt-get install prometheus`"
    ]
    assert list(tmp_path.iterdir()) == [empty]  # nothing was started or written
