"""The `opsapi` command: serve, migrate, token."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from opsapi.auth.identity import Role
from opsapi.config import Settings


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `opsapi` console script."""
    parser = argparse.ArgumentParser(prog="opsapi", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the API server (and its controller)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    commands.add_parser("migrate", help="bring the database schema up to date")
    commands.add_parser("controller", help="run only the controller loop (no HTTP API)")
    token = commands.add_parser("token", help="print a locally signed bearer token")
    token.add_argument("--role", required=True, choices=[role.value for role in Role])
    token.add_argument("--subject", required=True)
    token.add_argument("--ttl", default="8h", help="lifetime, e.g. 30m or 8h")
    args = parser.parse_args(argv)

    try:
        settings = Settings()
    except ValueError as error:
        print(f"opsapi: invalid settings: {error}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return _serve(settings, args.host, args.port)
    if args.command == "migrate":
        return _migrate(settings)
    if args.command == "controller":
        return _controller(settings)
    return _token(settings, args.role, args.subject, args.ttl)


def _serve(settings: Settings, host: str, port: int) -> int:
    import uvicorn

    from opsapi.http.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # Forwarded headers are handled by opsapi itself (OPSAPI_TRUSTED_PROXIES), not by uvicorn.
    uvicorn.run(create_app(settings), host=host, port=port, access_log=False, proxy_headers=False)
    return 0


def _controller(settings: Settings) -> int:
    import signal

    from opsapi.clock import system_clock
    from opsapi.runtime import build_runtime

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        # The same runtime as `opsapi serve`, without the API: the controller loop and the
        # PagerDuty delivery worker (a controller-only deployment pages too).
        async with build_runtime(settings, clock=system_clock, serve_api=False):
            await stop.wait()

    asyncio.run(run())
    _abandon_hung_threads()
    return 0


def _abandon_hung_threads(grace: float = 1.0) -> None:
    """Exit now if a worker thread still hangs after the runtime closed.

    A gate query or PagerDuty call blocked on a silent peer holds its thread until its own
    client timeout; the interpreter would wait for it at exit. Everything durable is already
    flushed and closed here, so such threads are abandoned instead.
    """
    import os
    import threading
    import time

    deadline = time.monotonic() + grace
    for thread in threading.enumerate():
        if thread is threading.main_thread() or thread.daemon:
            continue
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            logging.getLogger("opsapi").warning("abandoning hung worker thread %s", thread.name)
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


def _migrate(settings: Settings) -> int:
    from opsapi.runtime import migrate

    asyncio.run(migrate(settings))
    print("database is up to date")
    return 0


def _token(settings: Settings, role: str, subject: str, ttl: str) -> int:
    from opsapi.auth.tokens import LocalSigner
    from opsapi.durations import parse_duration

    if settings.jwks_url:
        print("opsapi: tokens come from your identity provider (OPSAPI_JWKS_URL is set)",
              file=sys.stderr)  # fmt: skip
        return 2
    signer = LocalSigner.load_or_create(settings.signing_key_path)
    seconds = int(parse_duration(ttl).total_seconds())
    print(signer.mint(subject=subject, roles=[Role(role)], ttl_seconds=seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
