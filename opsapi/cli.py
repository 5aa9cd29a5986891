"""The `opsapi` command: serve, migrate, token, audit, demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from pydantic import ValidationError

from opsapi.audit.commands import add_audit_commands, run_audit
from opsapi.auth.identity import Role
from opsapi.config import Settings
from opsapi.demo import add_demo_command, run_demo


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `opsapi` console script.

    Exit codes: 0 done, 1 the command failed (database unreachable, …), 2 bad arguments or
    settings. Failures are one line on stderr that names what to fix, never a traceback and
    never a secret.
    """
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
    token.add_argument("--ttl", default="8h", help="lifetime, e.g. 30m or 8h (at most 30d)")
    lua = commands.add_parser(
        "nginx-config", help="print the http {} snippet of an nginx-lua router instance"
    )
    lua.add_argument("--router", required=True, help="the instance's name in the routers file")
    lua.add_argument("--admin", help="which admin address, when the instance has several")
    lua.add_argument("upstreams", nargs="+", metavar="UPSTREAM", help="upstream blocks to print")
    add_audit_commands(commands)
    add_demo_command(commands)
    args = parser.parse_args(argv)
    if args.command == "audit":
        return run_audit(args)
    if args.command == "demo":  # its own settings: only OPSAPI_DATABASE_URL is read
        return run_demo(args)

    try:
        settings = Settings()
    except ValidationError as error:
        print(f"opsapi: invalid settings: {settings_problems(error)}", file=sys.stderr)
        return 2
    try:
        if args.command == "serve":
            return _serve(settings, args.host, args.port)
        if args.command == "migrate":
            return _migrate(settings)
        if args.command == "controller":
            return _controller(settings)
        if args.command == "nginx-config":
            return _nginx_config(settings, args.router, args.upstreams, args.admin)
        return _token(settings, args.role, args.subject, args.ttl)
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        print(f"opsapi {args.command}: {describe_failure(error, settings)}", file=sys.stderr)
        return 1


def settings_problems(error: ValidationError) -> str:
    """Which settings are wrong and why, on one line; the values themselves are never shown."""
    problems = []
    for item in error.errors(include_url=False, include_input=False, include_context=False):
        message = str(item["msg"]).removeprefix("Value error, ")
        fields = [str(part) for part in item["loc"] if isinstance(part, str)]
        name = f"OPSAPI_{fields[0].upper()}: " if fields else ""
        problems.append(f"{name}{message}")
    return "; ".join(problems)


def describe_failure(error: BaseException, settings: Settings) -> str:
    """One line on what failed and what to do about it, with every secret masked."""
    database = _database_failure(error, settings)
    if database is not None:
        return database
    return _masked(f"{type(error).__name__}: {error}", settings)


def _database_failure(error: BaseException, settings: Settings) -> str | None:
    from sqlalchemy.engine import make_url

    chain = _causes(error)
    if not any(_from_database_driver(item) for item in chain):
        return None
    names = {type(item).__name__ for item in chain}
    try:
        url = make_url(settings.database_url)
        where = f"{url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}"
    except Exception:
        where = "OPSAPI_DATABASE_URL"
    if settings.is_sqlite:
        where = settings.database_url.split("///", 1)[-1]
    if names & {"InvalidPasswordError", "InvalidAuthorizationSpecificationError"}:
        return f"the database at {where} refused the user or password; check OPSAPI_DATABASE_URL"
    if "InvalidCatalogNameError" in names:
        return f"the database at {where} does not exist; create it or fix OPSAPI_DATABASE_URL"
    if any(isinstance(item, TimeoutError) for item in chain):
        return (
            f"the database at {where} did not answer within "
            f"{settings.database_connect_timeout_seconds:g} s; check OPSAPI_DATABASE_URL and "
            "that the database is up"
        )
    if any(isinstance(item, OSError) for item in chain) or "OperationalError" in names:
        return (
            f"cannot reach the database at {where} ({_network_reason(chain)}); check "
            "OPSAPI_DATABASE_URL and that the database is up"
        )
    return None


def _network_reason(chain: list[BaseException]) -> str:
    import socket

    for item in chain:
        if isinstance(item, ConnectionRefusedError):
            return "connection refused"
        if isinstance(item, socket.gaierror):
            return "unknown host"
        if isinstance(item, OSError) and item.strerror:
            return item.strerror.lower()
    return "cannot connect"


def _from_database_driver(error: BaseException) -> bool:
    import traceback

    drivers = ("/sqlalchemy/", "/asyncpg/", "/aiosqlite/", "/sqlite3/")
    frames = traceback.extract_tb(error.__traceback__)
    return any(driver in frame.filename for frame in frames for driver in drivers)


