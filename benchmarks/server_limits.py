"""What unauthenticated clients can do to one `opsapi serve` process: RSS, stalls, held sockets.

Three attacks, each with `/healthz` probed every 0.2 s meanwhile (its worst latency printed):
- big headers: N connections each send a 10 MB header line that never ends;
- one huge header: a single 100 MB header line;
- slowloris: N connections send a request head one line every 5 s, never finishing it.
Prints the server's RSS before/after, how long the server took to drop the senders, and how
many slowloris connections are still open after the given time.

    .venv/bin/python benchmarks/server_limits.py [--slow 1000] [--slow-seconds 60]

To measure another checkout, run this script from that checkout's directory (the server is
`python -m opsapi`, which imports the package from the current directory).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.processes import free_port, start_server, stop

MB = 1024 * 1024


def rss_mb(pid: int) -> float:
    """Resident memory of `pid` and its children, in MiB."""
    total = 0
    pids = [pid]
    for status in Path("/proc").glob("[0-9]*/status"):
        with contextlib.suppress(OSError):
            if f"\nPPid:\t{pid}\n" in status.read_text():
                pids.append(int(status.parent.name))
    for each in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


class Probe:
    """`/healthz` every 0.2 s on a fresh connection; remembers the worst latency."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.worst = 0.0
        self.failures = 0
        self._task: asyncio.Task[None] | None = None

    async def _once(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
        await reader.read()
        writer.close()

    async def _run(self) -> None:
        while True:
            started = time.perf_counter()
            try:
                await asyncio.wait_for(self._once(), timeout=30)
            except (OSError, TimeoutError):
                self.failures += 1
            self.worst = max(self.worst, time.perf_counter() - started)
            await asyncio.sleep(0.2)

    def __enter__(self) -> Probe:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def endless_header(port: int, size: int, peak: list[float], pid: int) -> tuple[str, float]:
    """Send a header line of `size` bytes that never ends; how and when the server reacted."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: attack\r\nX-Big: ")
    chunk = b"a" * MB
    sent = 0
    try:
        while sent < size:
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)
            peak[0] = max(peak[0], rss_mb(pid))
        answer = await asyncio.wait_for(reader.read(200), timeout=60)
        outcome = answer.split(b"\r\n", 1)[0].decode() or "closed"
    except (OSError, TimeoutError) as error:
        outcome = f"dropped ({type(error).__name__}) after {sent // MB} MB"
    finally:
        writer.close()
    return outcome, time.perf_counter() - started


async def big_headers(port: int, pid: int, count: int) -> None:
    before = rss_mb(pid)
    peak = [before]
    with Probe(port) as probe:
        results = await asyncio.gather(
            *(endless_header(port, 10 * MB, peak, pid) for _ in range(count))
        )
        await asyncio.sleep(1)  # the server's memory once the senders are gone
        after = rss_mb(pid)
    outcomes = sorted({outcome.split(" after")[0] for outcome, _ in results})
    slowest = max(took for _, took in results)
    print(
        f"{count} x 10 MB headers   RSS {before:6.0f} -> peak {peak[0]:6.0f} -> {after:6.0f} MiB"
        f"   all dropped within {slowest:5.1f} s ({', '.join(outcomes)})"
        f"   /healthz worst {probe.worst * 1000:7.1f} ms"
    )


async def huge_header(port: int, pid: int) -> None:
    before = rss_mb(pid)
    peak = [before]
    with Probe(port) as probe:
        outcome, took = await endless_header(port, 100 * MB, peak, pid)
        await asyncio.sleep(1)
    print(
        f"1 x 100 MB header     RSS {before:6.0f} -> peak {peak[0]:6.0f} MiB"
        f"   {outcome} after {took:5.1f} s   /healthz worst {probe.worst * 1000:7.1f} ms"
    )


async def slowloris(port: int, pid: int, count: int, seconds: float) -> None:
    sockets: list[socket.socket] = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        sock.send(b"GET /healthz HTTP/1.1\r\nHost: slow\r\n")
        sockets.append(sock)
    before = rss_mb(pid)
    started = time.monotonic()
    open_at: dict[int, int] = {}
    with Probe(port) as probe:
        while time.monotonic() - started < seconds:
            await asyncio.sleep(5)
            for sock in sockets:
                if sock.fileno() < 0:
                    continue
                try:
                    if sock.recv(1, socket.MSG_PEEK) == b"":
                        sock.close()
                        continue
                except BlockingIOError:
                    pass  # nothing from the server: still open
                except OSError:
                    sock.close()
                    continue
                try:
                    sock.send(b"X-Slow: 1\r\n")
                except OSError:
                    sock.close()
            open_at[round(time.monotonic() - started)] = sum(s.fileno() >= 0 for s in sockets)
    for sock in sockets:
        sock.close()
    timeline = ", ".join(f"{at}s: {n}" for at, n in open_at.items())
    print(
        f"{count} slowloris conns  still open after {seconds:.0f} s: "
        f"{list(open_at.values())[-1] if open_at else count}"
        f"   RSS {before:6.0f} MiB   /healthz worst {probe.worst * 1000:7.1f} ms"
        f" ({probe.failures} failed)\n    open over time: {timeline}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--big", type=int, default=20, help="10 MB header connections")
    parser.add_argument("--slow", type=int, default=1000, help="slowloris connections")
    parser.add_argument("--slow-seconds", type=float, default=60)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="opsapi-limits-"))
    port = free_port()
    env = {
        "OPSAPI_DATABASE_URL": f"sqlite+aiosqlite:///{workdir / 'opsapi.db'}",
        "OPSAPI_DATA_DIR": str(workdir),
        "OPSAPI_ENV": "test",
    }
    server = start_server(port, env, workdir / "server.log")
    try:
        print(f"one `opsapi serve` process (pid {server.pid}), RSS {rss_mb(server.pid):.0f} MiB")
        await big_headers(port, server.pid, args.big)
        await huge_header(port, server.pid)
        await slowloris(port, server.pid, args.slow, args.slow_seconds)
    finally:
        stop(server)


if __name__ == "__main__":
    asyncio.run(main())
