"""Real server processes for tests: free ports, start, wait until ready, kill."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (all held at once while chosen: two separate picks
    may return the same port, and HAProxy would share it silently between two listeners).

    Picked below the kernel's ephemeral range: a port the kernel hands to another test's
    server (bound to port 0) or to a connection can never be the one picked here, between the
    pick and the child process binding it (a test once met another worker's server on the
    admin port it had picked for nginx)."""
    low, high = _pickable()
    with contextlib.ExitStack() as held:
        ports: list[int] = []
        while len(ports) < count:
            port = random.randrange(low, high)
            if port in ports:
                continue
            sock = held.enter_context(socket.socket())
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use, or in TIME_WAIT: another
            ports.append(port)
        return ports


def _pickable() -> tuple[int, int]:
    """The ports to pick from: below the kernel's ephemeral range when it leaves room."""
    try:
        first = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        first = 32768  # Linux's default
    return (10000, first) if first > 12000 else (first, 65536)


def start_server(port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`opsapi serve` in a child process; returns once /readyz answers."""
    command = [sys.executable, "-m", "opsapi", "serve", "--port", str(port)]
    with log.open("ab") as out:
        process = subprocess.Popen(command, env={**os.environ, **env}, stdout=out, stderr=out)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"server did not become ready: {log.read_text()[-2000:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(timeout=10)