def _causes(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _masked(text: str, settings: Settings) -> str:
    from sqlalchemy.engine import make_url

    secrets = list(settings.webhook_secrets)
    try:
        password = make_url(settings.database_url).password
    except Exception:
        password = None
    if password:
        secrets.append(str(password))
    for secret in secrets:
        text = text.replace(secret, "***")
    return text.splitlines()[0][:300] if text else ""


def _serve(settings: Settings, host: str, port: int) -> int:
    from opsapi.http.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # Reach (and migrate) the database before serving: a wrong URL or a database that is
    # down is one clear line here, not a failed server start.
    asyncio.run(_prepare(settings))
    settings = settings.model_copy(update={"migrate_on_start": False})
    app = create_app(settings, freeze_startup_objects=True)
    code = 0 if _run_server(app, settings, host, port) else 1
    _abandon_hung_threads(code)
    return code


def _run_server(app: Any, settings: Settings, host: str, port: int) -> bool:
    """Serve `app` with granian in this process, within the settings' limits.

    Returns whether the shutdown was clean (the runtime closed within its time).
    """
    import signal

    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP1Settings
    from granian.server.embed import Server

    graceful = _Graceful(app, settings.shutdown_timeout_seconds)
    server = Server(
        graceful,
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        http=HTTPModes.http1,
        websockets=False,
        backlog=1024,
        # Connections served at once; the rest wait in the listen backlog. With the header
        # timeout this bounds what idle or slow clients can hold.
        backpressure=settings.max_connections,
        http1_settings=HTTP1Settings(
            header_read_timeout=round(settings.header_timeout_seconds * 1000),
            keep_alive=True,
            # The request head must fit in this buffer: a larger one is refused (431) or the
            # connection closed, before any of it reaches Python.
            max_buffer_size=settings.max_header_bytes,
        ),
        log_access=False,
        # granian's own lines go through our handler and format (stderr), like every other.
        log_dictconfig={
            "loggers": {"_granian": {"handlers": [], "level": "INFO", "propagate": True}}
        },
    )
    # Last resort if closing the runtime itself hangs: the worker is cancelled.
    server.workers_kill_timeout = round(settings.shutdown_timeout_seconds * 2 + 5)

    async def run() -> None:
        loop = asyncio.get_running_loop()

        def shutdown() -> None:
            server.stop()  # type: ignore[no-untyped-call]
            graceful.begin_shutdown()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, shutdown)
        try:
            await server.serve()
        except TimeoutError:
            logging.getLogger("opsapi").error("the server did not stop in time")

    _event_loop_runner(run)
    return graceful.closed


def _event_loop_runner(main: Any) -> None:
    """Run `main()` on uvloop (what the server was measured with), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


class _Graceful:
    """Tracks requests in flight so that a shutdown waits for them, but not forever.

    On SIGTERM the server stops accepting and waits for the requests in flight before the
    application's shutdown; this cancels those still running after `grace` seconds (their
    transactions roll back), so that a request stuck on a lock cannot hold the process.
    """

    def __init__(self, app: Any, grace: float) -> None:
        self.app = app
        self.grace = grace
        self.requests: set[asyncio.Task[Any]] = set()
        self.closed = False
        self._deadline: asyncio.Task[None] | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._lifespan_send(send))
            return
        task = asyncio.current_task()
        if task is not None:
            self.requests.add(task)
        try:
            await self.app(scope, receive, send)
        finally:
            if task is not None:
                self.requests.discard(task)

    def begin_shutdown(self) -> None:
        """Stop the background loops now; cancel requests still running after the grace."""
        runtime = getattr(self.app.state, "runtime", None)
        if runtime is not None:
            runtime.stop.set()
        if self._deadline is None:
            self._deadline = asyncio.get_running_loop().create_task(self._cancel_late())

    async def _cancel_late(self) -> None:
        log = logging.getLogger("opsapi")
        if self.requests:
            log.info("waiting up to %.0f s for %d requests", self.grace, len(self.requests))
            _, late = await asyncio.wait(set(self.requests), timeout=self.grace)
            if late:
                log.warning("cancelling %d requests still running after %.0f s",
                            len(late), self.grace)  # fmt: skip
                for task in late:
                    task.cancel()

    def _lifespan_send(self, send: Any) -> Any:
        async def wrapped(message: Any) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                self.closed = True
            await send(message)

        return wrapped


async def _prepare(settings: Settings) -> None:
    """Migrate per the settings, or at least check that the database answers."""
    from sqlalchemy import text

    from opsapi.runtime import migrate
    from opsapi.storage.db import create_engine

    if settings.migrate_on_start:
        await migrate(settings)
        return
    engine = create_engine(settings.database_url, limits=settings.database_limits())
    try:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
    finally:
        await engine.dispose()


def _controller(settings: Settings) -> int:
    import signal

    from opsapi import heap
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
            heap.settle()
            await stop.wait()

    _event_loop_runner(run)
    _abandon_hung_threads(0)
    return 0


def _abandon_hung_threads(code: int, grace: float = 1.0) -> None:
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
            os._exit(code)


def _nginx_config(settings: Settings, router: str, upstreams: list[str], admin: str | None) -> int:
    from opsapi.routers.nginx_lua import nginx_config

    try:
        print(nginx_config(settings.routers_file, router, upstreams, admin), end="")
    except ValueError as error:  # the routers file's errors never quote a value
        print(f"opsapi nginx-config: {error}", file=sys.stderr)
        return 2
    return 0


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
    try:
        seconds = int(parse_duration(ttl).total_seconds())
    except ValueError as error:
        print(f"opsapi token: --ttl: {error}", file=sys.stderr)
        return 2
    signer = LocalSigner.load_or_create(settings.signing_key_path)
    print(signer.mint(subject=subject, roles=[Role(role)], ttl_seconds=seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
